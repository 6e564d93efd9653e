"""The bookkeeper: finds work that a dead worker or a lost message left behind and queues it again, so that no
study sits in a state with nothing pending.

Brokers disagree on unacknowledged messages after a worker is killed (Redis redelivers after the visibility
timeout, kombu's SQLAlchemy transport never does), so the database decides. Each sweep:

- a ``running`` job whose heartbeat is older than ``pipeline.stale_after_seconds`` → queued again (its
  worker died mid-study);
- a ``queued`` job untouched for ``pipeline.requeue_after_seconds`` → its message is sent again (lost message);
- a ``failed`` (not yet dead) job → queued again after ``pipeline.failed_retry_seconds``;
- a delivery that is ``retrying`` and due → its study revision's delivery task is sent, once: the sweep stamps
  ``updated_at`` and sends again only if the row is still untouched ``pipeline.requeue_after_seconds`` later
  (a lost message), so a busy delivery queue is not filled with copies of the same task every sweep;
- a delivery that is ``pending`` and untouched for ``pipeline.requeue_after_seconds`` → sent again (the outbox:
  the analysis created it, its message was lost);
- a delivery that is ``sending`` whose lease (renewed by the sending worker every ``pipeline.heartbeat_seconds``)
  is older than ``pipeline.stale_after_seconds`` → its worker died mid-send: retried, or dead when that was its
  last allowed attempt. A slow destination keeps its lease and is never sent to twice;
- a study left ``complete``, ``queued`` or ``processing`` without a live job for its current revision, or
  ``analysed``/``delivering`` without an open delivery, for ``pipeline.requeue_after_seconds`` → its job is
  queued (or the study marked failed when the job is dead), or its delivery task sent;
- in shadow mode (issue 17 item 3), the current revision of a study analysed by the active model since the shadow
  version was set (the latest ``model.shadow`` audit event names it) and within :data:`SHADOW_WINDOW`, older than
  ``pipeline.requeue_after_seconds``, not a clinician's signed revision, without the shadow version's analysis →
  its shadow task is sent again at the lowest priority (its message was lost). Bounded: at most
  ``pipeline.shadow_resend_per_sweep`` a sweep, newest first; each revision at most ``pipeline.max_attempts``
  times by this process and not again within ``pipeline.requeue_after_seconds`` (a shadow analysis still waiting
  behind the studies' own work is not copied every sweep; one that keeps failing is given up).

Re-sending is safe because jobs and deliveries are idempotent and claimed in the database.

Every ``storage.retention_sweep_seconds`` (when ``storage.retain_days`` is set) it also runs the retention sweep
(:mod:`worker.pipeline.retention`): originals of delivered studies past the retention are deleted.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import aliased

from worker.db import (
    Analysis,
    AuditEvent,
    Delivery,
    DeliveryState,
    FailureReason,
    Instance,
    Job,
    JobKind,
    JobState,
    SignOff,
    Study,
    StudyState,
    utcnow,
)
from worker.pipeline.delivery import create_outbox
from worker.pipeline.jobs import Pipeline, move
from worker.pipeline.retention import PurgedStudy, purge_expired

log = logging.getLogger(__name__)

ACTOR = "bookkeeper"
LIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.FAILED)
OPEN_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.RETRYING)
SHADOW_WINDOW = dt.timedelta(days=1)
"""How far back the bookkeeper looks for analysed studies that lack their shadow analysis."""
SHADOW_SCAN = 500
"""Most candidate revisions read per sweep (newest first) before the per-sweep limit is applied."""
ShadowKey = tuple[str, int, str]
"""(Study Instance UID, revision, shadow model version)."""


class Bookkeeper:
    """Periodic sweeps over jobs, deliveries and studies (run by the node process)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        timing = pipeline.settings.pipeline
        self.interval = timing.sweep_seconds
        self.stale_after = dt.timedelta(seconds=timing.stale_after_seconds)
        self.requeue_after = dt.timedelta(seconds=timing.requeue_after_seconds)
        self.failed_retry = dt.timedelta(seconds=timing.failed_retry_seconds)
        self.retention_interval = pipeline.settings.storage.retention_sweep_seconds
        self._next_retention = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shadow_sent: dict[ShadowKey, tuple[int, float]] = {}
        """Shadow tasks this process sent again: key → (times, monotonic time of the last)."""

    def sweep(self) -> dict[str, int]:
        """One pass; returns how many jobs, study revisions' deliveries and shadow analyses were (re-)queued."""
        job_ids = self._jobs()
        revisions = self._deliveries()
        enqueue, deliver = self._studies()
        shadows = self._shadows()
        for job_id in job_ids:
            self.pipeline.send_job(job_id)
        for study_uid, revision in enqueue:
            self.pipeline.enqueue(study_uid, revision, actor=ACTOR)
        revisions = sorted(set(revisions) | set(deliver))
        for study_uid, revision in revisions:
            self.pipeline.send_delivery(study_uid, revision)
        for study_uid, revision, version in shadows:
            log.warning("study %s revision %d has no shadow analysis by %s; sending its shadow task again",
                        study_uid, revision, version)
            self.pipeline.send_shadow(study_uid, revision, version)
        return {"jobs": len(job_ids) + len(enqueue), "deliveries": len(revisions), "shadows": len(shadows)}

    def retention_sweep(self) -> list[PurgedStudy]:
        """Delete originals past ``storage.retain_days`` (nothing when it is unset)."""
        return purge_expired(self.pipeline.db, self.pipeline.settings)

    def _jobs(self) -> list[int]:
        now = utcnow()
        with self.pipeline.db.session() as session:
            stale = session.scalars(select(Job).where(
                Job.kind == JobKind.ANALYSIS,
                or_(
                    (Job.state == JobState.RUNNING) & (Job.updated_at < now - self.stale_after),
                    (Job.state == JobState.QUEUED) & (Job.updated_at < now - self.requeue_after),
                    (Job.state == JobState.FAILED) & (Job.updated_at < now - self.failed_retry),
                ),
            ).with_for_update()).all()
            job_ids = []
            for job in stale:
                study = session.get(Study, job.study_id)
                if study.revision != job.revision:
                    job.state, job.error = JobState.DEAD, f"superseded by revision {study.revision}"
                    job.failure = FailureReason.SUPERSEDED
                    continue
                if job.state == JobState.RUNNING:
                    log.warning("job %d of study %s lost its worker; queued again", job.id, study.study_instance_uid)
                job.state = JobState.QUEUED
                job.updated_at = now
                job_ids.append(job.id)
        return job_ids

    def _deliveries(self) -> list[tuple[str, int]]:
        now = utcnow()
        settings = self.pipeline.settings
        with self.pipeline.db.session() as session:
            current = Delivery.revision == Study.revision
            due = session.execute(
                select(Study.study_instance_uid, Delivery.revision, Delivery.id)
                .join(Study, Study.id == Delivery.study_id)
                .where(current)
                .where(or_(
                    (Delivery.state == DeliveryState.RETRYING) & (Delivery.next_attempt_at <= now)
                    & ((Delivery.updated_at <= Delivery.next_attempt_at)
                       | (Delivery.updated_at < now - self.requeue_after)),
                    (Delivery.state == DeliveryState.PENDING) & (Delivery.updated_at < now - self.requeue_after),
                ))
            ).all()
            revisions = {(row.study_instance_uid, row.revision) for row in due}
            if due:
                session.execute(update(Delivery).where(Delivery.id.in_([row.id for row in due]))
                                .values(updated_at=now))
            lost = session.execute(
                select(Delivery, Study.study_instance_uid)
                .join(Study, Study.id == Delivery.study_id)
                .where(current, Delivery.state == DeliveryState.SENDING, Delivery.updated_at < now - self.stale_after)
                .with_for_update(of=Delivery)
            ).all()
            for row, study_uid in lost:
                detail = f"the worker sending attempt {row.attempts} stopped renewing its lease (died or hangs)"
                destination = next((d for d in settings.destinations if d.name == row.destination), None)
                if destination is None or row.attempts >= destination.max_attempts:
                    row.state, row.failure, row.last_error = DeliveryState.DEAD, FailureReason.ATTEMPTS_EXHAUSTED, detail
                    session.add(AuditEvent(actor=ACTOR, action="delivery.dead", study_instance_uid=study_uid,
                                           detail={"destination": row.destination, "object": row.object_kind.value,
                                                   "revision": row.revision, "attempts": row.attempts,
                                                   "reason": FailureReason.ATTEMPTS_EXHAUSTED.value,
                                                   "detail": detail}))
                    log.warning("delivery %d of study %s to %s: %s; no attempt left: dead", row.id, study_uid,
                                row.destination, detail)
                else:
                    row.state, row.last_error, row.next_attempt_at = DeliveryState.RETRYING, detail, now
                    log.warning("delivery %d of study %s to %s: %s; retrying", row.id, study_uid, row.destination,
                                detail)
                row.updated_at = now
                revisions.add((study_uid, row.revision))
        return sorted(revisions)

    def _studies(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Studies with nothing pending: (revisions to enqueue, revisions to deliver)."""
        cutoff = utcnow() - self.requeue_after
        current_job = and_(Job.study_id == Study.id, Job.revision == Study.revision, Job.kind == JobKind.ANALYSIS)
        analysable = exists().where(Instance.study_id == Study.id, Instance.revision <= Study.revision,
                                    Instance.analysable.is_(True))
        enqueue: list[tuple[str, int]] = []
        deliver: list[tuple[str, int]] = []
        with self.pipeline.db.session() as session:
            waiting = session.scalars(select(Study).where(
                Study.state.in_((StudyState.COMPLETE, StudyState.QUEUED, StudyState.PROCESSING)),
                Study.updated_at < cutoff, analysable,
                ~exists().where(current_job, Job.state.in_(LIVE_JOB_STATES)),
            ).with_for_update()).all()
            for study in waiting:
                states = set(session.scalars(select(Job.state).where(
                    Job.study_id == study.id, Job.revision == study.revision, Job.kind == JobKind.ANALYSIS)))
                if JobState.SUCCEEDED in states:
                    move(study, StudyState.ANALYSED)
                    create_outbox(session, self.pipeline.settings, study, study.revision)
                    deliver.append((study.study_instance_uid, study.revision))
                elif JobState.DEAD in states:
                    move(study, StudyState.FAILED)
                    session.add(AuditEvent(actor=ACTOR, action="study.failed",
                                           study_instance_uid=study.study_instance_uid,
                                           detail={"revision": study.revision, "reason": "its analysis job is dead"}))
                else:
                    log.warning("study %s revision %d is %s with no analysis job; queueing it",
                                study.study_instance_uid, study.revision, study.state.value)
                    enqueue.append((study.study_instance_uid, study.revision))
            undelivered = session.scalars(select(Study).where(
                Study.state.in_((StudyState.ANALYSED, StudyState.DELIVERING)),
                Study.updated_at < cutoff,
                ~exists().where(Delivery.study_id == Study.id, Delivery.revision == Study.revision,
                                Delivery.state.in_(OPEN_DELIVERY_STATES)),
            ).with_for_update()).all()
            for study in undelivered:
                log.warning("study %s revision %d is %s with no open delivery; sending its delivery task",
                            study.study_instance_uid, study.revision, study.state.value)
                study.updated_at = utcnow()
                deliver.append((study.study_instance_uid, study.revision))
        return enqueue, deliver

    def _shadows(self) -> list[ShadowKey]:
        """Revisions whose shadow analysis message was lost (see the module docstring), to send again."""
        from model.registry import ModelRegistry, RegistryError

        settings = self.pipeline.settings
        limit = settings.pipeline.shadow_resend_per_sweep
        if limit == 0 or not settings.model.enabled:
            return []
        try:
            candidate = ModelRegistry(settings.model.registry).shadow()
        except RegistryError:
            log.exception("cannot read the shadow model version")
            return []
        if candidate is None:
            self._shadow_sent.clear()
            return []
        version = candidate.version
        now = utcnow()
        shadow = aliased(Analysis)
        with self.pipeline.db.reading() as session:
            chosen = session.scalars(select(AuditEvent).where(AuditEvent.action == "model.shadow")
                                     .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(1)).first()
            if chosen is None or (chosen.detail or {}).get("version") != version:
                return []  # not set through `retinalgpt model shadow`: no known start to bound the search
            rows = session.execute(
                select(Study.study_instance_uid, Analysis.revision)
                .join(Study, Study.id == Analysis.study_id)
                .where(Analysis.revision == Study.revision, Analysis.shadow.is_(False),
                       Analysis.superseded.is_(False), Analysis.model_version != version,
                       Analysis.created_at >= max(chosen.at, now - SHADOW_WINDOW),
                       Analysis.created_at < now - self.requeue_after,
                       ~exists().where(SignOff.study_id == Analysis.study_id, SignOff.revision == Analysis.revision),
                       ~exists().where(shadow.study_id == Analysis.study_id, shadow.revision == Analysis.revision,
                                       shadow.shadow.is_(True), shadow.model_version == version))
                .order_by(Analysis.created_at.desc(), Analysis.id.desc()).limit(SHADOW_SCAN)
            ).all()
        keys = list(dict.fromkeys((uid, revision, version) for uid, revision in rows))
        current = set(keys)
        self._shadow_sent = {key: sent for key, sent in self._shadow_sent.items() if key in current}
        clock, wait = time.monotonic(), self.requeue_after.total_seconds()
        due: list[ShadowKey] = []
        for key in keys:
            times, last = self._shadow_sent.get(key, (0, -wait))
            if times >= settings.pipeline.max_attempts or clock - last < wait:
                continue
            self._shadow_sent[key] = (times + 1, clock)
            due.append(key)
            if len(due) == limit:
                break
        return due

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bookkeeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception:
                log.exception("bookkeeper sweep failed")
            if self.pipeline.settings.storage.retain_days is not None and time.monotonic() >= self._next_retention:
                self._next_retention = time.monotonic() + self.retention_interval
                try:
                    self.retention_sweep()
                except Exception:
                    log.exception("retention sweep failed")
