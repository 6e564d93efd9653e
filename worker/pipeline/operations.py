"""Operator actions behind the CLI: list jobs, retry, rerun and resend studies (each audited)."""

from __future__ import annotations

import getpass
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.progress import Progress
from sqlalchemy import select

from worker.celery_app import make_celery
from worker.config import Settings
from worker.db import Database, Delivery, DeliveryState, Job, JobState, Study
from worker.pipeline.jobs import Pipeline, PipelineError


def operator() -> str:
    return f"cli:{getpass.getuser()}"


def pipeline_for(settings: Settings) -> Pipeline:
    return Pipeline(settings, Database(settings.database.url), make_celery(settings))


def list_jobs(settings: Settings, *, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Analysis jobs and deliveries as one list, newest first (``state`` filters both)."""
    db = Database(settings.database.url)
    rows: list[dict[str, Any]] = []
    try:
        with db.reading() as session:
            jobs = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)
            deliveries = select(Delivery, Study.study_instance_uid).join(Study, Study.id == Delivery.study_id)
            if state:
                jobs, deliveries = jobs.where(Job.state == state), deliveries.where(Delivery.state == state)
            for job, uid in session.execute(jobs.order_by(Job.updated_at.desc()).limit(limit)):
                rows.append({"kind": f"job:{job.kind.value}", "id": job.id, "study_instance_uid": uid,
                             "revision": job.revision, "target": f"{job.model_name} {job.model_version}".strip(),
                             "state": job.state.value, "attempts": job.attempts,
                             "updated_at": job.updated_at.isoformat(), "error": job.error,
                             "reason": job.failure.value if job.failure else None})
            for delivery, uid in session.execute(deliveries.order_by(Delivery.updated_at.desc()).limit(limit)):
                rows.append({"kind": f"delivery:{delivery.object_kind.value}", "id": delivery.id,
                             "study_instance_uid": uid, "revision": delivery.revision,
                             "target": delivery.destination, "state": delivery.state.value,
                             "attempts": delivery.attempts, "updated_at": delivery.updated_at.isoformat(),
                             "error": delivery.last_error,
                             "reason": delivery.failure.value if delivery.failure else None})
    finally:
        db.dispose()
    rows.sort(key=lambda r: r["updated_at"], reverse=True)
    return rows[:limit]


def _bulk(items: Sequence[Any], description: str, console: Console | None) -> Iterator[Any]:
    with Progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=len(items))
        for item in items:
            yield item
            progress.advance(task)


def retry_jobs(settings: Settings, ids: Sequence[int], progress: Console | None = None) -> list[str]:
    """Retry the given jobs, or every failed/dead job and every study with dead deliveries."""
    pipeline = pipeline_for(settings)
    lines: list[str] = []
    try:
        with pipeline.db.session() as session:
            job_ids = list(ids) or list(session.scalars(select(Job.id).where(
                Job.state.in_((JobState.FAILED, JobState.DEAD)))))
            dead = [] if ids else sorted(set(session.scalars(
                select(Study.study_instance_uid).join(Delivery, Delivery.study_id == Study.id)
                .where(Delivery.state == DeliveryState.DEAD, Delivery.revision == Study.revision))))
        for job_id in _bulk(job_ids, "retrying jobs", progress):
            try:
                pipeline.retry_job(job_id, actor=operator())
                lines.append(f"job {job_id}: queued")
            except PipelineError as exc:
                if ids:
                    raise
                lines.append(f"job {job_id}: skipped ({exc})")
        for study_uid in _bulk(dead, "re-sending dead deliveries", progress):
            revision = pipeline.resend(study_uid, actor=operator())
            lines.append(f"study {study_uid} revision {revision}: deliveries queued")
    finally:
        pipeline.db.dispose()
    return lines or ["nothing to retry"]


def rerun_studies(settings: Settings, uids: Sequence[str], progress: Console | None = None) -> list[str]:
    """Open a new revision of each study and queue its analysis."""
    return _per_study(settings, uids, "rerun", progress)


def resend_studies(settings: Settings, uids: Sequence[str], progress: Console | None = None) -> list[str]:
    """Queue the current results of each study for delivery again."""
    return _per_study(settings, uids, "resend", progress)


def _per_study(settings: Settings, uids: Sequence[str], action: str, progress: Console | None) -> list[str]:
    pipeline = pipeline_for(settings)
    act = {"rerun": pipeline.rerun, "resend": pipeline.resend}[action]
    queued = {"rerun": "queued", "resend": "deliveries queued"}[action]
    try:
        return [f"study {uid}: revision {act(uid, actor=operator())} {queued}"
                for uid in _bulk(uids, f"queueing {action}s", progress)]
    finally:
        pipeline.db.dispose()
