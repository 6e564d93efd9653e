"""A running API over a populated embedded deployment: SQLite database, kombu SQLAlchemy broker, a real Celery
worker thread, uvicorn on a free loopback port."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from celery.contrib.testing.worker import TestWorkController, setup_app_for_worker

from model.schema import StudyAnalysis
from tests.api.api_fixtures import SPECS, StudySpec, populate
from tests.support.net import free_port
from worker.api import create_app
from worker.celery_app import ANSWER_QUESTION, INFERENCE_QUEUE, PROCESS_STUDY, make_celery
from worker.config import Settings, load_settings
from worker.db import Analysis, Database, Study
from worker.db.migrate import upgrade

READ_TOKEN = "read-token-7Qm2vX9pLk"
ADMIN_TOKEN = "admin-token-Zr4TyW8nHc"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Deployment:
    base_url: str
    settings: Settings
    db: Database
    storage: Path
    specs: list[StudySpec]
    analyses: dict[str, StudyAnalysis]
    processed_jobs: list[int] = field(default_factory=list)

    @property
    def fhir(self) -> str:
        return f"{self.base_url}/fhir/r4"


def settings_for(home: Path) -> Settings:
    return load_settings(None, home=home, model={"enabled": False}, api={
        "tokens": [{"name": "reader", "sha256": sha(READ_TOKEN), "role": "read"},
                   {"name": "operator", "sha256": sha(ADMIN_TOKEN), "role": "admin"}],
        "cors_origins": ["https://ehr.example.org"], "max_request_bytes": 4096, "chat_timeout_seconds": 20})


def stub_inference_worker(settings: Settings, db: Database, processed: list[int]) -> Any:
    """A real Celery worker on the ``inference`` queue whose tasks are test stand-ins for the inference worker's
    (the API only sends tasks by name): the chat answer is grounded in the study's stored result."""
    app = make_celery(settings)

    @app.task(name=ANSWER_QUESTION, shared=False)
    def answer_question(study_instance_uid: str, question: str, history: list[dict[str, str]]) -> dict[str, Any]:
        with db.session() as session:
            result = session.query(Analysis).join(Study).filter(
                Study.study_instance_uid == study_instance_uid).order_by(Analysis.id.desc()).first().result
        return {"answer": f"Referral {result['referral']}: {result['impression']} "
                          f"({len(history)} earlier turns; you asked: {question})",
                "model": {"name": "RetinalGPT", "version": "7b-v1.2", "device_uid": "2.25.1"}}

    @app.task(name=PROCESS_STUDY, shared=False)
    def process_study(job_id: int) -> None:
        processed.append(job_id)

    return running_worker(app)


@contextmanager
def running_worker(app: Any) -> Iterator[None]:
    """A Celery worker (solo pool) consuming the ``inference`` queue in a daemon thread; fails instead of
    hanging when it does not come up."""
    from celery.worker import state

    setup_app_for_worker(app, "WARNING", None)
    worker = TestWorkController(app=app, concurrency=1, pool="solo", hostname=f"api-test-{uuid.uuid4().hex[:8]}@localhost",
                                queues=[INFERENCE_QUEUE], loglevel="WARNING", ready_callback=None,
                                without_heartbeat=True, without_mingle=True, without_gossip=True)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    if not worker._on_started.wait(60):
        raise RuntimeError("the Celery test worker did not start within 60 s")
    try:
        yield
    finally:
        state.should_terminate = 0
        thread.join(15)
        state.should_terminate = None


class ServerThread:
    """uvicorn serving ``app`` on a free loopback port in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="info",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory, retina_rgb: np.ndarray) -> Iterator[Deployment]:
    home = tmp_path_factory.mktemp("api-home")
    settings = settings_for(home)
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    analyses = populate(db, settings.storage.path, retina_rgb)
    processed: list[int] = []
    with stub_inference_worker(settings, db, processed), ServerThread(create_app(settings, db=db)) as url:
        yield Deployment(url, settings, db, settings.storage.path, SPECS, analyses, processed)
    db.dispose()


@pytest.fixture()
def read_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {READ_TOKEN}"}


@pytest.fixture()
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
