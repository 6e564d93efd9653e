"""The callback interface through which the listener reports what happens.

:mod:`worker` implements :class:`IngestSink` (recording instances and studies in its database); the
listener calls it from association threads and the completion tracker's thread, so implementations must
be thread-safe. A method that raises makes the listener answer a failure status (for
:meth:`IngestSink.instance_stored`) or log the error and carry on (every other method).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ReceivedInstance:
    """One composite instance stored durably below the storage root (PS3.4 Annex B, C-STORE)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    size: int
    sha256: str
    calling_ae_title: str
    peer_host: str
    received_at: datetime
    analysable: bool
    not_analysed_reason: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    instance_number: int | None = None
    laterality: str | None = None
    image_type: tuple[str, ...] = ()
    burned_in_annotation: str | None = None
    manufacturer: str | None = None
    called_ae_title: str = ""
    """The AE title the sender called (ours: others are rejected at association)."""


class PlacementKind(StrEnum):
    """How a received instance relates to what is already recorded."""

    NEW = "new"
    DUPLICATE = "duplicate"
    """Its SOP Instance UID is recorded in the same study and series, for the same patient."""
    CONFLICT = "conflict"
    """Recording it would move an instance, a series or a study to another study or patient."""


@dataclass(frozen=True, slots=True)
class Placement:
    kind: PlacementKind
    reason: str = ""


class InstanceConflict(Exception):
    """Raised by :meth:`IngestSink.instance_stored` when recording would move an instance, series or study to
    another study or patient (a UID reused by another sender); the listener refuses the instance."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RejectedInstance:
    """A C-STORE request answered with a failure status."""

    status: int
    reason: str
    calling_ae_title: str
    peer_host: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None = None
    no_space: bool = False
    """Refused (0xA700) because the storage file system is short of space or a write to it failed."""


@dataclass(frozen=True, slots=True)
class RejectedAssociation:
    """An A-ASSOCIATE-RQ answered with A-ASSOCIATE-RJ (PS3.8 §9.3.4)."""

    calling_ae_title: str
    called_ae_title: str
    peer_host: str
    reason: str


@dataclass(frozen=True, slots=True)
class AssociationSummary:
    """What one accepted association carried, reported when it ends. ``aborted``: it ended without an
    A-RELEASE (A-ABORT from either side, connection dropped, timeout)."""

    calling_ae_title: str
    peer_host: str
    stored: int
    duplicates: int
    failed: int
    studies: tuple[str, ...]
    aborted: bool


@dataclass(frozen=True, slots=True)
class PendingStudy:
    """A study still receiving, re-armed for completion detection when the listener starts. ``interrupted``:
    the last association that carried an instance of it was not released normally (aborted, connection
    dropped, or cut by a crash of the node), so more instances are probably still to come."""

    study_instance_uid: str
    interrupted: bool


class IngestSink(Protocol):
    """What the listener tells the rest of the product."""

    def placement(self, instance: ReceivedInstance) -> Placement:
        """Whether ``instance`` is new, a duplicate of a recorded instance, or in conflict with what is
        recorded (asked before its file is put in place). Raises when it cannot tell (database error): the
        listener then refuses the instance rather than guess."""

    def instance_stored(self, instance: ReceivedInstance, *, replaced: bool) -> None:
        """Record a durably stored instance; Success is answered only after this returns. Raises
        :class:`InstanceConflict` instead of moving anything between studies or patients."""

    def duplicate_ignored(self, instance: ReceivedInstance) -> None:
        """An instance whose SOP Instance UID was already stored was discarded (keep-first policy)."""

    def uid_conflict(self, instance: ReceivedInstance, reason: str) -> None:
        """An instance was refused because recording it would move data to another study or patient."""

    def instance_rejected(self, rejection: RejectedInstance) -> None:
        """A C-STORE request got a failure status."""

    def association_rejected(self, rejection: RejectedAssociation) -> None:
        """An association request was rejected."""

    def association_ended(self, summary: AssociationSummary) -> None:
        """An accepted association was released or aborted."""

    def pending_studies(self) -> list[PendingStudy]:
        """Studies still receiving (e.g. from before a restart), to re-arm completion detection."""

    def study_stable(self, study_instance_uid: str) -> None:
        """Completion detected (DESIGN step 2): no new instance for ``stable_seconds`` and no open
        association that carried the study, or ``max_wait_seconds`` since it started receiving."""
