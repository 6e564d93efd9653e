"""Health, readiness and Prometheus metrics.

``/healthz`` answers while the process serves requests; ``/readyz`` checks that the database is reachable and at
the newest migration, that the broker accepts a connection and that a worker consumes each queue (worker
heartbeats, :mod:`worker.liveness`); ``/readyz?scope=api`` leaves the workers out. ``/metrics`` (Prometheus text format 0.0.4) is
computed from the database at scrape time, so every API replica reports the same cluster-wide figures:
instances received, studies by state, broker queue depth, job and delivery durations (histograms over all
finished jobs and delivered objects) and failures, dead jobs and deliveries by reason, instances refused (UID
conflicts and refusals for want of disk space included), free space of the storage folder against
``storage.min_free_gb`` (also a ``/readyz`` check), plus this process's own HTTP request counters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, select, text
from sqlalchemy.orm import Session

from worker.celery_app import QUEUES
from worker.config import Settings
from worker.db import AuditEvent, Database, Delivery, DeliveryState, Instance, Job, JobState, Study, StudyState
from worker.db.migrate import current_revision, head_revision
from worker.db.session import READ_ONLY
from worker.pipeline.retention import StorageSpace, storage_space

log = logging.getLogger(__name__)

_REFUSALS = {"instance.rejected": "rejected", "instance.uid_conflict": "uid_conflict", "instance.no_space": "no_space"}
"""Audit actions of refused C-STOREs and their metrics label."""

DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def _seconds(session: Session, start: Any, end: Any) -> ColumnElement[float]:
    """``end - start`` in seconds, on SQLite (julianday) and PostgreSQL (epoch)."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def _histogram(session: Session, name: str, doc: str, label: str, key: Any, start: Any, end: Any,
               where: ColumnElement[bool]) -> HistogramMetricFamily:
    duration = _seconds(session, start, end)
    columns = [func.sum(case((duration <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
    stmt = select(key, func.count(), func.coalesce(func.sum(duration), 0.0), *columns).where(where).group_by(key)
    family = HistogramMetricFamily(name, doc, labels=[label])
    for row in session.execute(stmt):
        value, count, total, *cumulative = row
        buckets = [(f"{bound:g}", float(c or 0)) for bound, c in zip(DURATION_BUCKETS, cumulative, strict=True)]
        family.add_metric([str(getattr(value, "value", value))], buckets + [("+Inf", float(count))], float(total))
    return family


def queue_depths(celery: Celery) -> dict[str, int]:
    """Messages waiting in each Celery queue (passive declare; a queue never declared counts 0)."""
    depths: dict[str, int] = {}
    with celery.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        for queue in QUEUES:
            channel = conn.channel()
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except Exception:  # noqa: BLE001 - each transport raises its own error for a queue not declared yet
                depths[queue] = 0
            finally:
                channel.close()
    return depths


class PipelineCollector(Collector):
    """Cluster-wide figures from the database and the broker, read at scrape time."""

    def __init__(self, db: Database, celery: Celery, settings: Settings | None = None) -> None:
        self.db = db
        self.celery = celery
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        with self.db.reading() as session:
            yield from self._database_metrics(session)
        if self.settings is not None:
            yield from _storage_metrics(storage_space(self.settings))
        up = GaugeMetricFamily("retinalgpt_broker_up", "1 when the broker answered this scrape")
        depth = GaugeMetricFamily("retinalgpt_queue_depth", "messages waiting in a Celery queue", labels=["queue"])
        try:
            for queue, n in queue_depths(self.celery).items():
                depth.add_metric([queue], n)
            up.add_metric([], 1)
        except Exception as exc:  # noqa: BLE001 - broker down (any transport error): the scrape says so
            log.warning("metrics: broker not reachable: %s", type(exc).__name__)
            up.add_metric([], 0)
        yield up
        yield depth

    def _database_metrics(self, session: Session) -> Iterator[Metric]:
        received = CounterMetricFamily("retinalgpt_instances_received", "DICOM instances stored, by calling AE",
                                       labels=["calling_ae"])
        for ae, n in session.execute(select(Instance.calling_ae_title, func.count()).group_by(Instance.calling_ae_title)):
            received.add_metric([ae], n)
        yield received
        studies = GaugeMetricFamily("retinalgpt_studies", "studies by state of their current revision", labels=["state"])
        counts = dict(session.execute(select(Study.state, func.count()).group_by(Study.state)).tuples().all())
        for state in StudyState:
            studies.add_metric([state.value], counts.get(state, 0))
        yield studies
        jobs = GaugeMetricFamily("retinalgpt_jobs", "pipeline jobs by kind and state", labels=["kind", "state"])
        failures = CounterMetricFamily("retinalgpt_job_failures", "jobs that failed or are dead, by kind", labels=["kind"])
        failed: dict[str, int] = {}
        for kind, state, n in session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)):
            jobs.add_metric([kind.value, state.value], n)
            if state in (JobState.FAILED, JobState.DEAD):
                failed[kind.value] = failed.get(kind.value, 0) + n
        for kind, n in failed.items():
            failures.add_metric([kind], n)
        yield jobs
        yield failures
        deliveries = GaugeMetricFamily("retinalgpt_deliveries", "delivered objects by destination and state",
                                       labels=["destination", "state"])
        dead = CounterMetricFamily("retinalgpt_delivery_failures", "deliveries in the dead-letter state",
                                   labels=["destination"])
        for dest, state, n in session.execute(select(Delivery.destination, Delivery.state, func.count())
                                              .group_by(Delivery.destination, Delivery.state)):
            deliveries.add_metric([dest, state.value], n)
            if state == DeliveryState.DEAD:
                dead.add_metric([dest], n)
        yield deliveries
        yield dead
        dead_jobs = GaugeMetricFamily("retinalgpt_dead_jobs", "dead jobs by kind and reason (retinalgpt jobs list "
                                      "--state dead shows each)", labels=["kind", "reason"])
        for kind, reason, n in session.execute(select(Job.kind, Job.failure, func.count())
                                               .where(Job.state == JobState.DEAD).group_by(Job.kind, Job.failure)):
            dead_jobs.add_metric([kind.value, reason.value if reason else "unknown"], n)
        yield dead_jobs
        dead_deliveries = GaugeMetricFamily("retinalgpt_dead_deliveries", "dead deliveries by destination and reason",
                                            labels=["destination", "reason"])
        for dest, reason, n in session.execute(select(Delivery.destination, Delivery.failure, func.count())
                                               .where(Delivery.state == DeliveryState.DEAD)
                                               .group_by(Delivery.destination, Delivery.failure)):
            dead_deliveries.add_metric([dest, reason.value if reason else "unknown"], n)
        yield dead_deliveries
        refused = CounterMetricFamily("retinalgpt_instances_refused", "C-STORE requests answered with a failure, "
                                      "by reason", labels=["reason"])
        for action, n in session.execute(select(AuditEvent.action, func.count())
                                         .where(AuditEvent.action.in_(tuple(_REFUSALS)))
                                         .group_by(AuditEvent.action)):
            refused.add_metric([_REFUSALS[action]], n)
        yield refused
        yield _histogram(session, "retinalgpt_job_duration_seconds", "run time of finished jobs", "kind", Job.kind,
                         Job.started_at, Job.finished_at,
                         Job.started_at.is_not(None) & Job.finished_at.is_not(None))
        yield _histogram(session, "retinalgpt_delivery_duration_seconds",
                         "time from a delivery's creation to its success (retries included)", "destination",
                         Delivery.destination, Delivery.created_at, Delivery.delivered_at,
                         Delivery.delivered_at.is_not(None))


def _storage_metrics(space: StorageSpace) -> Iterator[Metric]:
    """Free space of the storage folder's file system, the minimum the node keeps, and whether C-STORE is
    refused for want of it (``storage.min_free_gb``)."""
    free = GaugeMetricFamily("retinalgpt_storage_free_bytes", "free bytes on the storage folder's file system "
                             "(absent when it cannot be read)")
    if space.free_bytes is not None:
        free.add_metric([], space.free_bytes)
    yield free
    yield GaugeMetricFamily("retinalgpt_storage_min_free_bytes", "storage.min_free_gb in bytes: below it C-STORE is "
                            "answered 0xA700", value=space.min_free_bytes)
    yield GaugeMetricFamily("retinalgpt_storage_low", "1 while C-STORE is refused for want of free space",
                            value=1 if space.low else 0)


class HttpMetrics:
    """This process's request counters (per route template, not per URL, so cardinality stays bounded)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("retinalgpt_api_requests", "HTTP requests served", ["method", "route", "status"],
                                registry=registry)
        self.latency = Histogram("retinalgpt_api_request_duration_seconds", "HTTP request latency", ["route"],
                                 registry=registry)

    def observe(self, method: str, route: str, status: int, started: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)


def readiness(db: Database, celery: Celery, *, stale_after: float | None = None,
              settings: Settings | None = None) -> dict[str, str]:
    """``{"database": "ok" | reason, "broker": "ok" | reason, "inference_workers": …, "delivery_workers": …,
    "storage": …}``. The worker checks (from the workers' heartbeats, fresher than ``stale_after`` seconds) and
    the storage check (free space against ``storage.min_free_gb``, when ``settings`` are given) are left out when
    ``stale_after`` is None: what this API process itself needs to serve requests."""
    checks: dict[str, str] = {}
    try:
        with db.reading() as session:
            session.execute(text("SELECT 1"))
        at, head = current_revision(db.engine.execution_options(**{READ_ONLY: True})), head_revision()
        checks["database"] = "ok" if at == head else f"schema at {at or 'none'}, expected {head}: run `retinalgpt db upgrade`"
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure instead of raising
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        with celery.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure instead of raising
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    if stale_after is not None:
        from worker.liveness import queue_readiness

        try:
            with db.reading() as session:
                checks.update(queue_readiness(session, QUEUES, stale_after))
        except Exception as exc:  # noqa: BLE001 - readiness reports any failure instead of raising
            checks.update({f"{queue}_workers": f"unknown: {type(exc).__name__}" for queue in QUEUES})
        if settings is not None:
            checks["storage"] = storage_space(settings).describe()
    return checks
