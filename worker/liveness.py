"""Worker heartbeats and the stalled-pool watchdog; the readiness checks built on them.

Every Celery worker of the pipeline runs :class:`WorkerLiveness` (a worker bootstep) in its main process. Every
``pipeline.heartbeat_seconds`` it writes one :class:`~worker.db.WorkerHeartbeat` row: its queues, pool processes
and whether it is consuming. The row is removed when the worker stops, and ``/readyz`` reports a queue as
served only while a fresh row (younger than ``pipeline.stale_after_seconds``) says so.

The same thread watches the pool. When a prefork child is killed from outside (``kill -9``, the OOM killer)
while idle, Celery 5 / billiard starts a replacement but the pool may never hand it another task: messages are
received and then wait forever while the worker looks healthy. The watchdog sees a task received but not
started for ``pipeline.stale_after_seconds`` while the pool has a free process; the worker then reports that it
is not consuming and ends with exit status 1 (a cold shutdown: the wedged pool finishes nothing), so its
supervisor (``retinalgpt up``, systemd ``Restart=on-failure``, Docker ``restart:``, Kubernetes) starts a clean
one. The unacknowledged message is redelivered or re-sent by the bookkeeper; jobs are idempotent.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from worker.config import Settings
from worker.db import Database, WorkerHeartbeat, utcnow

log = logging.getLogger(__name__)

EXIT_STALLED = 1
_SHUTDOWN_GRACE_SECONDS = 10
FORGET_AFTER = dt.timedelta(days=1)
"""A worker that ended without removing its row (killed, or stopped because its pool stalled) keeps it, with
its last problem, for readiness to show; rows older than this are removed by the next heartbeat of any worker."""


def liveness_step(settings: Settings, queues: Sequence[str]) -> type[bootsteps.StartStopStep]:
    """The worker bootstep class for ``settings`` and ``queues`` (``app.steps["worker"].add(...)``)."""

    class WorkerLiveness(bootsteps.StartStopStep):
        requires = ("celery.worker.components:Pool",)

        def __init__(self, worker: Any, **kwargs: Any) -> None:
            super().__init__(worker, **kwargs)
            self.monitor: Monitor | None = None

        def start(self, worker: Any) -> None:
            self.monitor = Monitor(settings, worker, ",".join(queues))
            self.monitor.start()

        def stop(self, worker: Any) -> None:
            if self.monitor is not None:
                self.monitor.stop()

    return WorkerLiveness


class Monitor:
    """The heartbeat thread of one worker main process."""

    def __init__(self, settings: Settings, worker: Any, queues: str) -> None:
        self.settings = settings
        self.worker = worker
        self.queues = queues
        self.hostname = str(worker.hostname)
        self.db = Database(settings.database.url)
        self.stall_after = settings.pipeline.stale_after_seconds
        self._waiting_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-liveness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            with self.db.session() as session:
                session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.hostname == self.hostname))
        except Exception:  # noqa: BLE001 - a stopping worker must not fail on its heartbeat row
            log.exception("could not remove the heartbeat of %s", self.hostname)
        self.db.dispose()

    def stall(self, now: float) -> str | None:
        """Why the pool no longer takes tasks, or None. A task counts as waiting from the first time it is
        seen received but not started."""
        active = {request.id for request in list(worker_state.active_requests)}
        waiting = {request.id for request in list(worker_state.reserved_requests)} - active
        self._waiting_since = {task: self._waiting_since.get(task, now) for task in waiting}
        free = int(self.worker.concurrency) - len(active)
        stuck = [task for task, since in self._waiting_since.items() if now - since > self.stall_after]
        if stuck and free > 0:
            return (f"task {stuck[0]} received {self.stall_after:g} s ago and not started while {free} pool "
                    "process(es) are free: the pool stopped taking tasks (a pool process was killed?)")
        return None

    def beat(self, problem: str | None) -> None:
        processes = len(self.worker.pool.info.get("processes", ())) or int(self.worker.concurrency)
        now = utcnow()
        with self.db.session() as session:
            session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.updated_at < now - FORGET_AFTER))
            row = session.scalars(select(WorkerHeartbeat).where(WorkerHeartbeat.hostname == self.hostname)).first()
            if row is None:
                row = WorkerHeartbeat(hostname=self.hostname, started_at=now)
                session.add(row)
            row.queues, row.pid, row.processes = self.queues, os.getpid(), processes
            row.consuming, row.problem, row.updated_at = problem is None, problem, now

    def _run(self) -> None:
        interval = self.settings.pipeline.heartbeat_seconds
        while True:
            problem = self.stall(time.monotonic())
            try:
                self.beat(problem)
            except Exception:  # noqa: BLE001 - the next beat may well succeed (database restarting)
                log.exception("worker heartbeat failed")
            if problem is not None:
                log.error("%s: %s; exiting with status %d so the supervisor restarts this worker", self.hostname,
                          problem, EXIT_STALLED)
                worker_state.should_terminate = EXIT_STALLED  # cold shutdown: the stalled pool finishes nothing
                if not self._stop.wait(_SHUTDOWN_GRACE_SECONDS):
                    log.error("%s did not shut down in %d s; exiting now", self.hostname, _SHUTDOWN_GRACE_SECONDS)
                    os._exit(EXIT_STALLED)  # a wedged pool can block Celery's own shutdown
                return
            if self._stop.wait(interval):
                return


def queue_readiness(session: Session, queues: Sequence[str], stale_after: float) -> dict[str, str]:
    """``{"<queue>_workers": "ok" | why not}``: a queue is ready while a worker with a fresh heartbeat consumes
    it. The reason names the workers seen and what is wrong with each."""
    now = utcnow()
    fresh_after = now - dt.timedelta(seconds=stale_after)
    rows = session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.updated_at.desc())).all()
    checks: dict[str, str] = {}
    for queue in queues:
        serving = [r for r in rows if queue in r.queues.split(",")]
        if any(r.consuming and r.updated_at >= fresh_after for r in serving):
            checks[f"{queue}_workers"] = "ok"
            continue
        if not serving:
            checks[f"{queue}_workers"] = f"no {queue} worker is running (no heartbeat)"
            continue
        problems = []
        for row in serving[:3]:
            age = (now - row.updated_at).total_seconds()
            what = row.problem if not row.consuming else f"no heartbeat for {age:.0f} s"
            problems.append(f"{row.hostname}: {what}")
        checks[f"{queue}_workers"] = f"no {queue} worker consuming ({'; '.join(problems)})"
    return checks
