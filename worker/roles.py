"""The long-running roles (DESIGN "one process per role"): node, worker, and ``up`` which runs them all.

- **node**: the DICOM listener, its completion tracker wired to the pipeline (a completed study revision is
  queued for inference) and the bookkeeper that re-queues work a dead worker or a lost message left behind.
- **worker**: a Celery worker for the ``inference`` and/or ``delivery`` queues. Inference runs in a prefork
  pool (one model per process, prefetch 1), delivery in a thread pool (it waits on the network).
- **up**: every role as a child process of one supervisor, for the embedded default. A child that exits is
  restarted with backoff; one that keeps failing right after its start ends ``up`` with status 1.
  SIGINT/SIGTERM stop the children in order and wait for them; children die with the supervisor
  (``PR_SET_PDEATHSIG``) so nothing is orphaned even if the supervisor is killed.
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
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc <malloc.h> mallopt parameters
IMAGE_BUFFER_MMAP_BYTES = 4 << 20
MALLOC_ARENAS = 2


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
    running = start_node(settings, pipeline.study_complete, db=db, on_forward=pipeline.send_delivery)
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
    if inference:
        _return_image_buffers_to_the_system()
        _load_the_analyzer_when_a_pool_process_starts(settings)
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


def _return_image_buffers_to_the_system() -> None:
    """Make the inference processes (forked after this) give each study's image buffers back to the system.

    glibc's ``mallopt(3)``: by default the threshold above which an allocation is a private mapping rises to
    the largest block freed (up to 32 MiB), so after the first study decoded images and masks live in the heap
    of whichever arena the measuring thread got and stay resident; a study measured on another arena then adds
    its whole working set to the process. A fixed ``M_MMAP_THRESHOLD`` (which turns the rise off) maps every
    buffer over 4 MiB and unmaps it when freed; ``M_ARENA_MAX`` caps the per-thread heaps. Without glibc this
    does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, IMAGE_BUFFER_MMAP_BYTES)
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        log.warning("cannot set the malloc thresholds of the inference processes (no glibc)")


def _load_the_analyzer_when_a_pool_process_starts(settings: Settings) -> None:
    """Each inference pool process loads the measurement pipeline and RetinalGPT as soon as it starts, in a
    thread (Celery waits only a few seconds for a new pool process to report), instead of on its first study:
    the first study after a start or a restart of the worker no longer waits for the model. A first task that
    arrives earlier waits for the same load (:func:`worker.runtime.analyzer` holds a lock); a load that fails is
    logged here and fails that study with its reason as before."""
    from celery.signals import worker_process_init

    def load() -> None:
        from worker.runtime import analyzer

        try:
            analyzer(settings)
        except Exception:  # noqa: BLE001 -- the job that needs it records the same failure on the study
            log.exception("loading the analyzer at pool process start failed; the first study will retry it")

    def start(**_: object) -> None:
        threading.Thread(target=load, name="analyzer-preload", daemon=True).start()

    worker_process_init.connect(start, weak=False)


def _die_with_parent() -> None:
    """In a child: receive SIGTERM when the parent process dies (Linux ``prctl``)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    """One supervised role: its command and its current process (None while it waits to be restarted)."""

    name: str
    args: list[str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None


class Supervisor:
    """Runs role commands as children and keeps them running (``retinalgpt up``).

    A child that exits (killed, crashed, or a worker that stopped because its pool stalled) is restarted after
    a backoff: ``backoff`` seconds, doubled for each further exit within ``stable_after`` seconds of its start,
    at most ``max_backoff``; every exit and restart is logged. A child that exits more than ``give_up_after``
    times in a row, each time within ``stable_after`` seconds of starting (a configuration error, a port in
    use: restarting cannot help), makes the supervisor stop every child and end with status 1, so that systemd,
    Docker or Kubernetes take over. SIGINT/SIGTERM stop every child in reverse order and end with status 0."""

    def __init__(self, config: Path | None, roles: Sequence[tuple[str, list[str]]], *, backoff: float = 1.0,
                 max_backoff: float = 60.0, stable_after: float = 60.0, give_up_after: int = 5) -> None:
        self.config = config
        self.children = [Child(name, list(args)) for name, args in roles]
        self.backoff, self.max_backoff = backoff, max_backoff
        self.stable_after, self.give_up_after = stable_after, give_up_after
        self._stop = threading.Event()

    def _command(self, args: list[str]) -> list[str]:
        command = [sys.executable, "-c", "from worker.cli.app import main; main()", *args]
        return command + (["--config", str(self.config)] if self.config else [])

    def _spawn(self, child: Child) -> None:
        child.process = subprocess.Popen(self._command(child.args), preexec_fn=_die_with_parent)  # noqa: PLW1509
        child.started_at, child.restart_at = time.monotonic(), None
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def wait(self) -> int:
        """Supervise until asked to stop (status 0) or a child keeps failing (status 1); then stop every child."""
        status = 0
        while not self._stop.wait(0.5) and status == 0:
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        self._spawn(child)
                elif child.process is not None and child.process.poll() is not None:
                    status = self._exited(child, now)
                    if status:
                        break
        self.stop()
        return status

    def _exited(self, child: Child, now: float) -> int:
        assert child.process is not None
        code, pid = child.process.returncode, child.process.pid
        child.quick_exits = child.quick_exits + 1 if now - child.started_at < self.stable_after else 1
        if child.quick_exits > self.give_up_after:
            log.error("%s (pid %d) exited with status %s, %d times in a row within %.0f s of starting; "
                      "stopping everything", child.name, pid, code, child.quick_exits, self.stable_after)
            return 1
        delay = min(self.backoff * 2 ** (child.quick_exits - 1), self.max_backoff)
        log.error("%s (pid %d) exited with status %s; restarting it in %g s", child.name, pid, code, delay)
        child.process, child.restart_at = None, now + delay
        return 0

    def stop(self, timeout: float = 30.0) -> None:
        running = [c.process for c in self.children if c.process is not None]
        for process in reversed(running):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            if child.process is None:
                continue
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
