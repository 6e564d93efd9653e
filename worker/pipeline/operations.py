"""Operator actions behind the CLI: list jobs, retry, rerun and resend studies (each audited)."""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from sqlalchemy import select

from worker.celery_app import make_celery
from worker.config import Archive, Settings
from worker.db import Database, Delivery, DeliveryState, Job, JobState, Study
from worker.pipeline.jobs import Pipeline, PipelineError, originals_missing, study_by_uid


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


def rerun_studies(settings: Settings, uids: Sequence[str], progress: Console | None = None,
                  archive: str | None = None) -> list[str]:
    """Open a new revision of each study and queue its analysis. A study whose originals retention purged is
    first fetched back from the archive (``archive``, or the only ``[[archives]]`` entry): its instances, filed
    through the node's receive path, open the new revision themselves."""
    pipeline = pipeline_for(settings)
    lines = []
    try:
        for uid in uids:
            with pipeline.db.reading() as session:
                purged = originals_missing(session, study_by_uid(session, uid))
            if purged and settings.archives:
                lines.append(_rerun_from_archive(settings, pipeline.db, settings.archive(archive), uid, progress))
            else:
                lines.append(f"study {uid}: revision {pipeline.rerun(uid, actor=operator())} queued")
    finally:
        pipeline.db.dispose()
    return lines


def _rerun_from_archive(settings: Settings, db: Database, archive: Archive, uid: str,
                        console: Console | None) -> str:
    from worker.pipeline.retrieval import retrieve_for_rerun

    with _transfer(console, f"retrieving {uid} from {archive.name}") as advance:
        done = retrieve_for_rerun(settings, db, archive, uid, actor=operator(), progress=advance)
    return (f"study {uid}: {done.sent} instance(s) retrieved from {archive.name}; revision {done.revision} "
            "opened, analysed once the study is complete")


def fetch_studies(settings: Settings, archive_name: str | None, *, study_uid: str | None = None,
                  patient_id: str | None = None, since: dt.date | None = None,
                  console: Console | None = None) -> tuple[list[str], bool]:
    """Fetch studies from an archive for analysis (C-FIND, then C-GET or C-MOVE of each match). Studies
    whose originals are all stored here already are skipped. Returns the lines to print and whether every
    matching study was fetched (or already here)."""
    from worker.pipeline.retrieval import RetrievalError, find, retrieve_study

    archive = settings.archive(archive_name)
    db = Database(settings.database.url)
    lines: list[str] = []
    ok = True
    try:
        found = [m for m in find(settings, archive, study_instance_uid=study_uid, patient_id=patient_id, since=since)
                 if (study_uid is None or m.study_instance_uid == study_uid)
                 and (patient_id is None or (m.patient_id or "").strip() == patient_id.strip())]
        if not found:
            what = f"study {study_uid}" if study_uid else f"study of patient {patient_id}" + (
                f" since {since:%Y-%m-%d}" if since else "")
            raise RetrievalError(f"archive {archive.name} has no {what} (C-FIND found no match)")
        for match in found:
            uid = match.study_instance_uid
            with db.reading() as session:
                study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()
                here = study is not None and study.purged_at is None and (
                    study.patient_id or "").strip() == (match.patient_id or "").strip()
            if here:
                lines.append(f"study {uid}: already stored here, not fetched")
                continue
            try:
                with _transfer(console, f"fetching {uid}", match.instances) as advance:
                    done = retrieve_study(settings, db, archive, match, actor=operator(), progress=advance)
            except RetrievalError as exc:
                ok = False
                lines.append(f"study {uid}: FAILED: {exc}")
                continue
            lines.append(f"study {uid} (patient {done.patient_id or '?'}): {done.sent} instance(s) fetched from "
                         f"{archive.name}; analysed once complete")
    finally:
        db.dispose()
    return lines, ok


@contextlib.contextmanager
def _transfer(console: Console | None, description: str, total: int | None = None) -> Iterator[Any]:
    """A rich progress bar over the instances of one retrieve, advanced by the archive's pending responses."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)

        def advance(done: int, of: int | None) -> None:
            progress.update(task, completed=done, total=of if of is not None else total)

        yield advance


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
