"""Slowloris drills against the storage SCP (issue 18 item 8): connections that send part of an
A-ASSOCIATE-RQ and then nothing (or drip it byte by byte) must not shut cameras out.

Attackers are raw TCP sockets bound to other loopback addresses (127.0.0.2, …: every 127/8 address reaches
the listener), so each one is a distinct peer host; the camera is dcmtk's echoscu/storescu from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE

from dicom_node.params import CallerRule, TlsParams
from tests.dicom_node.dicom_fixtures import echoscu, make_certificates, storescu

VERIFICATION = "1.2.840.10008.1.1"
# The first 20 bytes of an A-ASSOCIATE-RQ (PS3.8 §9.3.2): PDU type 1, reserved, a length of 256, protocol
# version 1, reserved, then the first 10 characters of the called AE title. The rest never comes.
PARTIAL_REQUEST = b"\x01\x00" + (256).to_bytes(4, "big") + b"\x00\x01\x00\x00" + b"RETINALGPT"
FAST = {"acse_timeout": 2.0, "network_timeout": 5.0}


def attacker(port: int, source: str, payload: bytes = PARTIAL_REQUEST) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    if payload:
        sock.sendall(payload)
    return sock


def closed_by_node(sock: socket.socket, within: float) -> bool:
    """True when the node closes the connection within ``within`` seconds (EOF or reset)."""
    sock.settimeout(within)
    try:
        while data := sock.recv(4096):
            del data  # an A-ABORT or A-ASSOCIATE-RJ before the close is fine too
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@contextlib.contextmanager
def attackers(port: int, sources: list[str], payload: bytes = PARTIAL_REQUEST) -> Iterator[list[socket.socket]]:
    socks = [attacker(port, source, payload) for source in sources]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def hosts(first: int, count: int) -> list[str]:
    return [f"127.0.0.{n}" for n in range(first, first + count)]


def test_sixteen_partial_requests_do_not_shut_out_an_allow_listed_camera(start_listener, op_file):
    """The probe of issue 18: 16 connections (no allow-listed AE needed) used to hold all 16 slots."""
    listener, sink = start_listener(**FAST)
    with attackers(listener.port, hosts(2, 16)) as socks:
        time.sleep(0.3)  # every attacker is accepted and blocked in the middle of its request
        started = time.monotonic()
        assert echoscu(listener.port).returncode == 0
        result = storescu(listener.port, [op_file()])
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < FAST["acse_timeout"], "the camera had to wait for ARTIM"
        assert len(sink.stored) == 1
        assert all(closed_by_node(sock, FAST["acse_timeout"] + 2) for sock in socks)
    assert listener.guard.counts()["negotiating"] == 0


def test_artim_closes_a_request_dripped_byte_by_byte(start_listener):
    """A per-read socket timeout is not enough: the whole request must arrive within acse_timeout."""
    listener, _ = start_listener(**FAST)
    sock = attacker(listener.port, "127.0.0.2", payload=b"")
    stop = threading.Event()

    def drip() -> None:
        for byte in PARTIAL_REQUEST:
            if stop.wait(0.2):
                return
            with contextlib.suppress(OSError):
                sock.send(bytes([byte]))

    dripper = threading.Thread(target=drip, daemon=True)
    started = time.monotonic()
    dripper.start()
    try:
        assert closed_by_node(sock, FAST["acse_timeout"] + 2)
        assert time.monotonic() - started >= FAST["acse_timeout"] - 0.3
    finally:
        stop.set()
        sock.close()


def test_one_host_gets_at_most_max_connections_per_host(start_listener):
    listener, sink = start_listener(allowed_callers=(CallerRule("STORESCU"),), max_connections_per_host=4,
                                    acse_timeout=30.0)
    with attackers(listener.port, ["127.0.0.2"] * 6) as socks:
        assert all(closed_by_node(sock, 1.0) for sock in socks[4:])
        assert not any(closed_by_node(sock, 0.2) for sock in socks[:4])
        # 127.0.0.1 is no allow-listed host here: it still gets in, the attacker's host is full, not the node
        assert echoscu(listener.port, calling="STORESCU").returncode == 0
    assert not sink.rejected_associations


def test_negotiation_limit_pushes_out_the_oldest_stalled_connection(start_listener):
    """Many attacking hosts, each under its own limit: the oldest stalled connections make room."""
    listener, _ = start_listener(allowed_callers=(CallerRule("STORESCU"),), max_negotiating_connections=4,
                                 acse_timeout=30.0)
    with attackers(listener.port, hosts(2, 6)) as socks:
        assert all(closed_by_node(sock, 1.0) for sock in socks[:2])
        assert not any(closed_by_node(sock, 0.2) for sock in socks[2:])
        assert echoscu(listener.port, calling="STORESCU").returncode == 0


def test_association_slots_are_counted_for_allow_listed_associations_only(start_listener):
    listener, sink = start_listener(max_associations=2, **FAST)
    held = []
    with attackers(listener.port, hosts(2, 8)):
        for _ in range(2):
            ae = AE(ae_title="CAMERA1")
            ae.add_requested_context(VERIFICATION)
            assoc = ae.associate("127.0.0.1", listener.port, ae_title="RETINALGPT")
            assert assoc.is_established
            held.append(assoc)
        full = echoscu(listener.port)
        assert full.returncode != 0
        assert "Local Limit Exceeded" in full.stderr or "local-limit-exceeded" in full.stderr.lower(), full.stderr
        assert "max_associations" in sink.rejected_associations[-1].reason
        held.pop().release()
        time.sleep(0.3)
        assert echoscu(listener.port).returncode == 0
    for assoc in held:
        assoc.release()


def test_tls_handshake_that_never_starts_does_not_block_other_callers(start_listener, tmp_path):
    """The TLS handshake used to run in the accept loop: one silent connection stopped every accept."""
    certs = make_certificates(tmp_path)
    listener, _ = start_listener(tls=TlsParams(certs.server_cert, certs.server_key, certs.ca), **FAST)
    with attackers(listener.port, ["127.0.0.2"], payload=b"") as socks:  # connected, silent
        started = time.monotonic()
        result = echoscu(listener.port, extra=["+tla", "+cf", str(certs.ca), "-to", "10"])
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < FAST["acse_timeout"]
        assert closed_by_node(socks[0], FAST["acse_timeout"] + 2)


@pytest.mark.parametrize("payload", [b"", PARTIAL_REQUEST])
def test_listener_stops_promptly_with_stalled_connections_open(start_listener, payload):
    listener, _ = start_listener(acse_timeout=30.0)
    with attackers(listener.port, hosts(2, 4), payload):
        time.sleep(0.2)
        started = time.monotonic()
        listener.stop()
        assert time.monotonic() - started < 5
