"""The Celery application: broker from configuration, queues ``inference`` and ``delivery``.

Inference tasks run with prefetch 1, ``acks_late`` and ``reject_on_worker_lost`` so a message is only
acknowledged once its study is analysed. Brokers differ in what they do with a message whose worker died
(Redis redelivers after the visibility timeout, kombu's SQLAlchemy transport does not), so the database is the
source of truth: every job and delivery has a state and a heartbeat, and the bookkeeper
(:mod:`worker.pipeline.bookkeeper`) re-enqueues work whose worker went away. Tasks are idempotent per
(study, revision, model), so a message delivered twice does the work once.
"""

from __future__ import annotations

from celery import Celery, bootsteps
from kombu import Queue

from worker.config import Settings

INFERENCE_QUEUE = "inference"
DELIVERY_QUEUE = "delivery"
QUEUES = (INFERENCE_QUEUE, DELIVERY_QUEUE)

PROCESS_STUDY = "retinalgpt.process_study"
DELIVER_STUDY = "retinalgpt.deliver_study"
ANSWER_QUESTION = "retinalgpt.answer_question"
SHADOW_STUDY = "retinalgpt.shadow_study"

TASK_ROUTES = {
    PROCESS_STUDY: {"queue": INFERENCE_QUEUE},
    ANSWER_QUESTION: {"queue": INFERENCE_QUEUE},
    SHADOW_STUDY: {"queue": INFERENCE_QUEUE},
    DELIVER_STUDY: {"queue": DELIVERY_QUEUE},
}


URGENT_FIRST_BROKERS = ("redis://", "rediss://", "redis+socket://", "sentinel://")


def analysis_priority(broker_url: str, urgent: bool) -> int | None:
    """The Celery message priority of an analysis task of a study routed ``normal`` or ``urgent``.

    Redis (kombu's priority lists, popped 0 first; a message without priority counts as 0): urgent 0, normal 6,
    so urgent studies overtake normal ones waiting in the inference queue. RabbitMQ: AMQP priority (higher
    first) urgent 9, normal 0, which orders the queue only where it was declared with ``x-max-priority``. The
    embedded SQLAlchemy transport has no priorities: None, first in first out."""
    if broker_url.startswith(URGENT_FIRST_BROKERS):
        return 0 if urgent else 6
    if broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
        return 9 if urgent else 0
    return None


def shadow_priority(broker_url: str) -> int | None:
    """The priority of a shadow analysis (a candidate model next to the active one): below every study's own
    analysis — Redis 9 (popped last), RabbitMQ 0 (AMQP's lowest, ties with normal), no priority on SQLAlchemy."""
    if broker_url.startswith(URGENT_FIRST_BROKERS):
        return 9
    if broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
        return 0
    return None


def make_celery(settings: Settings) -> Celery:
    """A Celery app bound to ``settings``' broker; task modules are imported by the worker role only."""
    broker_url = settings.broker.url
    app = Celery("retinalgpt", broker=broker_url, backend=settings.broker.result_backend)
    # kombu's SQLAlchemy transport hands its options to create_engine(): it takes none of ours.
    sqla = broker_url.startswith(("sqla+", "sqlalchemy+"))
    transport_options = {} if sqla else {"visibility_timeout": settings.broker.visibility_timeout}
    app.conf.update(
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue=DELIVERY_QUEUE,
        task_routes=TASK_ROUTES,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_expires=3600,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    if sqla:
        app.conf.broker_polling_seconds = settings.broker.polling_seconds
        app.steps["consumer"].add(SqlaPolling)
    return app


class SqlaPolling(bootsteps.StartStopStep):
    """Sets how often a worker on kombu's SQLAlchemy transport (the embedded default) looks for messages:
    the transport polls its message table, by default once a second, which adds up to a second to every hop
    of a study (completion → inference → delivery). ``broker.polling_seconds`` in the configuration."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, consumer) -> None:
        consumer.connection.transport.polling_interval = consumer.app.conf.broker_polling_seconds
