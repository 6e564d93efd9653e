"""C-STORE and C-ECHO SCU (PS3.4 Annex A and B) for delivery and the ``send`` / ``echo`` commands.

Presentation contexts are negotiated per SOP class with the transfer syntaxes of the files being sent,
plus a separate context offering Explicit/Implicit VR Little Endian as a fallback (compressed data is
decompressed when the peer accepts only the fallback). Every failure is classified as *transient* (worth
retrying later: connection refused or timed out, association rejected-transient or aborted, 0xA7xx out of
resources) or *permanent* (association rejected-permanent, SOP class or transfer syntax not accepted,
0x0122, 0xA9xx, 0xCxxx, unreadable file) so that delivery can dead-letter instead of looping.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

import dicom_node.codecs  # noqa: F401 - decoders for the decompressing fallback
from dicom_node.params import PeerParams
from dicom_node.sop import FALLBACK_TRANSFER_SYNTAXES, VERIFICATION
from dicom_node.status import is_success, is_transient_failure, is_warning
from dicom_node.tls import client_context

log = logging.getLogger(__name__)

_MAX_CONTEXTS = 128  # PS3.8 §9.3.2.2: presentation context IDs are odd numbers 1–255


class Failure(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class InstanceResult:
    """The outcome of one C-STORE: ``status`` is the peer's DIMSE status (None when nothing was answered)."""

    sop_instance_uid: str | None
    sop_class_uid: str | None
    source: str
    status: int | None
    message: str = ""
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def warning(self) -> bool:
        return self.status is not None and is_warning(self.status)


@dataclass(frozen=True, slots=True)
class SendResult:
    """Per-instance results of one association; ``association_error`` is set when none could be attempted."""

    peer: str
    instances: list[InstanceResult] = field(default_factory=list)
    association_error: str | None = None
    association_failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.association_failure is None and all(r.ok for r in self.instances)

    @property
    def failure(self) -> Failure | None:
        """The worst failure: permanent if any instance failed permanently, else transient, else None."""
        kinds = {r.failure for r in self.instances if r.failure} | (
            {self.association_failure} if self.association_failure else set()
        )
        if Failure.PERMANENT in kinds:
            return Failure.PERMANENT
        return Failure.TRANSIENT if kinds else None


@dataclass(frozen=True, slots=True)
class EchoResult:
    peer: str
    status: int | None
    message: str = ""
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def classify_status(status: int) -> Failure | None:
    """None for success and warnings, else transient (0xA7xx, 0x0110, 0x021x) or permanent (the rest)."""
    if is_success(status) or is_warning(status):
        return None
    return Failure.TRANSIENT if is_transient_failure(status) else Failure.PERMANENT


def echo(peer: PeerParams) -> EchoResult:
    """Verify connectivity with C-ECHO (PS3.4 Annex A)."""
    ae = _application_entity(peer)
    ae.add_requested_context(VERIFICATION)
    assoc, error, failure = _associate(ae, peer)
    if assoc is None:
        return EchoResult(_describe(peer), None, error or "", failure)
    try:
        status = assoc.send_c_echo()
        code = int(status.Status) if "Status" in status else None
    finally:
        _release(assoc)
    if code is None:
        return EchoResult(_describe(peer), None, "no response to C-ECHO", Failure.TRANSIENT)
    return EchoResult(_describe(peer), code, "", classify_status(code))


def send_files(peer: PeerParams, paths: Iterable[Path | str]) -> SendResult:
    """Send DICOM files (PS3.10) on one association, each answered separately.

    Only the headers are read to negotiate; each file is then sent on its own, streamed from disk in PDU-sized
    chunks when the peer accepted its transfer syntax (pynetdicom ``STORE_SEND_CHUNKED_DATASET``), else read
    and converted just before it is sent. A study is never held in memory whole."""
    items: list[_Item] = []
    for path in paths:
        try:
            items.append(_Item(str(path), dcmread(path, stop_before_pixels=True), "", Path(path)))
        except Exception as exc:  # noqa: BLE001 - unreadable input is a permanent failure of that file only
            items.append(_Item(str(path), None, f"cannot read {path}: {exc}"))
    return _send(peer, items)


def send_datasets(peer: PeerParams, datasets: Sequence[Dataset]) -> SendResult:
    """Send in-memory data sets (each must carry ``file_meta.TransferSyntaxUID``) on one association."""
    return _send(peer, [_Item(f"dataset {ds.get('SOPInstanceUID', '?')}", ds, "") for ds in datasets])


@dataclass(frozen=True, slots=True)
class _Item:
    """One thing to send: ``dataset`` is the whole data set, or only its header when ``path`` is the file."""

    source: str
    dataset: Dataset | None
    error: str
    path: Path | None = None


def _send(peer: PeerParams, items: list[_Item]) -> SendResult:
    results: list[InstanceResult] = []
    sendable: list[_Item] = []
    for item in items:
        ds = item.dataset
        if ds is None or "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            results.append(InstanceResult(None, None, item.source, None, item.error or "no SOP Class/Instance UID",
                                          Failure.PERMANENT))
        else:
            sendable.append(item)
    if not sendable:
        return SendResult(_describe(peer), results)
    ae = _application_entity(peer)
    contexts = _contexts([item.dataset for item in sendable])
    if len(contexts) > _MAX_CONTEXTS:
        message = f"{len(contexts)} presentation contexts needed, at most {_MAX_CONTEXTS} allowed: send in batches"
        return SendResult(_describe(peer), results, message, Failure.PERMANENT)
    ae.requested_contexts = contexts
    assoc, error, failure = _associate(ae, peer)
    if assoc is None:
        return SendResult(_describe(peer), results, error, failure)
    try:
        for item in sendable:
            results.append(_store(assoc, item))
            if not assoc.is_established:
                break
    finally:
        _release(assoc)
    sent = {r.source for r in results}
    for item in sendable:
        if item.source not in sent:
            ds = item.dataset
            results.append(InstanceResult(str(ds.SOPInstanceUID), str(ds.SOPClassUID), item.source, None,
                                          "association ended before this instance was sent", Failure.TRANSIENT))
    return SendResult(_describe(peer), results)


def _store(assoc: Association, item: _Item) -> InstanceResult:
    ds, source = item.dataset, item.source
    sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    syntax = UID(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
    if not accepted:
        return InstanceResult(sop_instance, sop_class, source, None,
                              f"peer accepted no presentation context for SOP class {sop_class}", Failure.PERMANENT)
    as_is = syntax is not None and any(cx.transfer_syntax[0] == syntax for cx in accepted)
    payload: Dataset | Path
    if item.path is not None and as_is:
        _config.STORE_SEND_CHUNKED_DATASET = True  # affects only sends of a path: streamed from the file
        payload = item.path
    else:
        if item.path is not None:
            try:
                ds = dcmread(item.path)
            except Exception as exc:  # noqa: BLE001 - the file changed or vanished since its header was read
                return InstanceResult(sop_instance, sop_class, source, None, f"cannot read {item.path}: {exc}",
                                      Failure.PERMANENT)
        if not as_is:
            target = UID(accepted[0].transfer_syntax[0])
            try:
                if syntax is not None and syntax.is_compressed:
                    ds.decompress(generate_instance_uid=False)  # a transfer syntax change keeps the instance
                ds.file_meta.TransferSyntaxUID = target
            except Exception as exc:  # noqa: BLE001 - any decoder error makes this file unsendable here
                return InstanceResult(sop_instance, sop_class, source, None,
                                      f"cannot convert to {target.name}: {exc}", Failure.PERMANENT)
        payload = ds
    try:
        response = assoc.send_c_store(payload)
    except Exception as exc:  # noqa: BLE001 - pynetdicom raises ValueError/AttributeError/… on bad data sets
        return InstanceResult(sop_instance, sop_class, source, None, f"C-STORE failed: {exc}", Failure.PERMANENT)
    if "Status" not in response:
        return InstanceResult(sop_instance, sop_class, source, None,
                              "no C-STORE response (timeout, abort or connection lost)", Failure.TRANSIENT)
    status = int(response.Status)
    comment = str(response.get("ErrorComment", "") or "")
    return InstanceResult(sop_instance, sop_class, source, status, comment, classify_status(status))


def _contexts(datasets: Sequence[Dataset]) -> list[PresentationContext]:
    """Per SOP class: one context with the files' own transfer syntaxes, one with the uncompressed fallbacks."""
    syntaxes: dict[str, list[str]] = {}
    for ds in datasets:
        own = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
        wanted = syntaxes.setdefault(str(ds.SOPClassUID), [])
        if own is not None and str(own) not in wanted:
            wanted.append(str(own))
    contexts = []
    for sop_class, own in syntaxes.items():
        if own:
            contexts.append(build_context(sop_class, own))
        fallback = [str(ts) for ts in FALLBACK_TRANSFER_SYNTAXES]
        if set(own) != set(fallback):
            contexts.append(build_context(sop_class, fallback))
    return contexts


def _application_entity(peer: PeerParams) -> AE:
    ae = AE(ae_title=peer.calling_ae_title)
    ae.maximum_pdu_size = peer.max_pdu_size
    ae.acse_timeout = peer.timeout
    ae.dimse_timeout = peer.timeout
    ae.network_timeout = peer.timeout
    ae.connection_timeout = peer.timeout
    return ae


def _associate(ae: AE, peer: PeerParams, **options: Any) -> tuple[Association | None, str | None, Failure | None]:
    """Request an association (``options``: further ``AE.associate`` arguments, e.g. ``ext_neg``)."""
    tls_args = (client_context(peer.tls), peer.host) if peer.tls is not None else None
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args, **options)
    except OSError as exc:
        return None, f"cannot connect to {_describe(peer)}: {exc}", Failure.TRANSIENT
    if assoc.is_established:
        return assoc, None, None
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        permanent = rsp is not None and rsp.result == 0x01
        reason = f"{rsp.result_str}, {rsp.source_str}: {rsp.reason_str}" if rsp is not None else "rejected"
        return None, f"association rejected by {_describe(peer)} ({reason})", (
            Failure.PERMANENT if permanent else Failure.TRANSIENT
        )
    accepted = assoc.acceptor.primitive
    if accepted is not None and accepted.result == 0x00:
        return None, f"{_describe(peer)} accepted none of the proposed presentation contexts", Failure.PERMANENT
    if assoc.is_aborted:
        unreachable = _unreachable(peer) if accepted is None else None
        if unreachable:  # pynetdicom reports a refused connection as an aborted association
            return None, f"cannot connect to {_describe(peer)}: {unreachable}", Failure.TRANSIENT
        return None, f"association with {_describe(peer)} aborted during negotiation", Failure.TRANSIENT
    return None, f"cannot associate with {_describe(peer)} (connection refused or timed out)", Failure.TRANSIENT


def _unreachable(peer: PeerParams) -> str | None:
    """Why a TCP connection to the peer cannot be opened now, or None when it can (then the peer itself ended
    the negotiation)."""
    try:
        with socket.create_connection((peer.host, peer.port), timeout=min(peer.timeout, 5.0)):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def _release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()


def _describe(peer: PeerParams) -> str:
    return f"{peer.ae_title}@{peer.host}:{peer.port}"
