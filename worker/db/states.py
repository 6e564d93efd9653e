"""Lifecycle states and the study state machine, in one place.

A study's *current revision* moves through::

    receiving → complete → queued → processing → analysed → delivering → delivered
                   ↓                    ↘            ↘            ↘
             not_applicable              failed ←──────────────────

``not_applicable``: the study has no analysable image (OCT, visual fields, reports, or every image excluded
by a routing rule); it is not analysed and gets no SR, and it is not a failure.

A late instance after ``receiving`` opens revision N+1, which starts again at ``receiving``; the older
revision's analyses are marked superseded. ``rerun`` sends a study back to ``queued``, ``resend`` to
``delivering``, and a failed study may be retried from where it failed.
"""

from __future__ import annotations

from enum import StrEnum


class StudyState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    QUEUED = "queued"
    PROCESSING = "processing"
    ANALYSED = "analysed"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"


class JobKind(StrEnum):
    """What a job does: ``analysis`` (inference + measurement), ``report`` (SR/FHIR building),
    ``delivery`` (sending to destinations)."""

    ANALYSIS = "analysis"
    REPORT = "report"
    DELIVERY = "delivery"


class JobState(StrEnum):
    """``dead``: failed permanently or out of attempts; only an operator retry revives it."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"


class DeliveryState(StrEnum):
    """``dead`` is the dead-letter state: a permanent failure or attempts exhausted."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    RETRYING = "retrying"
    DEAD = "dead"


class FailureReason(StrEnum):
    """Why a job or delivery is ``dead``, as a short code (a metrics label; the full text is in its error).

    Only ``no_analysable_image``, ``model_unavailable``, ``refused`` and ``destination_removed`` are permanent
    at the first occurrence; every other error is retried and ends as ``attempts_exhausted``."""

    NO_ANALYSABLE_IMAGE = "no_analysable_image"
    MODEL_UNAVAILABLE = "model_unavailable"
    REFUSED = "refused"
    DESTINATION_REMOVED = "destination_removed"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    SUPERSEDED = "superseded"
    ORIGINALS_FAILED = "originals_failed"
    """A result for a destination that gets the originals first, whose originals delivery is dead."""


class DeliveryObject(StrEnum):
    """The kind of object delivered."""

    SR = "sr"
    KEY_IMAGE = "key_image"
    PDF = "pdf"
    SEG = "seg"
    FHIR = "fhir"
    HL7 = "hl7"
    ORIGINALS = "originals"
    """The received instances of a study revision, forwarded unchanged to a DICOM destination (routing rules)."""


S = StudyState

#: Allowed transitions of a study within its current revision. Opening a new revision (late instance)
#: is not a transition: it is :func:`worker.ingest` resetting the study to ``receiving`` with revision + 1.
STUDY_TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    S.RECEIVING: frozenset({S.COMPLETE}),
    S.COMPLETE: frozenset({S.QUEUED, S.FAILED, S.NOT_APPLICABLE}),
    S.QUEUED: frozenset({S.PROCESSING, S.FAILED}),
    S.PROCESSING: frozenset({S.ANALYSED, S.QUEUED, S.FAILED}),
    S.ANALYSED: frozenset({S.DELIVERING, S.DELIVERED, S.QUEUED, S.FAILED}),
    S.DELIVERING: frozenset({S.DELIVERED, S.FAILED, S.QUEUED}),
    S.DELIVERED: frozenset({S.QUEUED, S.DELIVERING}),
    S.FAILED: frozenset({S.QUEUED, S.DELIVERING}),
    S.NOT_APPLICABLE: frozenset(),
}


class InvalidTransition(ValueError):
    """A state change the study state machine does not allow."""


def check_transition(current: StudyState, target: StudyState) -> None:
    """Raise :class:`InvalidTransition` unless ``current → target`` is allowed."""
    if target not in STUDY_TRANSITIONS[current]:
        allowed = ", ".join(sorted(STUDY_TRANSITIONS[current])) or "none"
        raise InvalidTransition(f"study cannot go from {current} to {target} (allowed: {allowed})")
