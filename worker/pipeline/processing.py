"""The inference job: analyse one study revision and store its :class:`StudyAnalysis` (DESIGN step 3).

A running job refreshes its row's ``updated_at`` every ``pipeline.heartbeat_seconds`` from a background thread; the
bookkeeper re-queues a ``running`` job whose heartbeat stopped (its worker died), whatever the broker did with
the message. The job is idempotent: a job that already succeeded, or that another live worker is running, is
skipped; storing the analysis replaces an earlier one of the same (study, revision, model).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update

from worker.config import Settings
from worker.db import Analysis, AuditEvent, Database, Instance, Job, JobState, Study, StudyState, utcnow
from worker.pipeline.delivery import results_folder
from worker.pipeline.jobs import move

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


class Heartbeat:
    """Touches a job's ``updated_at`` periodically while the job runs."""

    def __init__(self, db: Database, job_id: int, interval: float) -> None:
        self._db, self._job_id, self._interval = db, job_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                with self._db.session() as session:
                    session.execute(update(Job).where(Job.id == self._job_id).values(updated_at=utcnow()))
            except Exception:
                log.exception("heartbeat of job %d failed", self._job_id)


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
            return JobOutcome("skipped", study.study_instance_uid, job.revision, job.error)
        job.state, job.attempts, job.started_at, job.error = JobState.RUNNING, job.attempts + 1, utcnow(), None
        move(study, StudyState.PROCESSING)
        return study.study_instance_uid, job.revision


def _instance_paths(db: Database, study_instance_uid: str, revision: int) -> list[str]:
    """Analysable instances of the study up to this revision (a late instance adds to the earlier ones)."""
    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one()
        return list(session.scalars(
            select(Instance.path)
            .where(Instance.study_id == study.id, Instance.revision <= revision, Instance.analysable.is_(True))
            .order_by(Instance.instance_number, Instance.id)
        ))


def run_job(settings: Settings, db: Database, job_id: int) -> JobOutcome:
    """Analyse the study revision of ``job_id`` and store the result; failures are recorded on the job."""
    started = _start(settings, db, job_id)
    if isinstance(started, JobOutcome):
        log.info("job %d: %s", job_id, started.detail)
        return started
    study_uid, revision = started
    try:
        with Heartbeat(db, job_id, settings.pipeline.heartbeat_seconds):
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
                                               Analysis.model_name == name, Analysis.model_version == version))
        session.add(Analysis(study_id=study.id, revision=revision, model_name=name, model_version=version,
                             result=analysis.model_dump(mode="json")))
        job.state, job.finished_at = JobState.SUCCEEDED, utcnow()
        if study.revision == revision:
            move(study, StudyState.ANALYSED)
        session.add(AuditEvent(actor=ACTOR, action="study.analysed", study_instance_uid=study_uid,
                               detail={"job": job_id, "revision": revision, "images": len(analysis.images),
                                       "referral": analysis.referral.value, "model": f"{name} {version}".strip()}))
    return JobOutcome("analysed", study_uid, revision)


def _analyse(settings: Settings, db: Database, study_uid: str, revision: int) -> StudyResult:
    import numpy as np
    from PIL import Image

    from worker.pipeline.sources import SourceError, decode_limits, load_dicom
    from worker.runtime import analyzer

    sources, skipped = [], []
    for path in _instance_paths(db, study_uid, revision):
        try:
            sources.append(load_dicom(Path(path), decode_limits(settings)))
        except SourceError as exc:
            skipped.append(str(exc))
            log.warning("study %s: %s", study_uid, exc)
    if not sources:
        raise ValueError("no analysable image in the study" + (f" ({'; '.join(skipped)})" if skipped else ""))
    result = analyzer(settings).analyze(sources, revision=revision)
    result.analysis.notes.extend(f"Not analysed: {reason}" for reason in skipped)
    masks = results_folder(settings, study_uid, revision) / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    for uid, mask in result.vessel_masks.items():
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(masks / f"vessels-{uid}.png")
    return result


def _fail(settings: Settings, db: Database, job_id: int, exc: Exception) -> JobOutcome:
    from worker.runtime import ModelUnavailable

    permanent = isinstance(exc, (ModelUnavailable, ValueError))
    log.exception("job %d failed", job_id)
    with db.session() as session:
        job = session.get(Job, job_id)
        study = session.get(Study, job.study_id)
        job.error = f"{type(exc).__name__}: {exc}"[:2000]
        dead = permanent or job.attempts >= settings.pipeline.max_attempts
        job.state = JobState.DEAD if dead else JobState.FAILED
        job.finished_at = utcnow()
        if study.revision == job.revision:
            move(study, StudyState.FAILED if dead else StudyState.QUEUED)
        session.add(AuditEvent(actor=ACTOR, action="job.dead" if dead else "job.failed",
                               study_instance_uid=study.study_instance_uid,
                               detail={"job": job_id, "attempts": job.attempts, "error": job.error}))
        return JobOutcome("failed" if dead else "retry", study.study_instance_uid, job.revision, job.error)
