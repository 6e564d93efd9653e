"""Lost prefork child drill (issue 18 item 9), with real workers and the real API.

``kill -9`` of an idle inference pool process (what the OOM killer does) used to leave the worker looking
healthy while it never started another task: studies stayed ``queued`` and ``/readyz`` said ready. Now the
worker notices the stalled pool and exits with status 1 for its supervisor to restart it, ``/readyz`` says
which queue has no consuming worker and why, and once a worker is back both the readiness and the queued job
recover.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from pydicom.uid import generate_uid

from tests.support.net import free_port
from tests.support.roles import Roles, wait_for
from worker.celery_app import make_celery
from worker.config import load_settings
from worker.db import Database, Instance, Job, JobState, Series, Study, StudyState
from worker.db.migrate import upgrade
from worker.pipeline.bookkeeper import Bookkeeper
from worker.pipeline.jobs import Pipeline

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def _study(db: Database, missing: Path) -> str:
    """A study whose only image file is gone: its one attempt fails at once (a missing file is retried, and
    the drill allows one attempt, so the job is dead), which is all this drill needs to see that a worker
    consumes."""
    uid = generate_uid()
    with db.session() as session:
        study = Study(study_instance_uid=uid, state=StudyState.COMPLETE)
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_instance_uid=generate_uid())
        session.add(series)
        session.flush()
        session.add(Instance(study_id=study.id, series_id=series.id, sop_instance_uid=generate_uid(),
                             sop_class_uid=OP_8BIT, transfer_syntax_uid="1.2.840.10008.1.2.1", instance_number=1,
                             path=str(missing), size_bytes=0, sha256="0" * 64, calling_ae_title="CAMERA1",
                             peer_host="127.0.0.1", revision=1, analysable=True))
    return uid


def _pool_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(child) for child in out.split()]


def _cpu_ticks(pid: int) -> int:
    """User + system CPU time of ``pid`` in clock ticks (fields 14 and 15 of /proc/PID/stat, proc(5))."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _idle(pid: int, quiet: float = 1.0) -> bool:
    """Whether ``pid`` used no CPU for ``quiet`` seconds."""
    before = _cpu_ticks(pid)
    time.sleep(quiet)
    return _cpu_ticks(pid) == before


def test_killed_idle_pool_process_worker_exits_for_restart_and_readiness_follows(tmp_path: Path) -> None:
    api_port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'home = "{tmp_path / "home"}"\n'
        "[pipeline]\nmax_attempts = 1\nheartbeat_seconds = 1\nstale_after_seconds = 6\nrequeue_after_seconds = 5\nsweep_seconds = 1\n"
        f"[model]\nenabled = false\n[api]\nport = {api_port}\n"
    )
    settings = load_settings(config)
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    pipeline = Pipeline(settings, db, make_celery(settings))
    roles = Roles(config, tmp_path / "logs")
    ready_url = f"http://127.0.0.1:{api_port}/readyz"

    def readiness() -> httpx.Response | None:
        try:
            return httpx.get(ready_url, timeout=5)
        except httpx.TransportError:
            return None

    def job_state(job_id: int) -> JobState:
        with db.reading() as session:
            return session.get(Job, job_id).state

    logs = lambda: "\n".join(f"--- {n}\n{roles.log(n)}" for n in ("api", "inference", "inference-2"))  # noqa: E731
    bookkeeper = Bookkeeper(pipeline)
    try:
        roles.start("api", "api")
        down = wait_for(readiness, 60, "the API", diagnostics=logs)
        assert down.status_code == 503
        assert down.json()["inference_workers"] == "no inference worker is running (no heartbeat)"

        worker = roles.start("inference", "worker", "--queues", "inference")
        roles.start("delivery", "worker", "--queues", "delivery")
        wait_for(lambda: (r := readiness()) is not None and r.status_code == 200, 90, "readiness with both workers",
                 diagnostics=logs)
        first = pipeline.enqueue(_study(db, tmp_path / "gone.dcm"), 1, actor="drill")
        wait_for(lambda: job_state(first) == JobState.DEAD, 60, "the first job", diagnostics=logs)
        (child,) = _pool_children(worker.pid)
        # the job row is dead a moment before the task returns: a pool process killed in that moment loses a task,
        # which the pool notices, takes back and carries on from instead of stalling — so wait until it is idle
        wait_for(lambda: _idle(child), 30, "the pool process to go idle", diagnostics=logs)
        os.kill(child, signal.SIGKILL)  # idle: its task is done
        second = pipeline.enqueue(_study(db, tmp_path / "gone-too.dcm"), 1, actor="drill")
        wait_for(lambda: worker.poll() is not None, 60, "the stalled worker to exit", diagnostics=logs)
        assert worker.returncode == 1, logs()
        stalled = wait_for(lambda: (r := readiness()) is not None and r.status_code == 503 and r, 30,
                           "readiness to report the stalled worker", diagnostics=logs)
        reason = stalled.json()["inference_workers"]
        assert reason.startswith("no inference worker consuming") and "pool stopped taking tasks" in reason, reason
        assert stalled.json()["delivery_workers"] == "ok"
        assert job_state(second) == JobState.QUEUED

        roles.start("inference-2", "worker", "--queues", "inference")  # what the supervisor does
        bookkeeper.start()  # re-sends the job whose message the stalled worker took with it
        wait_for(lambda: (r := readiness()) is not None and r.status_code == 200, 60, "readiness again",
                 diagnostics=logs)
        wait_for(lambda: job_state(second) == JobState.DEAD, 60, "the second job on the new worker",
                 diagnostics=logs)
    finally:
        bookkeeper.stop()
        roles.stop_all()
        db.dispose()
