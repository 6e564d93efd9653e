"""Retention and disk safety (issue 15 item 3): how much room the storage folder has, and the sweep that
deletes originals past ``storage.retain_days``.

The retention sweep (run by the bookkeeper every ``storage.retention_sweep_seconds``) deletes the stored
originals of every study whose current revision is ``delivered`` and whose last instance arrived more than
``storage.retain_days`` ago. Its results (``<home>/results``), its analyses, deliveries, audit trail and the
study, series and instance rows stay; the study and each instance are marked purged (``purged_at``), and one
``study.purged`` audit event and log line say how many files and bytes went. Studies in any other state
(still receiving, being analysed or delivered, failed, dead-lettered) are never touched.

A file is deleted only when it lies below the storage folder and has not been written again since its row was
recorded (a late copy of the same instance arriving during the sweep is kept, its row not marked purged).

The node's own free-space guard lives in :mod:`dicom_node.listener` (0xA700 before writing); :func:`storage_space`
is the same measure for ``/readyz`` and the metrics.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import exists, select

from dicom_node.storage import free_bytes
from worker.config import Settings
from worker.db import AuditEvent, Database, Instance, Study, StudyState, utcnow

log = logging.getLogger(__name__)

ACTOR = "retention"
_WRITTEN_AFTER_RECORD_SLACK = 2.0
"""Seconds a file's modification time may be later than its row's ``received_at`` (the row is stamped after
the file is written, so the original is never later; a file written again afterwards is)."""


@dataclass(frozen=True, slots=True)
class StorageSpace:
    """Free space on the storage folder's file system against ``storage.min_free_gb``."""

    path: Path
    free_bytes: int | None
    min_free_bytes: int
    error: str | None = None

    @property
    def low(self) -> bool:
        """True when the node refuses C-STORE for want of space (or cannot tell how much there is)."""
        if self.min_free_bytes <= 0:
            return False
        return self.free_bytes is None or self.free_bytes < self.min_free_bytes

    def describe(self) -> str:
        """``ok`` or one line saying why instances are refused."""
        if not self.low:
            return "ok"
        if self.free_bytes is None:
            return f"unknown free space on {self.path}: {self.error}"
        return (f"low: {self.free_bytes / 1e9:.3g} GB free on {self.path}, under storage.min_free_gb = "
                f"{self.min_free_bytes / 1e9:g}: C-STORE is answered 0xA700 (Out of Resources)")


def storage_space(settings: Settings) -> StorageSpace:
    """Measure the storage folder's file system now (``statvfs``; of its nearest existing parent while the node
    has not created it yet)."""
    path = settings.storage.path
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        return StorageSpace(path, free_bytes(probe), settings.storage.min_free_bytes)
    except OSError as exc:
        return StorageSpace(path, None, settings.storage.min_free_bytes, error=exc.strerror or str(exc))


@dataclass(frozen=True, slots=True)
class PurgedStudy:
    study_instance_uid: str
    revision: int
    files: int
    bytes: int
    missing: int
    kept: int


def purge_expired(db: Database, settings: Settings, *, now: dt.datetime | None = None,
                  actor: str = ACTOR) -> list[PurgedStudy]:
    """Delete the originals of delivered studies older than ``storage.retain_days``; nothing when unset."""
    days = settings.storage.retain_days
    if days is None:
        return []
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=days)
    with db.reading() as session:
        candidates = list(session.scalars(select(Study.id).where(
            Study.state == StudyState.DELIVERED,
            Study.last_instance_at < cutoff,
            exists().where(Instance.study_id == Study.id, Instance.purged_at.is_(None)),
        ).order_by(Study.last_instance_at)))
    purged = []
    for study_id in candidates:
        try:
            done = _purge_study(db, settings, study_id, cutoff, now, actor)
        except Exception:  # noqa: BLE001 - one study's trouble must not stop the sweep
            log.exception("retention: purging study id %d failed", study_id)
            continue
        if done is not None:
            purged.append(done)
    return purged


def _purge_study(db: Database, settings: Settings, study_id: int, cutoff: dt.datetime, now: dt.datetime,
                 actor: str) -> PurgedStudy | None:
    root = settings.storage.path.resolve()
    with db.session() as session:
        study = session.scalars(select(Study).where(Study.id == study_id).with_for_update()).one_or_none()
        if study is None or study.state != StudyState.DELIVERED or study.last_instance_at >= cutoff:
            return None  # a late instance or an operator moved it since the candidates were read
        instances = session.scalars(select(Instance).where(Instance.study_id == study.id,
                                                           Instance.purged_at.is_(None))).all()
        files = size = missing = kept = 0
        folders: set[Path] = set()
        for instance in instances:
            path = Path(instance.path)
            resolved = path.resolve()
            if not resolved.is_relative_to(root):
                log.error("retention: instance %s of study %s is recorded at %s, outside the storage folder %s; "
                          "not deleted", instance.sop_instance_uid, study.study_instance_uid, path, root)
                kept += 1
                continue
            try:
                stat = resolved.stat()
            except FileNotFoundError:
                missing += 1
                instance.purged_at = now
                continue
            if stat.st_mtime > instance.received_at.timestamp() + _WRITTEN_AFTER_RECORD_SLACK:
                kept += 1  # written again after its row was recorded: a copy received during this sweep
                continue
            resolved.unlink()
            files += 1
            size += stat.st_size
            folders.add(resolved.parent)
            instance.purged_at = now
        if kept and not (files or missing):
            return None
        study.purged_at = now
        session.add(AuditEvent(actor=actor, action="study.purged", study_instance_uid=study.study_instance_uid,
                               detail={"revision": study.revision, "files": files, "bytes": size,
                                       "missing": missing, "kept": kept,
                                       "retain_days": settings.storage.retain_days,
                                       "last_instance_at": study.last_instance_at.isoformat()}))
        result = PurgedStudy(study.study_instance_uid, study.revision, files, size, missing, kept)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        _remove_empty(folder, root)
    log.info("retention: study %s revision %d delivered and older than %g days: %d original(s) deleted (%.1f MB)%s",
             result.study_instance_uid, result.revision, settings.storage.retain_days, files, size / 1e6,
             f", {missing} already missing" if missing else "")
    return result


def _remove_empty(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``root`` while they are empty."""
    while folder != root and folder.is_relative_to(root):
        try:
            os.rmdir(folder)
        except OSError:  # not empty (or gone): stop here
            return
        folder = folder.parent
