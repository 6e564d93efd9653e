"""The inference job: analyse one study revision and store its :class:`StudyAnalysis` (DESIGN step 3).

A running job holds a lease (:mod:`worker.pipeline.lease`): it refreshes its row's ``updated_at`` every
``pipeline.heartbeat_seconds``; the bookkeeper re-queues a ``running`` job whose heartbeat stopped (its worker
died), whatever the broker did with the message. The job is idempotent: a job that already succeeded, or that
another live worker is running, is skipped; storing the analysis replaces an earlier one of the same (study,
revision, model). The transaction that stores the analysis also creates the revision's delivery rows (the
outbox, :func:`worker.pipeline.delivery.create_outbox`). A failure is classified by
:mod:`worker.pipeline.failures`: permanent ones make the job ``dead`` at once, the others are retried until
``pipeline.max_attempts``; either way the job keeps the error and its reason.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from worker.config import Settings
from worker.db import (
    Analysis,
    AuditEvent,
    Database,
    FailureReason,
    Instance,
    Job,
    JobState,
    Study,
    StudyState,
    utcnow,
)
from worker.pipeline.delivery import create_outbox, results_folder
from worker.pipeline.failures import PermanentFailure, permanent_reason
from worker.pipeline.jobs import move
from worker.pipeline.lease import Lease

if TYPE_CHECKING:
    from worker.pipeline.study import StudyResult

log = logging.getLogger(__name__)

ACTOR = "inference"


@dataclass(frozen=True)
class JobOutcome:
    """What happened: ``analysed`` (deliver next), ``skipped`` (nothing to do) or ``failed``."""

    status: str
    study_instance_uid: str | None = None
    revision: int | None = None
    detail: str = ""


def _heartbeat(db: Database, job_id: int, interval: float) -> Lease:
    """The running job's lease: its ``updated_at`` refreshed while it runs on this worker."""
    def renew(session: Session) -> int:
        return session.execute(update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING)
                               .values(updated_at=utcnow())).rowcount
    return Lease(db, renew, interval, f"job {job_id}")


def _start(settings: Settings, db: Database, job_id: int) -> tuple[str, int] | JobOutcome:
    """Mark the job running, unless it is done, superseded or being run by a live worker."""
    with db.session() as session:
        job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()
        if job is None:
            return JobOutcome("skipped", detail=f"job {job_id} does not exist")
        study = session.get(Study, job.study_id)
        if job.state in (JobState.SUCCEEDED, JobState.DEAD):
            return JobOutcome("skipped", study.study_instance_uid, job.revision, f"job already {job.state}")
        stale_after = dt.timedelta(seconds=settings.pipeline.stale_after_seconds)
        if job.state == JobState.RUNNING and utcnow() - job.updated_at < stale_after:
            return JobOutcome("skipped", study.study_instance_uid, job.revision, "job running on another worker")
        if study.revision != job.revision:
            job.state, job.error = JobState.DEAD, f"superseded by revision {study.revision}"
            job.failure = FailureReason.SUPERSEDED
            return JobOutcome("skipped", study.study_instance_uid, job.revision, job.error)
        job.state, job.attempts, job.started_at, job.error = JobState.RUNNING, job.attempts + 1, utcnow(), None
        job.failure = None
        move(study, StudyState.PROCESSING)
        return study.study_instance_uid, job.revision


def _instance_paths(db: Database, study_instance_uid: str, revision: int) -> list[str]:
    """Analysable instances of the study up to this revision (a late instance adds to the earlier ones) whose
    files are kept: originals deleted by the retention sweep are left out, with a warning."""
    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one()
        rows = session.execute(
            select(Instance.path, Instance.purged_at)
            .where(Instance.study_id == study.id, Instance.revision <= revision, Instance.analysable.is_(True))
            .order_by(Instance.instance_number, Instance.id)
        ).all()
    purged = sum(1 for row in rows if row.purged_at is not None)
    if purged:
        log.warning("study %s revision %d: %d analysable original(s) were purged (storage.retain_days); analysing "
                    "the %d kept", study_instance_uid, revision, purged, len(rows) - purged)
    return [row.path for row in rows if row.purged_at is None]


def run_job(settings: Settings, db: Database, job_id: int) -> JobOutcome:
    """Analyse the study revision of ``job_id`` and store the result; failures are recorded on the job."""
    started = _start(settings, db, job_id)
    if isinstance(started, JobOutcome):
        log.info("job %d: %s", job_id, started.detail)
        return started
    study_uid, revision = started
    try:
        with _heartbeat(db, job_id, settings.pipeline.heartbeat_seconds):
            result = _analyse(settings, db, study_uid, revision)
    except Exception as exc:  # noqa: BLE001 -- any failure of a study is recorded on its job, never lost
        return _fail(settings, db, job_id, exc)
    with db.session() as session:
        job = session.get(Job, job_id)
        study = session.get(Study, job.study_id)
        analysis = result.analysis
        name = analysis.model.name if analysis.model else "measurement-only"
        version = analysis.model.version if analysis.model else ""
        session.execute(delete(Analysis).where(Analysis.study_id == study.id, Analysis.revision == revision,
                                               Analysis.model_name == name, Analysis.model_version == version,
                                               Analysis.shadow.is_(False)))
        session.add(Analysis(study_id=study.id, revision=revision, model_name=name, model_version=version,
                             result=analysis.model_dump(mode="json")))
        job.state, job.finished_at = JobState.SUCCEEDED, utcnow()
        if study.revision == revision:
            move(study, StudyState.ANALYSED)
            create_outbox(session, settings, study, revision)
        session.add(AuditEvent(actor=ACTOR, action="study.analysed", study_instance_uid=study_uid,
                               detail={"job": job_id, "revision": revision, "images": len(analysis.images),
                                       "referral": analysis.referral.value, "model": f"{name} {version}".strip()}))
    return JobOutcome("analysed", study_uid, revision)


def run_shadow(settings: Settings, db: Database, study_uid: str, revision: int, version: str) -> str:
    """Analyse a study revision with the shadow candidate ``version`` (issue 17 item 3) and store it as a shadow
    analysis: no outbox, no state change, never the study's result. Skipped when the revision is no longer
    current, the candidate is no longer the shadow version, or its analysis is already stored."""
    from model.registry import ModelRegistry
    from worker.runtime import shadow_analyzer

    candidate = ModelRegistry(settings.model.registry).shadow()
    if candidate is None or candidate.version != version:
        return "skipped: not the shadow version"
    with db.reading() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one_or_none()
        if study is None or study.revision != revision:
            return "skipped: not the current revision"
        done = session.scalar(select(Analysis.id).where(Analysis.study_id == study.id, Analysis.revision == revision,
                                                        Analysis.model_version == version, Analysis.shadow.is_(True)))
        if done is not None:
            return "skipped: already analysed"
    result = _analyse(settings, db, study_uid, revision, shadow_analyzer(settings, candidate.path), masks=False)
    analysis = result.analysis
    name = analysis.model.name if analysis.model else candidate.metadata.name
    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        session.add(Analysis(study_id=study.id, revision=revision, model_name=name, model_version=version,
                             result=analysis.model_dump(mode="json"), shadow=True))
        session.add(AuditEvent(actor=ACTOR, action="study.shadow_analysed", study_instance_uid=study_uid,
                               detail={"revision": revision, "model": f"{name} {version}",
                                       "images": len(analysis.images)}))
    return "analysed"


def _analyse(settings: Settings, db: Database, study_uid: str, revision: int, study_analyzer: Any = None,
             masks: bool = True) -> StudyResult:
    import numpy as np
    from PIL import Image

    from worker.pipeline.sources import SourceError, decode_limits, load_dicom
    from worker.runtime import analyzer

    paths = _instance_paths(db, study_uid, revision)
    if not paths:
        raise PermanentFailure(FailureReason.NO_ANALYSABLE_IMAGE, "the study has no analysable image")
    sources, skipped = [], []
    for path in paths:
        try:
            sources.append(load_dicom(Path(path), decode_limits(settings)))
        except SourceError as exc:
            skipped.append(str(exc))
            log.warning("study %s: %s", study_uid, exc)
    if not sources:  # maybe a decoder missing on this worker, a file not yet visible on shared storage: retried
        raise RuntimeError(f"no image of the study could be read ({'; '.join(skipped)})")
    result = (study_analyzer or analyzer(settings)).analyze(sources, revision=revision)
    result.analysis.notes.extend(f"Not analysed: {reason}" for reason in skipped)
    if not masks:
        return result
    masks = results_folder(settings, study_uid, revision) / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    for uid, mask in result.vessel_masks.items():
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(masks / f"vessels-{uid}.png")
    return result


def _fail(settings: Settings, db: Database, job_id: int, exc: Exception) -> JobOutcome:
    """Record a failed attempt: dead at once when the failure is permanent, else retried until
    ``pipeline.max_attempts``; the error and its reason stay on the job."""
    permanent = permanent_reason(exc)
    log.exception("job %d failed%s", job_id, f" permanently ({permanent.value})" if permanent else "")
    with db.session() as session:
        job = session.get(Job, job_id)
        study = session.get(Study, job.study_id)
        job.error = f"{type(exc).__name__}: {exc}"[:2000]
        exhausted = job.attempts >= settings.pipeline.max_attempts
        dead = permanent is not None or exhausted
        job.failure = permanent or (FailureReason.ATTEMPTS_EXHAUSTED if exhausted else None)
        job.state = JobState.DEAD if dead else JobState.FAILED
        job.finished_at = utcnow()
        if study.revision == job.revision:
            move(study, StudyState.FAILED if dead else StudyState.QUEUED)
        detail = {"job": job_id, "attempts": job.attempts, "error": job.error}
        if job.failure is not None:
            detail["reason"] = job.failure.value
        session.add(AuditEvent(actor=ACTOR, action="job.dead" if dead else "job.failed",
                               study_instance_uid=study.study_instance_uid, detail=detail))
        return JobOutcome("failed" if dead else "retry", study.study_instance_uid, job.revision, job.error)
