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
