"""Filing one received instance: the checks and the durable write shared by every ingest path.

The DIMSE storage SCP (:mod:`dicom_node.listener`, PS3.4 Annex B) and the DICOMweb STOW-RS service (PS3.18
§10.5, in the API) both end with a data set spooled to a temp file that starts with our File Meta Information
(:class:`dicom_node.receive.Spool`). :class:`InstanceIntake` takes it from there, the same way for both (DESIGN
step 1): identify the data set in place (:func:`dicom_node.instance.identify`: UIDs present and valid, matching
what the request said, Pixel Data complete), ask the sink how it relates to what is recorded (new, duplicate
or a UID conflict that would move data to another study or patient: refused), apply the duplicate policy,
rename the file into place (fsync), record it through the :class:`~dicom_node.events.IngestSink`, and only
then report success. Every refusal is logged and reported to the sink; the temp file never stays behind.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.events import (
    IngestSink,
    InstanceConflict,
    PlacementKind,
    ReceivedInstance,
    RejectedInstance,
)
from dicom_node.instance import Identified, InvalidInstance, identify, is_valid_uid
from dicom_node.params import DuplicatePolicy, ListenerParams, UnsupportedSopPolicy
from dicom_node.receive import Spool
from dicom_node.sop import ANALYSABLE_SOP_CLASSES, SR_SOP_CLASSES, all_storage_sop_classes
from dicom_node.status import StoreStatus
from dicom_node.storage import InstanceStore

log = logging.getLogger(__name__)

_LOCK_STRIPES = 64


@dataclass(frozen=True, slots=True)
class Source:
    """Who sent an instance: the calling AE title (DIMSE) or the sender's name (DICOMweb), and its host.
    ``protocol`` names the service in log lines (``C-STORE``, ``STOW-RS``)."""

    calling_ae_title: str
    peer_host: str
    protocol: str = "C-STORE"
    called_ae_title: str = ""
    """The AE title the sender called (DIMSE); empty: ours (``ae_title``), as for STOW-RS."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one instance: ``status`` 0x0000 when it is stored (or a kept-first duplicate)."""

    status: StoreStatus
    reason: str = ""
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.status is StoreStatus.SUCCESS


StudyHook = Callable[[str], None]
"""Called with the Study Instance UID of an instance as it is filed (the completion tracker's hooks)."""


def _no_hook(study_uid: str) -> None:
    """Default hook: nothing to tell."""


class InstanceIntake:
    """Identifies, checks, files and records spooled instances (thread-safe).

    ``expected_study`` in :meth:`file` refuses an instance of another study (STOW-RS to
    ``/studies/{study}``, PS3.18 §10.5.1) before anything is recorded."""

    def __init__(self, params: ListenerParams, store: InstanceStore, sink: IngestSink) -> None:
        self.params = params
        self.store = store
        self.sink = sink
        self._sop_locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._low_space = False
        self.accepted_classes = set(ANALYSABLE_SOP_CLASSES) | set(SR_SOP_CLASSES)
        if params.unsupported_sop_classes is UnsupportedSopPolicy.STORE:
            self.accepted_classes = all_storage_sop_classes()

    @property
    def limit_text(self) -> str:
        return f"{self.params.max_instance_bytes / (1 << 20):g} MiB"

    def space_refusal(self) -> str | None:
        """Why nothing may be written now (free space on the storage file system under ``min_free_bytes``),
        or None. Asked before a byte of a data set is written (when a C-STORE request's command arrives, when a
        STOW-RS part's File Meta Information has arrived); entering and leaving the low-space state is logged
        once each."""
        if self.params.min_free_bytes <= 0:
            return None
        try:
            free = self.store.free_bytes()
        except OSError as exc:
            reason = f"cannot read the free space of the storage folder: {exc.strerror or exc}"
        else:
            if free >= self.params.min_free_bytes:
                if self._low_space:
                    self._low_space = False
                    log.warning("storage has %.3g GB free again (at least %.3g GB): receiving instances again",
                                free / 1e9, self.params.min_free_bytes / 1e9)
                return None
            reason = (f"storage low: {free / 1e9:.3g} GB free, under the "
                      f"{self.params.min_free_bytes / 1e9:g} GB minimum")
        if not self._low_space:
            self._low_space = True
            log.error("%s: every instance is answered 0xA700 (Out of Resources) until space is freed", reason)
        return reason

    def refuse(self, source: Source, status: StoreStatus, reason: str, sop_class_uid: str | None,
               sop_instance_uid: str | None, study_uid: str | None = None, *, no_space: bool = False) -> Outcome:
        """Log and report a refused instance (nothing of it is kept); ``no_space``: refused for want of disk
        space."""
        log.warning("%s %s from %s@%s refused with 0x%04X: %s", source.protocol,
                    sop_instance_uid or "(no SOP Instance UID)", source.calling_ae_title, source.peer_host,
                    status, reason)
        rejection = RejectedInstance(int(status), reason, source.calling_ae_title, source.peer_host,
                                     sop_class_uid or None, sop_instance_uid or None, study_uid, no_space=no_space)
        _sink_call(self.sink.instance_rejected, rejection)
        return Outcome(status, reason, sop_class_uid or None, sop_instance_uid or None, study_uid)

    def check_request(self, source: Source, sop_class_uid: str, sop_instance_uid: str) -> Outcome | None:
        """The checks made before any data set byte is looked at: SOP class accepted, UIDs well formed."""
        if sop_class_uid not in self.accepted_classes:
            return self.refuse(source, StoreStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED,
                               f"SOP class {sop_class_uid} is not accepted", sop_class_uid, sop_instance_uid)
        if not (is_valid_uid(sop_class_uid) and is_valid_uid(sop_instance_uid)):
            return self.refuse(source, StoreStatus.INVALID_IDENTIFIER,
                               "the Affected/Media Storage SOP Class/Instance UID is not a UID",
                               sop_class_uid, sop_instance_uid)
        return None

    def file(
        self,
        spool: Spool,
        *,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        source: Source,
        on_received: StudyHook = _no_hook,
        on_duplicate: StudyHook = _no_hook,
        expected_study: str | None = None,
    ) -> Outcome:
        """File the data set of a complete ``spool`` (the request checks passed). The spool's temp file is
        moved into place or removed, whatever happens."""
        try:
            return self._file(spool, transfer_syntax, sop_class_uid, sop_instance_uid, source, on_received,
                              on_duplicate, expected_study)
        finally:
            spool.discard()  # a no-op once the file was renamed into place

    def _file(self, spool: Spool, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str, source: Source,
              on_received: StudyHook, on_duplicate: StudyHook, expected_study: str | None) -> Outcome:
        def refuse(status: StoreStatus, reason: str, study_uid: str | None = None, *, no_space: bool = False) -> Outcome:
            return self.refuse(source, status, reason, sop_class_uid, sop_instance_uid, study_uid, no_space=no_space)

        def conflict(instance: ReceivedInstance, reason: str) -> Outcome:
            log.error("%s %s from %s@%s refused with 0x%04X (UID conflict): %s", source.protocol,
                      instance.sop_instance_uid, source.calling_ae_title, source.peer_host, StoreStatus.UID_CONFLICT,
                      reason)
            _sink_call(self.sink.uid_conflict, instance, reason)
            return Outcome(StoreStatus.UID_CONFLICT, reason, sop_class_uid, sop_instance_uid,
                           instance.study_instance_uid)

        if spool.refusal is not None:
            return refuse(StoreStatus.OUT_OF_RESOURCES_STORAGE, spool.refusal, no_space=True)
        if spool.exceeded:
            return refuse(StoreStatus.OUT_OF_RESOURCES_STORAGE,
                          f"data set of {spool.size} bytes exceeds the {self.limit_text} instance limit")
        try:
            sha256 = spool.finish(fsync=self.params.fsync)
        except OSError as exc:
            return refuse(StoreStatus.OUT_OF_RESOURCES_STORAGE, f"cannot write: {exc.strerror or exc}", no_space=True)
        temp = spool.path
        try:
            ident = self._identify(spool, transfer_syntax, sop_class_uid, sop_instance_uid)
        except InvalidInstance as exc:
            return refuse(exc.status, exc.reason)
        except OSError as exc:  # the temp file vanished or cannot be mapped: nothing to file, try again later
            return refuse(StoreStatus.OUT_OF_RESOURCES_STORAGE, f"cannot read back what was received: {exc}")
        if expected_study is not None and ident.study_instance_uid != expected_study:
            return refuse(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                          f"instance of study {ident.study_instance_uid} posted to study {expected_study}",
                          ident.study_instance_uid)

        final = self.store.path_for(ident.study_instance_uid, ident.series_instance_uid, ident.sop_instance_uid)
        instance = self._received(ident, transfer_syntax, final, spool, sha256, source)
        study = ident.study_instance_uid
        with self._sop_locks[hash(ident.sop_instance_uid) % _LOCK_STRIPES]:
            try:
                placement = self.sink.placement(instance)
            except Exception as exc:  # noqa: BLE001 - never answer Success without knowing what is recorded
                log.exception("cannot tell whether %s is already recorded", ident.sop_instance_uid)
                self.store.discard(temp)
                return refuse(StoreStatus.OUT_OF_RESOURCES_DATABASE, f"cannot check what is recorded: {exc}", study)
            if placement.kind is PlacementKind.CONFLICT:
                self.store.discard(temp)
                return conflict(instance, placement.reason)
            duplicate = placement.kind is PlacementKind.DUPLICATE
            if duplicate and self.params.duplicate_policy is DuplicatePolicy.KEEP_FIRST and final.exists():
                self.store.discard(temp)
                on_duplicate(study)
                log.info("duplicate SOP Instance UID %s from %s ignored (keep first)", ident.sop_instance_uid,
                         source.calling_ae_title)
                _sink_call(self.sink.duplicate_ignored, instance)
                return Outcome(StoreStatus.SUCCESS, "duplicate (kept the first)", sop_class_uid, sop_instance_uid,
                               study, duplicate=True)
            try:
                self.store.commit(temp, final)
            except OSError as exc:
                self.store.discard(temp)
                return refuse(StoreStatus.OUT_OF_RESOURCES_STORAGE, f"cannot store: {exc.strerror or exc}", study,
                              no_space=True)
            on_received(study)
            try:
                self.sink.instance_stored(instance, replaced=duplicate)
            except InstanceConflict as exc:
                if not duplicate:
                    self.store.discard(final)
                return conflict(instance, exc.reason)
            except Exception as exc:
                log.exception("recording instance %s failed", ident.sop_instance_uid)
                if not duplicate:
                    self.store.discard(final)
                return refuse(StoreStatus.OUT_OF_RESOURCES_DATABASE, f"cannot record: {exc}", study)
        return Outcome(StoreStatus.SUCCESS, "", sop_class_uid, sop_instance_uid, study)

    def _received(self, ident: Identified, transfer_syntax: str, final: Path, spool: Spool, sha256: str,
                  source: Source) -> ReceivedInstance:
        not_analysed = self.not_analysed_reason(ident)
        return ReceivedInstance(
            sop_class_uid=ident.sop_class_uid,
            sop_instance_uid=ident.sop_instance_uid,
            study_instance_uid=ident.study_instance_uid,
            series_instance_uid=ident.series_instance_uid,
            transfer_syntax_uid=transfer_syntax,
            path=final,
            size=spool.header_length + spool.size,
            sha256=sha256,
            calling_ae_title=source.calling_ae_title,
            peer_host=source.peer_host,
            called_ae_title=source.called_ae_title or self.params.ae_title,
            received_at=datetime.now(UTC),
            analysable=not_analysed is None,
            not_analysed_reason=not_analysed,
            patient_id=ident.patient_id,
            patient_name=ident.patient_name,
            accession_number=ident.accession_number,
            study_date=ident.study_date,
            study_description=ident.study_description,
            modality=ident.modality,
            series_number=ident.series_number,
            series_description=ident.series_description,
            instance_number=ident.instance_number,
            laterality=ident.laterality,
            image_type=ident.image_type,
            burned_in_annotation=ident.burned_in_annotation,
            manufacturer=ident.manufacturer,
        )

    def not_analysed_reason(self, ident: Identified) -> str | None:
        """Why an instance is stored but not analysed, or None when it goes to analysis: only photographs of
        the analysable SOP classes, and (unless ``analyse_derived_images``) only original ones."""
        if ident.sop_class_uid not in ANALYSABLE_SOP_CLASSES:
            return "SOP class is not a photograph class"
        if ident.derived and not self.params.analyse_derived_images:
            if ident.image_type[:1] == ("DERIVED",):
                return "derived image (Image Type DERIVED)"
            return "burned-in annotation"
        return None

    def _identify(self, spool: Spool, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str) -> Identified:
        """Identify the received data set in place (memory-mapped, never read into memory whole)."""
        with open(spool.path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as received:
            return identify(received, transfer_syntax, sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                            offset=spool.header_length, max_inflated=self.params.max_instance_bytes,
                            scratch=self.store.incoming)


def _sink_call(method: Any, *args: Any) -> None:
    """Tell the sink something that must never stop the node."""
    try:
        method(*args)
    except Exception:
        log.exception("ingest sink failed in %s", getattr(method, "__name__", method))
