"""Query/Retrieve SCU (PS3.4 Annex C): C-FIND, C-GET and C-MOVE in the Study Root information model.

Used to fetch a study back from a PACS (``studies rerun`` of a study whose originals were purged, ``studies
fetch``). Two ways to retrieve, both through the node's normal receive path (fsync, rename, database row, UID and
Patient ID checks):

- **C-GET** (PS3.4 C.4.3): the peer sends the instances as C-STORE sub-operations on our own association; we
  propose the photograph and SR storage SOP classes with the SCP role (SCP/SCU Role Selection, PS3.7 D.3.3.4)
  and the caller passes the event handlers that store them (:meth:`dicom_node.listener.Listener.retrieval_handlers`);
- **C-MOVE** (PS3.4 C.4.2) to our own AE title: the peer opens a second association to our running listener.

This module drives the query and the retrieve and reports what the peer said; it never writes an instance itself.

Errors are raised as :class:`RetrieveError` with one line saying what went wrong (peer down, association
rejected, the peer refusing the query or the move, e.g. 0xA801 Move Destination unknown).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import build_role
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.params import PeerParams
from dicom_node.sop import ANALYSABLE_SOP_CLASSES, FALLBACK_TRANSFER_SYNTAXES, SR_SOP_CLASSES, TRANSFER_SYNTAXES
from dicom_node.sender import _application_entity, _associate, _describe, _release

_PENDING = (0xFF00, 0xFF01)

_MOVE_FAILURES = {
    0xA701: "out of resources: unable to calculate the number of matches",
    0xA702: "out of resources: unable to perform the sub-operations",
    0xA801: "Move Destination unknown (the peer does not know our AE title: add it to the peer's modalities)",
    0xA900: "identifier does not match the SOP class",
    0xFE00: "sub-operations cancelled",
}


class RetrieveError(RuntimeError):
    """A query or retrieve that did not happen or did not complete; the message says why."""


@dataclass(frozen=True, slots=True)
class FoundStudy:
    """One C-FIND match at STUDY level."""

    study_instance_uid: str
    patient_id: str | None
    study_date: str | None
    instances: int | None
    """Number of Study Related Instances (0020,1208) when the peer returns it."""


@dataclass(frozen=True, slots=True)
class MoveResult:
    """The final C-MOVE response: the status and the sub-operation counts (PS3.4 C.4.2.1.6)."""

    status: int
    completed: int
    failed: int
    warning: int
    error_comment: str = ""

    @property
    def ok(self) -> bool:
        """Every sub-operation succeeded (status Success, no failed sub-operation); 0xB000 (some failed) and
        the failure statuses (0xA7xx, 0xCxxx: the peer stopped, e.g. when our node refused an instance) are
        not ok."""
        return self.status == 0x0000 and self.failed == 0


Progress = Callable[[int, int | None], None]
"""``progress(done, total)`` after each pending C-MOVE response (``total`` None when the peer does not say)."""


def find_studies(peer: PeerParams, *, study_instance_uid: str | None = None, patient_id: str | None = None,
                 since: dt.date | None = None) -> list[FoundStudy]:
    """C-FIND (Study Root, STUDY level) for one study or a patient's studies from ``since`` on."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid or ""
    query.PatientID = patient_id or ""
    query.StudyDate = f"{since:%Y%m%d}-" if since else ""
    query.NumberOfStudyRelatedInstances = ""
    ae = _application_entity(peer)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _established(ae, peer)
    found: list[FoundStudy] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = _code(status, peer, "C-FIND")
            if code in _PENDING:
                if identifier is None or not identifier.get("StudyInstanceUID"):
                    continue
                count = identifier.get("NumberOfStudyRelatedInstances")
                found.append(FoundStudy(str(identifier.StudyInstanceUID),
                                        str(identifier.get("PatientID") or "") or None,
                                        str(identifier.get("StudyDate") or "") or None,
                                        int(count) if count not in (None, "") else None))
            elif code != 0x0000:
                raise RetrieveError(f"{_describe(peer)} refused the C-FIND with status 0x{code:04X}"
                                    f"{_comment(status)}")
    finally:
        _release(assoc)
    return found


def move_study(peer: PeerParams, study_instance_uid: str, destination_ae_title: str,
               progress: Progress | None = None) -> MoveResult:
    """C-MOVE (Study Root, STUDY level) one study to ``destination_ae_title``; returns the final response."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    ae = _application_entity(peer)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = _established(ae, peer)
    try:
        final = _final(assoc.send_c_move(query, destination_ae_title, StudyRootQueryRetrieveInformationModelMove),
                       peer, "C-MOVE", progress)
    finally:
        _release(assoc)
    return final


RETRIEVED_SOP_CLASSES: tuple[str, ...] = (*ANALYSABLE_SOP_CLASSES, *SR_SOP_CLASSES)
"""Storage SOP classes offered (SCP role) on a C-GET association: the photographs we analyse and our result
objects; a study's other instances (OCT, visual fields) are not retrieved by C-GET."""


def get_study(peer: PeerParams, study_instance_uid: str, handlers: list, progress: Progress | None = None,
              ) -> MoveResult:
    """C-GET (Study Root, STUDY level) one study; ``handlers`` (pynetdicom event handlers, EVT_C_STORE among
    them) store the instances the peer sends on this association. Returns the final response."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    ae = _application_entity(peer)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for context in _get_contexts():
        ae.add_requested_context(*context)
    roles = [build_role(sop_class, scp_role=True) for sop_class in RETRIEVED_SOP_CLASSES]
    assoc = _established(ae, peer, ext_neg=roles, evt_handlers=handlers)
    try:
        final = _final(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet), peer, "C-GET", progress)
    finally:
        _release(assoc)
    return final


def _get_contexts() -> list[tuple[str, list[str]]]:
    """The storage contexts of a C-GET association: one per photograph class and transfer syntax (the peer
    accepts one syntax per context, so offering each alone lets it send every instance in the syntax it holds,
    byte for byte, instead of transcoding to the first one it likes), one per SR/result class with the
    uncompressed syntaxes: 7 × 13 + 7 = 98 contexts, under the 128 of PS3.8 §9.3.2.2 with the C-GET one."""
    contexts = [(sop_class, [str(syntax)]) for sop_class in ANALYSABLE_SOP_CLASSES for syntax in TRANSFER_SYNTAXES]
    contexts += [(sop_class, [str(ts) for ts in FALLBACK_TRANSFER_SYNTAXES]) for sop_class in SR_SOP_CLASSES]
    return contexts


def _final(responses, peer: PeerParams, what: str, progress: Progress | None) -> MoveResult:  # noqa: ANN001
    """Read the pending responses of a C-GET or C-MOVE (progress) up to the final one."""
    final: MoveResult | None = None
    for status, _identifier in responses:
        code = _code(status, peer, what)
        counts = _counts(status)
        if code in _PENDING:
            if progress is not None:
                remaining = status.get("NumberOfRemainingSuboperations")
                done = counts[0] + counts[1] + counts[2]
                progress(done, done + int(remaining) if remaining is not None else None)
            continue
        final = MoveResult(code, *counts, error_comment=str(status.get("ErrorComment") or ""))
    if final is None:
        raise RetrieveError(f"{_describe(peer)} sent no final {what} response")
    if final.status in _MOVE_FAILURES:
        raise RetrieveError(f"{_describe(peer)} refused the {what} with status 0x{final.status:04X}: "
                            f"{_MOVE_FAILURES[final.status]}{_comment_text(final.error_comment)}")
    return final


def _established(ae, peer: PeerParams, **options):  # noqa: ANN001, ANN003, ANN202
    assoc, error, _failure = _associate(ae, peer, **options)
    if assoc is None:
        raise RetrieveError(error or f"cannot associate with {_describe(peer)}")
    return assoc


def _code(status: Dataset, peer: PeerParams, what: str) -> int:
    if "Status" not in status:  # pynetdicom yields an empty Dataset on timeout, abort or invalid response
        raise RetrieveError(f"{_describe(peer)} did not answer the {what} (connection lost, aborted or timed out)")
    return int(status.Status)


def _counts(status: Dataset) -> tuple[int, int, int]:
    return tuple(int(status.get(keyword) or 0) for keyword in (  # type: ignore[return-value]
        "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations", "NumberOfWarningSuboperations"))


def _comment(status: Dataset) -> str:
    return _comment_text(str(status.get("ErrorComment") or ""))


def _comment_text(comment: str) -> str:
    return f" ({comment})" if comment else ""
