"""The bookkeeper: finds work that a dead worker or a lost message left behind and queues it again.

Brokers disagree on unacknowledged messages after a worker is killed (Redis redelivers after the visibility
timeout, kombu's SQLAlchemy transport never does), so the database decides. Each sweep:

- a ``running`` job whose heartbeat is older than ``pipeline.stale_after_seconds`` → queued again (its
  worker died mid-study);
- a ``queued`` job untouched for ``pipeline.requeue_after_seconds`` → its message is sent again (lost message);
- a ``failed`` (not yet dead) job → queued again after ``pipeline.failed_retry_seconds``;
- a delivery that is ``retrying`` and due → its study revision's delivery task is sent, once: the sweep stamps
  ``updated_at`` and sends again only if the row is still untouched ``pipeline.requeue_after_seconds`` later
  (a lost message), so a busy delivery queue is not filled with copies of the same task every sweep;
- a delivery that is ``pending``/``sending`` and untouched for ``pipeline.requeue_after_seconds`` → sent again.

Re-sending is safe because jobs and deliveries are idempotent and claimed in the database.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import or_, select, update

from worker.db import Delivery, DeliveryState, Job, JobKind, JobState, Study, utcnow
from worker.pipeline.jobs import Pipeline

log = logging.getLogger(__name__)


class Bookkeeper:
    """Periodic sweeps over jobs and deliveries (run by the node process)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        timing = pipeline.settings.pipeline
        self.interval = timing.sweep_seconds
        self.stale_after = dt.timedelta(seconds=timing.stale_after_seconds)
        self.requeue_after = dt.timedelta(seconds=timing.requeue_after_seconds)
        self.failed_retry = dt.timedelta(seconds=timing.failed_retry_seconds)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> dict[str, int]:
        """One pass; returns how many jobs and deliveries were re-queued."""
        now = utcnow()
        db = self.pipeline.db
        with db.session() as session:
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
                    continue
                if job.state == JobState.RUNNING:
                    log.warning("job %d of study %s lost its worker; queued again", job.id, study.study_instance_uid)
                job.state = JobState.QUEUED
                job.updated_at = now
                job_ids.append(job.id)
            due = session.execute(
                select(Study.study_instance_uid, Delivery.revision, Delivery.id)
                .join(Study, Study.id == Delivery.study_id)
                .where(Delivery.revision == Study.revision)
                .where(or_(
                    (Delivery.state == DeliveryState.RETRYING) & (Delivery.next_attempt_at <= now)
                    & ((Delivery.updated_at <= Delivery.next_attempt_at)
                       | (Delivery.updated_at < now - self.requeue_after)),
                    Delivery.state.in_((DeliveryState.PENDING, DeliveryState.SENDING))
                    & (Delivery.updated_at < now - self.requeue_after),
                ))
            ).all()
            stuck = [row.id for row in due]
            if stuck:
                session.execute(update(Delivery).where(Delivery.id.in_(stuck), Delivery.state == DeliveryState.SENDING)
                                .values(state=DeliveryState.RETRYING, next_attempt_at=Delivery.updated_at))
                session.execute(update(Delivery).where(Delivery.id.in_(stuck)).values(updated_at=now))
        for job_id in job_ids:
            self.pipeline.send_job(job_id)
        revisions = sorted({(row.study_instance_uid, row.revision) for row in due})
        for study_uid, revision in revisions:
            self.pipeline.send_delivery(study_uid, revision)
        return {"jobs": len(job_ids), "deliveries": len(revisions)}

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
