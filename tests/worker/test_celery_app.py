"""The Celery app built from the configuration."""

from __future__ import annotations

from pathlib import Path

from celery.contrib.testing.worker import start_worker

from worker.celery_app import make_celery
from worker.config import load_settings


def test_workers_on_the_embedded_broker_poll_at_the_configured_interval(tmp_path: Path) -> None:
    """kombu's SQLAlchemy transport polls once a second unless told otherwise; a running worker's transport
    uses ``broker.polling_seconds``."""
    settings = load_settings(None, home=tmp_path, broker={"polling_seconds": 0.05})
    assert settings.broker.url.startswith("sqla+sqlite:")
    app = make_celery(settings)
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING",
                      shutdown_timeout=10) as worker:
        assert worker.consumer.connection.transport.polling_interval == 0.05


def test_other_brokers_are_left_alone(tmp_path: Path) -> None:
    settings = load_settings(None, home=tmp_path, broker={"url": "redis://127.0.0.1:6379/0"})
    app = make_celery(settings)
    assert not any("SqlaPolling" in str(step) for step in app.steps["consumer"])


def test_tasks_of_a_second_configuration_read_its_own_database(tmp_path: Path) -> None:
    """Tasks registered for two configurations in one process (one app each) each read their own database:
    the per-process engine cache used to hand the second configuration the first one's database, so its chat
    task answered "no study" for a study it holds."""
    import pytest
    from pydicom.uid import generate_uid

    from worker.celery_app import ANSWER_QUESTION
    from worker.db import Database, Study, StudyState
    from worker.db.migrate import upgrade
    from worker.pipeline.jobs import PipelineError
    from worker.pipeline.tasks import register_tasks

    apps = []
    for name in ("first", "second"):
        settings = load_settings(None, home=tmp_path / name, model={"enabled": False})
        upgrade(settings.database.url)
        app = make_celery(settings)
        register_tasks(app, settings)
        apps.append((settings, app))
    uid = generate_uid()
    db = Database(apps[1][0].database.url)
    with db.session() as session:
        session.add(Study(study_instance_uid=uid, state=StudyState.COMPLETE))
    db.dispose()
    with pytest.raises(PipelineError, match="no study"):
        apps[0][1].tasks[ANSWER_QUESTION](uid, "Any DR?")
    with pytest.raises(PipelineError, match="has no results yet"):
        apps[1][1].tasks[ANSWER_QUESTION](uid, "Any DR?")
