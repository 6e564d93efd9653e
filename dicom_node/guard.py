"""Connection admission for the storage SCP: ARTIM, per-host and negotiation limits, association slots.

Why this exists (pynetdicom 3.0): an accepted socket has no timeout and the DUL reads each PDU with blocking
``recv`` calls, so a peer that sends part of an A-ASSOCIATE-RQ and then nothing blocks the DUL reactor for
good. The reactor never gets to check the ARTIM timer (PS3.8 §9.1.5), the association thread waits in
``kill()`` for the DUL forever, and every such connection counts against pynetdicom's
``maximum_associations``: 16 idle TCP connections, no allow-listed AE title needed, shut every camera out.
With TLS it is worse: the server wraps the accepted socket in its accept loop, so one connection that never
sends a ClientHello stops all further accepts.

The guard closes those holes without touching what a well-behaved peer sees:

- every accepted socket gets ``network_timeout`` as its socket timeout, which bounds a stall inside a PDU;
  the TLS handshake runs in the connection's own thread, never in the accept loop;
- **ARTIM**: a connection whose A-ASSOCIATE-RQ has not completely arrived ``acse_timeout`` seconds after it
  was accepted (TLS handshake included) is shut down, however slowly the peer drips bytes;
- a host that already has ``max_connections_per_host`` connections open gets its next one closed at once;
- at most ``max_negotiating`` connections from hosts not named in the allow-list may be negotiating at a
  time; a new one pushes out the oldest (a real peer sends its request within milliseconds, so only stalled
  connections are ever pushed out);
- association slots (``max_associations``) are taken only by associations that passed the allow-list, so
  connections that never identified themselves cannot hold them;
- hosts named in an allow-list rule (``allowed_callers[].host``) are exempt from both connection limits:
  their cameras always get through, whatever other hosts do;
- an association that completed no PDU for twice ``network_timeout`` (pynetdicom aborts it after one, unless
  its reactor is stuck in a read) is shut down.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

Address = tuple[str, int]
_LOG_EVERY_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class AdmissionParams:
    """The limits the guard enforces (from :class:`~dicom_node.params.ListenerParams`)."""

    acse_timeout: float
    network_timeout: float
    max_associations: int
    max_connections_per_host: int
    max_negotiating: int
    trusted_hosts: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Connection:
    host: str
    sock: socket.socket
    opened: float
    trusted: bool
    assoc: Association | None = None
    negotiated: bool = False
    slot: bool = False
    closing_since: float | None = None
    idle_since: float | None = None


def address_key(address: Any) -> Address:
    """``(host, port)`` of a peer address tuple (IPv6 tuples carry two more fields)."""
    return str(address[0]), int(address[1])


@dataclass
class _Throttle:
    """One log line per (host, reason) and minute, with the number of events it stands for: a flood of
    hostile connections must not become a flood of log lines."""

    last: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def warn(self, host: str, reason: str, now: float) -> None:
        with self.lock:
            at, suppressed = self.last.get((host, reason), (0.0, 0))
            if at and now - at < _LOG_EVERY_SECONDS:
                self.last[(host, reason)] = (at, suppressed + 1)
                return
            self.last[(host, reason)] = (now, 0)
        more = f" ({suppressed} more like it in the last minute)" if suppressed else ""
        log.warning("connection from %s closed: %s%s", host, reason, more)


class ConnectionGuard:
    """Tracks every accepted connection from accept to close (thread-safe) and enforces the limits above."""

    def __init__(self, params: AdmissionParams, *, poll_seconds: float = 0.25) -> None:
        self.params = params
        self._poll = min(poll_seconds, params.acse_timeout / 4)
        self._connections: dict[Address, _Connection] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._throttle = _Throttle()

    # -- events, in the order a connection sees them ------------------------------------------------------

    def admit(self, sock: socket.socket, address: Any) -> bool:
        """Accept loop: register a new connection, or refuse it (False) when its host is over its limit."""
        key = address_key(address)
        host = key[0]
        now = time.monotonic()
        trusted = host in self.params.trusted_hosts
        evicted: _Connection | None = None
        with self._lock:
            if not trusted:
                open_from_host = sum(1 for c in self._live() if c.host == host)
                if open_from_host >= self.params.max_connections_per_host:
                    self._throttle.warn(host, f"{open_from_host} connections already open from this host "
                                              f"(max_connections_per_host)", now)
                    return False
                negotiating = sorted((c for c in self._live() if not c.trusted and not c.negotiated),
                                     key=lambda c: c.opened)
                if len(negotiating) >= self.params.max_negotiating:
                    evicted = negotiating[0]
                    evicted.closing_since = now
            self._connections[key] = _Connection(host, sock, now, trusted)
        if evicted is not None:
            self._throttle.warn(evicted.host, "still negotiating when the negotiation limit was reached "
                                              "(max_negotiating_connections)", now)
            _shutdown(evicted.sock)
        return True

    def secured(self, address: Any, sock: socket.socket) -> None:
        """The TLS handshake finished: ``sock`` is the socket to shut down from now on."""
        with self._lock:
            connection = self._connections.get(address_key(address))
            if connection is not None:
                connection.sock = sock

    def opened(self, address: Any, assoc: Association) -> None:
        """EVT_CONN_OPEN: the association object serving this connection exists."""
        with self._lock:
            connection = self._connections.get(address_key(address))
            if connection is not None:
                connection.assoc = assoc

    def requested(self, address: Any) -> None:
        """EVT_REQUESTED: the whole A-ASSOCIATE-RQ arrived, ARTIM stops."""
        with self._lock:
            connection = self._connections.get(address_key(address))
            if connection is not None:
                connection.negotiated = True

    def take_slot(self, address: Any) -> bool:
        """An allow-listed association asks for one of the ``max_associations`` slots; False when all are
        taken (the caller rejects it: transient, local limit exceeded)."""
        with self._lock:
            connection = self._connections.get(address_key(address))
            if connection is None:
                return False
            if not connection.slot:
                if sum(1 for c in self._connections.values() if c.slot) >= self.params.max_associations:
                    return False
                connection.slot = True
            return True

    def closed(self, address: Any) -> None:
        """EVT_CONN_CLOSE (or a failed TLS handshake): forget the connection and free its slot."""
        with self._lock:
            self._connections.pop(address_key(address), None)

    # -- supervision ------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Open connections, those still negotiating, and association slots in use (for tests and logs)."""
        with self._lock:
            live = list(self._live())
            return {"open": len(live), "negotiating": sum(1 for c in live if not c.negotiated),
                    "associations": sum(1 for c in self._connections.values() if c.slot)}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dicom-connection-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop supervising and close every connection that is still negotiating."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            pending = [c for c in self._live() if not c.negotiated]
        for connection in pending:
            _shutdown(connection.sock)

    def sweep(self, now: float | None = None) -> None:
        """One pass: enforce ARTIM, shut down stuck associations, drop connections whose thread is gone."""
        now = time.monotonic() if now is None else now
        to_close: list[tuple[_Connection, str]] = []
        with self._lock:
            for key, connection in list(self._connections.items()):
                if connection.assoc is not None and not connection.assoc.is_alive() and connection.negotiated:
                    del self._connections[key]
                elif connection.closing_since is not None:
                    if now - connection.closing_since > self.params.acse_timeout + self.params.network_timeout:
                        del self._connections[key]  # shut down long ago; its close event never came
                elif not connection.negotiated and now - connection.opened > self.params.acse_timeout:
                    connection.closing_since = now
                    to_close.append((connection, f"no complete A-ASSOCIATE-RQ within {self.params.acse_timeout:g} s "
                                                 "(ARTIM, acse_timeout)"))
                elif connection.negotiated and connection.assoc is not None and connection.assoc.dul.idle_timer_expired():
                    connection.idle_since = connection.idle_since or now
                    if now - connection.idle_since > self.params.network_timeout:
                        connection.closing_since = now
                        to_close.append((connection, "no PDU completed for twice network_timeout"))
                else:
                    connection.idle_since = None
        for connection, reason in to_close:
            self._throttle.warn(connection.host, reason, now)
            _shutdown(connection.sock)

    def _live(self):
        return (c for c in self._connections.values() if c.closing_since is None)

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the guard must outlive any surprise in one pass
                log.exception("connection guard sweep failed")


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the guard's admission (``verify_request``), socket timeouts and the
    TLS handshake moved out of the accept loop into the connection's thread. Built with
    ``AE.make_server(..., server_class=GuardedAssociationServer, guard=...)``."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        self.guard = guard
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = self.socket.accept()
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.guard.admit(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        params = self.guard.params
        try:
            if self.ssl_context is not None:
                request.settimeout(params.acse_timeout)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                self.guard.secured(client_address, request)
            request.settimeout(params.network_timeout)
        except (OSError, ssl.SSLError) as exc:
            log.warning("connection from %s closed: TLS handshake failed: %s", client_address[0], exc)
            self.guard.closed(client_address)
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (pynetdicom's own ``shutdown`` also unregisters the
        server from the AE, which only ``AE.start_server`` registers it with)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def _shutdown(sock: socket.socket) -> None:
    """Shut the connection down so a thread blocked reading it wakes up (close alone would not wake it).
    ``socket.socket.shutdown`` is called directly so a TLS socket's state is left to its own thread."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
