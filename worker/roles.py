"""The long-running roles (DESIGN "one process per role"): node, worker, and ``up`` which runs them all.

- **node**: the DICOM listener, its completion tracker wired to the pipeline (a completed study revision is
  queued for inference) and the bookkeeper that re-queues work a dead worker or a lost message left behind.
- **worker**: a Celery worker for the ``inference`` and/or ``delivery`` queues. Inference runs in a prefork
  pool (one model per process, prefetch 1), delivery in a thread pool (it waits on the network).
- **up**: every role as a child process of one supervisor, for the embedded default. SIGINT/SIGTERM stop the
  children in order and wait for them; children die with the supervisor (``PR_SET_PDEATHSIG``) so nothing is
  orphaned even if the supervisor is killed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worker.celery_app import DELIVERY_QUEUE, INFERENCE_QUEUE, QUEUES, make_celery
from worker.config import Settings

if TYPE_CHECKING:
    from worker.ingest import RunningNode
    from worker.pipeline.bookkeeper import Bookkeeper

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


@dataclass
class NodeRole:
    """A running node role; :meth:`stop` shuts down bookkeeper, listener and database in that order."""

    running: RunningNode
    bookkeeper: Bookkeeper

    @property
    def port(self) -> int:
        return self.running.listener.port

    def stop(self) -> None:
        self.bookkeeper.stop()
        self.running.stop()


def start_node_role(settings: Settings) -> NodeRole:
    """Start listener + pipeline completion callback + bookkeeper (the database must be migrated)."""
    from worker.db import Database
    from worker.ingest import start_node
    from worker.pipeline.bookkeeper import Bookkeeper
    from worker.pipeline.jobs import Pipeline

    db = Database(settings.database.url, echo=settings.database.echo)
    pipeline = Pipeline(settings, db, make_celery(settings))
    running = start_node(settings, pipeline.study_complete, db=db)
    bookkeeper = Bookkeeper(pipeline)
    bookkeeper.start()
    return NodeRole(running, bookkeeper)


def parse_queues(value: str) -> list[str]:
    queues = [q.strip() for q in value.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUES]
    if not queues or unknown:
        raise ValueError(f"--queues must list {' and/or '.join(QUEUES)}, got {value!r}")
    return queues


def run_worker(settings: Settings, queues: Sequence[str], concurrency: int | None = None) -> None:
    """Run a Celery worker for ``queues`` in this process until it is told to stop."""
    from worker.liveness import liveness_step
    from worker.pipeline.tasks import register_tasks

    app = make_celery(settings)
    register_tasks(app, settings)
    app.steps["worker"].add(liveness_step(settings, queues))
    inference = INFERENCE_QUEUE in queues
    pool = "prefork" if inference else "threads"
    workers = concurrency or (1 if inference and DELIVERY_QUEUE not in queues else 2 if inference else 4)
    name = "+".join(queues)
    log.info("%s worker: %s pool × %d on %s, broker %s", name, pool, workers, ",".join(queues),
             app.connection_for_read().as_uri())
    app.worker_main([  # --quiet: this line, not Celery's ASCII-art banner, says what the worker runs
        "--quiet", "worker", "--queues", ",".join(queues), "--pool", pool, "--concurrency", str(workers),
        "--hostname", f"{name}-{os.getpid()}@{socket.gethostname()}", "--loglevel", settings.log_level,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ])


def _die_with_parent() -> None:
    """In a child: receive SIGTERM when the parent process dies (Linux ``prctl``)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    process: subprocess.Popen


class Supervisor:
    """Runs role commands as children; stops them on SIGINT/SIGTERM or when one of them exits."""

    def __init__(self, config: Path | None, roles: Sequence[tuple[str, list[str]]]) -> None:
        self.config = config
        self.roles = roles
        self.children: list[Child] = []
        self._stop = threading.Event()

    def _command(self, args: list[str]) -> list[str]:
        command = [sys.executable, "-c", "from worker.cli.app import main; main()", *args]
        return command + (["--config", str(self.config)] if self.config else [])

    def start(self) -> None:
        for name, args in self.roles:
            process = subprocess.Popen(self._command(args), preexec_fn=_die_with_parent)  # noqa: PLW1509
            self.children.append(Child(name, process))
            log.info("started %s (pid %d)", name, process.pid)

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def wait(self) -> int:
        """Block until asked to stop or a child exits; then stop every child. Returns the exit status."""
        status = 0
        while not self._stop.wait(0.5):
            exited = [c for c in self.children if c.process.poll() is not None]
            if exited:
                for child in exited:
                    log.error("%s exited with status %s; stopping everything", child.name, child.process.returncode)
                status = 1
                break
        self.stop()
        return status

    def stop(self, timeout: float = 30.0) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", child.name, timeout)
                child.process.kill()
                child.process.wait()


def up_roles(with_api: bool) -> list[tuple[str, list[str]]]:
    roles = [
        ("node", ["node"]),
        ("inference worker", ["worker", "--queues", INFERENCE_QUEUE]),
        ("delivery worker", ["worker", "--queues", DELIVERY_QUEUE]),
    ]
    if with_api:
        roles.append(("api", ["api"]))
    return roles
