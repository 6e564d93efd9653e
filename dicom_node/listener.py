"""The storage SCP: C-ECHO and C-STORE (PS3.4 Annex A and B) with AE-title and TLS policy.

Receive path per C-STORE (DESIGN step 1): the data set bytes are written as they arrive, never decoded and
never held in memory whole, to a temp file that starts with our File Meta Information
(:mod:`dicom_node.receive`, at most ``max_instance_bytes``); the file is fsynced, its identifying attributes
are read in place and checked (:mod:`dicom_node.instance`), the sink is asked how the instance relates to what
is recorded (new, duplicate, or a UID conflict that would move data to another study or patient: refused with
0xC004), the file is renamed into place, reported to the :class:`~dicom_node.events.IngestSink` (the database
row), and only then is Success answered (those steps live in :mod:`dicom_node.intake`, shared with the
DICOMweb STOW-RS service). Any failure — a database error in the duplicate check included —
answers a failure status with an Error Comment and the association carries on. Connections are admitted by
:mod:`dicom_node.guard`. When an association ends, whether it was released (A-RELEASE) or cut off is passed to
the completion tracker: a cut-off sender does not end its studies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext

from dicom_node.completion import CompletionTracker
from dicom_node.events import AssociationSummary, IngestSink, RejectedAssociation
from dicom_node.guard import AdmissionParams, ConnectionGuard, GuardedAssociationServer
from dicom_node.instance import file_header
from dicom_node.intake import InstanceIntake, Source
from dicom_node.params import CompletionParams, ListenerParams
from dicom_node.receive import Spool, SpoolingDimse
from dicom_node.sop import TRANSFER_SYNTAXES, VERIFICATION
from dicom_node.status import StoreStatus
from dicom_node.storage import InstanceStore
from dicom_node.tls import server_context

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ diagnostics (PS3.8 Table 9-21): result 1 = rejected-permanent, 2 = rejected-transient;
# source 1 = service-user, 3 = service-provider (presentation related function).
_REJECT_PERMANENT, _REJECT_TRANSIENT, _SOURCE_SERVICE_USER, _SOURCE_PROVIDER_PRESENTATION = 0x01, 0x02, 0x01, 0x03
_CALLING_AE_NOT_RECOGNIZED, _CALLED_AE_NOT_RECOGNIZED, _LOCAL_LIMIT_EXCEEDED = 0x03, 0x07, 0x02
_UNLIMITED = 2**30  # pynetdicom's own association count includes connections that never negotiated
_RELEASE_FLAG_WAIT = 2.0
"""Seconds to wait, when a connection closes, for pynetdicom's reactor thread to say whether the association
was released or aborted (the close is seen on the DUL thread, sometimes a moment before the flag is set)."""


class _SupportedContext(PresentationContext):
    """A supported presentation context whose copy shares its (immutable) UIDs.

    pynetdicom deep-copies the SCP's supported contexts for every association; with ~170 storage SOP
    classes × 13 transfer syntaxes that copy re-validates thousands of UIDs and cost more CPU than
    receiving an image. Sharing the UIDs makes it cheap; each association still gets its own lists."""

    def __init__(self, abstract_syntax: str, transfer_syntaxes: Iterable[str]) -> None:
        super().__init__()
        self.abstract_syntax = abstract_syntax
        for syntax in transfer_syntaxes:
            self.add_transfer_syntax(syntax)

    def __deepcopy__(self, memo: dict[int, Any]) -> _SupportedContext:
        clone = object.__new__(_SupportedContext)
        clone.__dict__.update(self.__dict__)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


@dataclass(slots=True)
class _AssociationStats:
    calling_ae_title: str
    peer_host: str
    called_ae_title: str = ""
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    studies: set[str] = field(default_factory=set)


class Listener:
    """A running storage SCP. ``start()`` binds and returns; ``stop()`` closes the socket and waits for the
    completion tracker. ``port`` is the bound port (useful with ``port=0``)."""

    def __init__(self, params: ListenerParams, completion: CompletionParams, sink: IngestSink) -> None:
        self.params = params
        self.sink = sink
        self.store = InstanceStore(params.storage_root, fsync=params.fsync)
        self.tracker = CompletionTracker(completion, sink.study_stable)
        self.guard = ConnectionGuard(AdmissionParams(
            acse_timeout=params.acse_timeout,
            network_timeout=params.network_timeout,
            max_associations=params.max_associations,
            max_connections_per_host=params.max_connections_per_host,
            max_negotiating=params.max_negotiating_connections,
            trusted_hosts=params.trusted_hosts,
        ))
        self._server: GuardedAssociationServer | None = None
        self._stats: dict[int, _AssociationStats] = {}
        self._stats_lock = threading.Lock()
        self.intake = InstanceIntake(params, self.store, sink)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("listener is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Drop temp files of interrupted receptions, re-arm studies still receiving, then accept
        associations in background threads."""
        removed = self.store.remove_leftovers()
        if removed:
            log.warning("removed %d incomplete temp files from an earlier run", removed)
        for pending in self.sink.pending_studies():
            self.tracker.arm(pending.study_instance_uid, interrupted=pending.interrupted)
            if pending.interrupted:
                log.warning("study %s was cut off mid-association before this start; waiting for its sender "
                            "to send again (or max_wait_seconds)", pending.study_instance_uid)
        _quiet_pynetdicom_when_not_logged()
        ae = self._application_entity()
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_opened),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        ssl_context = server_context(self.params.tls) if self.params.tls is not None else None
        self._server = ae.make_server(
            (self.params.bind_address, self.params.port),
            evt_handlers=handlers,
            ssl_context=ssl_context,
            contexts=self._supported_contexts(),
            server_class=GuardedAssociationServer,
            guard=self.guard,
        )
        threading.Thread(target=self._server.serve_forever, name="dicom-accept", daemon=True).start()
        self.guard.start()
        self.tracker.start()
        log.info(
            "DICOM node %s listening on %s:%d%s (%d storage SOP classes)",
            self.params.ae_title, self.params.bind_address, self.port, " with TLS" if ssl_context else "",
            len(self.intake.accepted_classes),
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.guard.stop()
        self.tracker.stop()

    def _application_entity(self) -> AE:
        ae = AE(ae_title=self.params.ae_title)
        ae.maximum_pdu_size = self.params.max_pdu_size
        ae.network_timeout = self.params.network_timeout
        ae.acse_timeout = self.params.acse_timeout
        ae.dimse_timeout = self.params.dimse_timeout
        ae.maximum_associations = _UNLIMITED  # slots are counted by the guard, for allow-listed associations only
        ae.require_called_aet = False  # checked in _on_requested, which logs and reports why
        return ae

    def _supported_contexts(self) -> list[PresentationContext]:
        contexts = [_SupportedContext(VERIFICATION, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])]
        contexts += [_SupportedContext(uid, TRANSFER_SYNTAXES) for uid in sorted(self.intake.accepted_classes)]
        return contexts

    def _on_opened(self, event: Event) -> None:
        """A connection was accepted: the guard follows it, and its C-STORE data sets are spooled to disk."""
        assoc = event.assoc
        self.guard.opened(event.address, assoc)

        def header_for(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
            return file_header(sop_class_uid, sop_instance_uid, transfer_syntax, assoc.requestor.ae_title.strip())

        assoc.dimse = SpoolingDimse(assoc, folder=self.store.incoming, max_bytes=self.params.max_instance_bytes,
                                    header_for=header_for, refusal_for=self.space_refusal)

    def retrieval_handlers(self) -> list[tuple[Any, Any]]:
        """Event handlers for an association *we* request to retrieve instances with C-GET (PS3.4 C.4.3): the
        C-STORE sub-operations the peer sends on it take exactly this listener's receive path (spooled write,
        size and space limits, identification, UID and Patient ID checks, fsync and rename, the sink's row) and
        count for the completion tracker. The listener need not be started (the ``retinalgpt`` CLI uses one
        without binding a port); its sink's ``study_stable`` completes the retrieved studies."""
        return [(evt.EVT_CONN_OPEN, self._on_retrieve_opened), (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_CONN_CLOSE, self._on_closed)]

    def _on_retrieve_opened(self, event: Event) -> None:
        assoc = event.assoc
        peer_ae = assoc.acceptor.ae_title.strip()
        peer_host = str(event.address[0])
        with self._stats_lock:
            self._stats[id(assoc)] = _AssociationStats(peer_ae, peer_host, assoc.requestor.ae_title.strip())

        def header_for(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
            return file_header(sop_class_uid, sop_instance_uid, transfer_syntax, peer_ae)

        assoc.dimse = SpoolingDimse(assoc, folder=self.store.incoming, max_bytes=self.params.max_instance_bytes,
                                    header_for=header_for, refusal_for=self.space_refusal)

    def space_refusal(self) -> str | None:
        """Why nothing may be written now (:meth:`dicom_node.intake.InstanceIntake.space_refusal`), or None."""
        return self.intake.space_refusal()

    def _on_requested(self, event: Event) -> None:
        """Called-AE check, calling-AE allow-list optionally bound to host, then a free association slot
        (PS3.8 §9.3.4 diagnostics)."""
        assoc = event.assoc
        peer = assoc.requestor.address_info.as_tuple
        self.guard.requested(peer)
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        called = assoc.requestor.primitive.called_ae_title.strip()
        host = assoc.requestor.address
        reason, diagnostic = self._refusal(calling, called, host)
        result, source = _REJECT_PERMANENT, _SOURCE_SERVICE_USER
        if reason is None:
            if self.guard.take_slot(peer):
                return
            reason = f"all {self.params.max_associations} association slots are in use (max_associations)"
            result, source, diagnostic = _REJECT_TRANSIENT, _SOURCE_PROVIDER_PRESENTATION, _LOCAL_LIMIT_EXCEEDED
        log.warning("association from %s@%s to %s rejected: %s", calling, host, called, reason)
        self._report(self.sink.association_rejected, RejectedAssociation(calling, called, host, reason))
        assoc.acse.send_reject(result, source, diagnostic)
        assoc.kill()

    def _refusal(self, calling: str, called: str, host: str) -> tuple[str | None, int]:
        if called != self.params.ae_title:
            return f"called AE title {called!r} is not {self.params.ae_title!r}", _CALLED_AE_NOT_RECOGNIZED
        rules = [rule for rule in self.params.allowed_callers if rule.ae_title == calling]
        if not rules:
            return f"calling AE title {calling!r} is not in the allow-list", _CALLING_AE_NOT_RECOGNIZED
        if not any(rule.host is None or rule.host == host for rule in rules):
            return f"calling AE title {calling!r} is not allowed from host {host}", _CALLING_AE_NOT_RECOGNIZED
        return None, 0

    def _on_accepted(self, event: Event) -> None:
        assoc = event.assoc
        with self._stats_lock:
            self._stats[id(assoc)] = _AssociationStats(assoc.requestor.ae_title.strip(), assoc.requestor.address,
                                                       _called(assoc))

    def _on_echo(self, event: Event) -> int:
        return 0x0000

    def _on_closed(self, event: Event) -> None:
        assoc = event.assoc
        self.guard.closed(event.address)
        if isinstance(assoc.dimse, SpoolingDimse):
            assoc.dimse.discard_unfinished()
        with self._stats_lock:
            stats = self._stats.pop(id(assoc), None)
        if stats is None:
            self.tracker.association_closed(id(assoc))
            return
        released = _released(assoc)
        self.tracker.association_closed(id(assoc), released=released)
        summary = AssociationSummary(
            calling_ae_title=stats.calling_ae_title,
            peer_host=stats.peer_host,
            stored=stats.stored,
            duplicates=stats.duplicates,
            failed=stats.failed,
            studies=tuple(sorted(stats.studies)),
            aborted=not released,
        )
        log.info(
            "association from %s@%s ended%s: %d stored, %d duplicate, %d failed",
            stats.calling_ae_title, stats.peer_host, " (aborted)" if summary.aborted else "",
            stats.stored, stats.duplicates, stats.failed,
        )
        self._report(self.sink.association_ended, summary)

    def _on_store(self, event: Event) -> int | Dataset:
        assoc: Association = event.assoc
        stats = self._stats.get(id(assoc)) or _AssociationStats(
            assoc.requestor.ae_title.strip(), assoc.requestor.address, _called(assoc))
        request = event.request
        sop_class_uid = str(request.AffectedSOPClassUID)
        sop_instance_uid = str(request.AffectedSOPInstanceUID)
        source = Source(stats.calling_ae_title, stats.peer_host, called_ae_title=stats.called_ae_title)
        outcome = self.intake.check_request(source, sop_class_uid, sop_instance_uid)
        spool = getattr(request, "_dataset_file", None)
        if outcome is None and not isinstance(spool, Spool):
            outcome = self.intake.refuse(source, StoreStatus.CANNOT_UNDERSTAND,
                                         "the C-STORE request carries no data set", sop_class_uid, sop_instance_uid)
        if outcome is None:
            assert isinstance(spool, Spool)
            outcome = self.intake.file(
                spool, transfer_syntax=str(event.context.transfer_syntax), sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid, source=source,
                on_received=lambda study: self.tracker.instance_received(study, id(assoc)),
                on_duplicate=lambda study: self.tracker.duplicate_received(study, id(assoc)),
            )
        elif isinstance(spool, Spool):
            spool.discard()
        if not outcome.ok:
            stats.failed += 1
            return _status(outcome.status, outcome.reason)
        if outcome.duplicate:
            stats.duplicates += 1
        else:
            stats.stored += 1
        if outcome.study_instance_uid:
            stats.studies.add(outcome.study_instance_uid)
        return int(StoreStatus.SUCCESS)

    def _report(self, method: Any, payload: Any) -> None:
        """Tell the sink something that must never stop the node."""
        self._sink_call(method, payload)

    @staticmethod
    def _sink_call(method: Any, *args: Any) -> None:
        try:
            method(*args)
        except Exception:
            log.exception("ingest sink failed in %s", getattr(method, "__name__", method))


def _called(assoc: Association) -> str:
    """The called AE title the requestor asked for (A-ASSOCIATE-RQ)."""
    primitive = assoc.requestor.primitive
    return primitive.called_ae_title.strip() if primitive is not None else ""


def _released(assoc: Association) -> bool:
    """Whether the association ended with A-RELEASE; anything else (A-ABORT, A-P-ABORT, dropped connection,
    timeout) counts as cut off. Waits briefly for the reactor thread to set the flag."""
    deadline = time.monotonic() + _RELEASE_FLAG_WAIT
    while not (assoc.is_released or assoc.is_aborted) and time.monotonic() < deadline:
        time.sleep(0.005)
    return bool(assoc.is_released)


def _status(status: StoreStatus, reason: str) -> Dataset:
    """A C-STORE response status with the reason as Error Comment (0000,0902; LO, at most 64 characters)."""
    answer = Dataset()
    answer.Status = int(status)
    answer.ErrorComment = reason.encode("ascii", "replace").decode().replace("\\", "/")[:64]
    return answer


def _quiet_pynetdicom_when_not_logged() -> None:
    """Unless pynetdicom's own INFO/DEBUG logging is switched on, do not bind its standard logging handlers
    (pynetdicom ``_config.LOG_HANDLER_LEVEL``, process-wide): they format a multi-line dump of every PDU and
    DIMSE message, and copy each received data set to test that it is not empty, before the logger discards it.
    The node logs each instance and association itself."""
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _config.LOG_HANDLER_LEVEL = "none"
