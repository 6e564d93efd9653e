"""Celery time limits of the pipeline tasks (``task_time_limit`` per task) and what a timed-out analysis does.

A hung decoder, a stalled shared-storage read or a model call that never returns must not hold a study
forever: its job's heartbeat thread would keep the row "alive" and the bookkeeper would never step in. Each
task therefore has a hard time limit. When it expires, the prefork pool kills the process running the task and
starts a new one, and the worker's main process calls the task's ``on_failure`` with ``TimeLimitExceeded``:
the analysis attempt is then recorded as failed, like any other failure, so it is retried after
``pipeline.failed_retry_seconds`` and goes to the dead-letter state after ``pipeline.max_attempts``.

No soft limit is set: a soft limit raises an exception wherever the task happens to be, and the broad
``except Exception`` that turns an undecodable image into a per-image "not analysed" note would turn a
timeout into a wrong permanent result. The hard limit cannot be swallowed. Celery's thread pool (a worker
serving only the delivery queue) does not enforce time limits; there every network operation is bounded by
the destination's ``timeout`` instead.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import TimeLimitExceeded

from worker.config import Settings
from worker.db import Database, Job, JobState

log = logging.getLogger(__name__)


def analysis_options(settings: Settings) -> dict[str, Any]:
    return {"time_limit": settings.pipeline.analysis_time_limit_seconds}


def delivery_options(settings: Settings) -> dict[str, Any]:
    return {"time_limit": settings.pipeline.delivery_time_limit_seconds}


def chat_options(settings: Settings) -> dict[str, Any]:
    """A chat answer is of no use once the API stopped waiting for it."""
    return {"time_limit": settings.api.chat_timeout_seconds}


def record_timeout(settings: Settings, db: Database, job_id: int, exc: BaseException) -> None:
    """In the worker's main process, after the pool killed a timed-out analysis: fail the attempt (retry or
    dead letter by the usual policy). A job that is no longer running (it finished just before) is left alone."""
    from worker.pipeline.processing import _fail

    if not isinstance(exc, TimeLimitExceeded):
        return
    with db.session() as session:
        job = session.get(Job, job_id)
        running = job is not None and job.state == JobState.RUNNING
    if not running:
        return
    limit = settings.pipeline.analysis_time_limit_seconds
    log.error("job %d exceeded the analysis time limit of %g s; its pool process was killed", job_id, limit)
    _fail(settings, db, job_id, TimeLimitExceeded(f"analysis exceeded the time limit of {limit:g} s "
                                                  "(pipeline.analysis_time_limit_seconds)"))
