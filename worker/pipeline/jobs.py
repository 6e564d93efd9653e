"""The database side of the pipeline: enqueueing study revisions, rerun, resend, retry.

Every entry point is idempotent per (study, revision, model): the job row is unique on that key, so a second
completion callback, a redelivered message or a bookkeeper re-enqueue finds the existing job instead of
creating work twice. Every operator action is written to the audit trail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from worker.celery_app import DELIVER_STUDY, PROCESS_STUDY, SHADOW_STUDY, analysis_priority, shadow_priority
from worker.config import Settings
from worker.db import (
    Analysis,
    AuditEvent,
    Database,
    Delivery,
    DeliveryObject,
    DeliveryState,
    Instance,
    Job,
    JobKind,
    JobState,
    Study,
    StudyState,
    check_transition,
    utcnow,
)

log = logging.getLogger(__name__)


class PipelineError(ValueError):
    """An operator request that cannot be done (unknown study, wrong state); one-line message."""


def move(study: Study, target: StudyState) -> None:
    """Change the study's state through the state machine (no-op when already there)."""
    if study.state != target:
        check_transition(study.state, target)
        study.state = target


def model_key(settings: Settings) -> tuple[str, str]:
    """(name, version) of the model the inference workers run, read from its ``retinalgpt.json`` without
    loading it; ``("measurement-only", "")`` when RetinalGPT is disabled or no model is available."""
    from worker.runtime import model_directory

    try:
        path = model_directory(settings)
    except (ValueError, OSError) as exc:  # a broken registry must not stop ingest: the job reports it
        log.warning("cannot resolve the active model: %s", exc)
        path = None
    if path is None:
        return ("measurement-only", "")
    from model.checkpoint import read_metadata

    try:
        meta = read_metadata(path)
    except (ValueError, OSError) as exc:
        log.warning("cannot read model metadata in %s: %s", path, exc)
        return (path.name, "unreadable")
    return (meta.name, meta.version)


def study_by_uid(session: Session, study_instance_uid: str, *, lock: bool = False) -> Study:
    query = select(Study).where(Study.study_instance_uid == study_instance_uid)
    study = session.scalars(query.with_for_update() if lock else query).one_or_none()
    if study is None:
        raise PipelineError(f"no study {study_instance_uid}")
    return study


def originals_missing(session: Session, study: Study) -> bool:
    """True when retention purged the study and none of its analysable originals is stored any more."""
    return study.purged_at is not None and not session.scalars(select(Instance.id).where(
        Instance.study_id == study.id, Instance.analysable.is_(True), Instance.purged_at.is_(None))).first()


@dataclass
class Pipeline:
    """Enqueues work for study revisions on Celery and records it in the database."""

    settings: Settings
    db: Database
    celery: Celery

    def study_complete(self, study_instance_uid: str, revision: int) -> None:
        """The listener's completion callback: queue the analysis of this revision."""
        self.enqueue(study_instance_uid, revision, actor="dicom-node")

    def enqueue(self, study_instance_uid: str, revision: int, *, actor: str) -> int | None:
        """Create (or find) the analysis job of a revision and send it to the ``inference`` queue."""
        name, version = model_key(self.settings)
        with self.db.session() as session:
            study = study_by_uid(session, study_instance_uid, lock=True)
            if study.revision != revision:
                log.info("study %s revision %d superseded by %d; not queued", study_instance_uid, revision,
                         study.revision)
                return None
            job = session.scalars(select(Job).where(
                Job.study_id == study.id, Job.revision == revision, Job.model_name == name,
                Job.model_version == version, Job.kind == JobKind.ANALYSIS)).one_or_none()
            if job is not None and job.state in (JobState.SUCCEEDED, JobState.RUNNING):
                return job.id
            if job is None:
                job = Job(study_id=study.id, revision=revision, model_name=name, model_version=version,
                          kind=JobKind.ANALYSIS, state=JobState.QUEUED)
                session.add(job)
            job.state, job.error, job.failure = JobState.QUEUED, None, None
            move(study, StudyState.QUEUED)
            session.flush()
            session.add(AuditEvent(actor=actor, action="job.queued", study_instance_uid=study_instance_uid,
                                   detail={"job": job.id, "revision": revision, "model": f"{name} {version}"}))
            job_id = job.id
        self.send_job(job_id)
        return job_id

    def send_job(self, job_id: int) -> None:
        """Send the analysis task of a job, with the priority its study was routed with (``route``)."""
        with self.db.reading() as session:
            route = session.scalar(select(Study.route).join(Job, Job.study_id == Study.id).where(Job.id == job_id))
        urgent = bool(route) and route.get("priority") == "urgent"
        priority = analysis_priority(self.settings.broker.url, urgent)
        options = {} if priority is None else {"priority": priority}
        result = self.celery.send_task(PROCESS_STUDY, kwargs={"job_id": job_id}, **options)
        with self.db.session() as session:
            session.execute(update(Job).where(Job.id == job_id).values(celery_task_id=result.id, updated_at=utcnow()))

    def send_delivery(self, study_instance_uid: str, revision: int) -> None:
        self.celery.send_task(DELIVER_STUDY, kwargs={"study_instance_uid": study_instance_uid, "revision": revision})

    def send_shadow(self, study_instance_uid: str, revision: int, version: str) -> None:
        """Send the shadow candidate ``version``'s analysis of a study revision at the lowest priority
        (:func:`worker.celery_app.shadow_priority`); the task skips work already stored."""
        priority = shadow_priority(self.settings.broker.url)
        self.celery.send_task(SHADOW_STUDY, kwargs={"study_instance_uid": study_instance_uid, "revision": revision,
                                                    "version": version},
                              **({} if priority is None else {"priority": priority}))

    def rerun(self, study_instance_uid: str, *, actor: str) -> int:
        """Open a new revision of a study (superseding the old results) and queue its analysis."""
        with self.db.session() as session:
            study = study_by_uid(session, study_instance_uid, lock=True)
            if study.state in (StudyState.RECEIVING, StudyState.COMPLETE):
                raise PipelineError(f"study {study_instance_uid} is still {study.state}; nothing to rerun yet")
            if study.state == StudyState.NOT_APPLICABLE:
                raise PipelineError(f"study {study_instance_uid} is not_applicable: it has no analysable image")
            if originals_missing(session, study):
                raise PipelineError(
                    f"the originals of study {study_instance_uid} were deleted on {study.purged_at:%Y-%m-%d} "
                    "(storage.retain_days); fetch them back from an [[archives]] peer (`studies rerun` does when "
                    "one is configured) or send them again before re-running it")
            study.revision += 1
            study.state = StudyState.COMPLETE
            session.execute(update(Analysis).where(Analysis.study_id == study.id).values(superseded=True))
            session.add(AuditEvent(actor=actor, action="study.rerun", study_instance_uid=study_instance_uid,
                                   detail={"revision": study.revision}))
            revision = study.revision
        self.enqueue(study_instance_uid, revision, actor=actor)
        return revision

    def resend(self, study_instance_uid: str, *, actor: str) -> int:
        """Send the current revision's results again to every destination (dead deliveries included)."""
        with self.db.session() as session:
            study = study_by_uid(session, study_instance_uid, lock=True)
            has_analysis = session.scalars(select(Analysis.id).where(
                Analysis.study_id == study.id, Analysis.revision == study.revision,
                Analysis.shadow.is_(False))).first()
            originals = session.scalars(select(Delivery.id).where(
                Delivery.study_id == study.id, Delivery.revision == study.revision,
                Delivery.object_kind == DeliveryObject.ORIGINALS)).first()
            if has_analysis is None and originals is None:
                raise PipelineError(f"study {study_instance_uid} revision {study.revision} has no results to send")
            session.execute(update(Delivery).where(Delivery.study_id == study.id, Delivery.revision == study.revision)
                            .values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=utcnow(),
                                    last_error=None, failure=None))
            if has_analysis is not None:
                move(study, StudyState.DELIVERING)  # else only its forwarded originals are sent again
            session.add(AuditEvent(actor=actor, action="study.resend", study_instance_uid=study_instance_uid,
                                   detail={"revision": study.revision}))
            revision = study.revision
        self.send_delivery(study_instance_uid, revision)
        return revision

    def retry_job(self, job_id: int, *, actor: str) -> None:
        """Queue a failed or dead job again."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise PipelineError(f"no job {job_id}")
            if job.state not in (JobState.FAILED, JobState.DEAD):
                raise PipelineError(f"job {job_id} is {job.state}; only failed or dead jobs are retried")
            study = session.get(Study, job.study_id)
            if study.revision != job.revision:
                raise PipelineError(f"job {job_id} is for superseded revision {job.revision}")
            job.state, job.error, job.attempts, job.failure = JobState.QUEUED, None, 0, None
            move(study, StudyState.QUEUED)
            session.add(AuditEvent(actor=actor, action="job.retry", study_instance_uid=study.study_instance_uid,
                                   detail={"job": job_id}))
        self.send_job(job_id)
