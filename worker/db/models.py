"""Database models (SQLAlchemy 2 typed ORM). Migrations live in :mod:`worker.db.migrations`.

Times are timezone-aware UTC. Enumerations are stored as their string values (portable between SQLite and
PostgreSQL, and readable in SQL).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from worker.db.states import DeliveryObject, DeliveryState, FailureReason, JobKind, JobState, StudyState

UID_LENGTH = 64


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _enum(enum_cls: type[StrEnum], length: int = 16) -> Enum:
    return Enum(
        enum_cls,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Study(Base):
    """A DICOM study (PS3.3 C.7.2.1) and the state of its current revision."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    revision: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.RECEIVING, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    receiving_since: Mapped[datetime] = mapped_column(default=utcnow)
    last_instance_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()
    released_at: Mapped[datetime | None] = mapped_column()
    """When an association that carried the study was last released normally (A-RELEASE). Older than
    ``last_instance_at`` (or absent) means its last sender was cut off: an abort or a node crash."""
    purged_at: Mapped[datetime | None] = mapped_column()
    """When the retention sweep deleted the study's originals (``storage.retain_days``); its results and rows
    stay. A late instance still opens a new revision, analysed with the originals that are kept."""
    route: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The routing decisions of its instances combined when it completed (``worker.routing.study_route``):
    ``{"rules": [...], "forward": [destination, ...], "priority": "normal" | "urgent"}``."""

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.series_number")
    instances: Mapped[list[Instance]] = relationship(back_populates="study", order_by="Instance.id")


class Series(Base):
    """A DICOM series (PS3.3 C.7.3.1)."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.instance_number")


class Instance(Base):
    """A stored composite instance (PS3.3 C.12.1) and where it came from."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    laterality: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(255))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    revision: Mapped[int] = mapped_column(Integer)
    analysable: Mapped[bool] = mapped_column(Boolean)
    not_analysed_reason: Mapped[str | None] = mapped_column(String(128))
    purged_at: Mapped[datetime | None] = mapped_column()
    """When its file was deleted by the retention sweep (the row stays); None while the file is kept."""
    route: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The routing rule that decided for it and what it decided (``{"rule", "analyse", "forward", "priority"}``);
    None for our own result objects."""

    study: Mapped[Study] = relationship(back_populates="instances")
    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """A unit of pipeline work; unique per (study, revision, model, kind) so re-queuing is idempotent."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("study_id", "revision", "model_name", "model_version", "kind", name="uq_jobs_identity"),
        Index("ix_jobs_state", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(128), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind))
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    failure: Mapped[FailureReason | None] = mapped_column(_enum(FailureReason, 32))
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    study: Mapped[Study] = relationship()


class Analysis(Base):
    """A :class:`model.schema.StudyAnalysis` (as JSON) for one study revision and model."""

    __tablename__ = "analyses"
    __table_args__ = (Index("ix_analyses_study_revision", "study_id", "revision"),
                      Index("ix_analyses_created_at", "created_at"))  # the monitoring window (worker/monitoring.py)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    result: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    shadow: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """A candidate model's analysis run in shadow mode: never delivered, never the study's result."""

    study: Mapped[Study] = relationship()


class Delivery(Base):
    """One object of one study revision sent to one destination, with its retry state."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("study_id", "revision", "destination", "object_kind", name="uq_deliveries_identity"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    destination: Mapped[str] = mapped_column(String(128))
    object_kind: Mapped[DeliveryObject] = mapped_column(_enum(DeliveryObject))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    failure: Mapped[FailureReason | None] = mapped_column(_enum(FailureReason, 32))
    remote_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()

    study: Mapped[Study] = relationship()


class ResultObject(Base):
    """A DICOM object we built (SR, key image, PDF, SEG), so that the node recognises it when a PACS sends it
    back (DESIGN "our own objects"): its SOP Instance UID and Series Instance UID are ours."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    object_kind: Mapped[DeliveryObject] = mapped_column(_enum(DeliveryObject))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SignOff(Base):
    """A clinician's sign-off of one result revision (issue 17 item 1). Signing creates the next revision of the
    study (``revision``) whose analysis holds the clinician's values; ``signed_revision`` is the revision that was
    read, ``original`` the AI's analysis as it stood then, ``corrections`` what the clinician changed."""

    __tablename__ = "signoffs"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    signed_revision: Mapped[int] = mapped_column(Integer)
    revision: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(128))
    observer_name: Mapped[str] = mapped_column(String(64))
    organisation: Mapped[str] = mapped_column(String(64))
    signed_at: Mapped[datetime] = mapped_column(default=utcnow)
    changed: Mapped[bool] = mapped_column(Boolean)
    corrects_signed: Mapped[bool] = mapped_column(Boolean, default=False)
    corrections: Mapped[dict[str, Any]] = mapped_column()
    original: Mapped[dict[str, Any]] = mapped_column()
    comment: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (UniqueConstraint("study_id", "revision", name="uq_signoffs_revision"),)


class AuditEvent(Base):
    """Who did what, when (associations, rejections, completions, operator actions)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_study_at", "study_instance_uid", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class WorkerHeartbeat(Base):
    """A running Celery worker (its main process) and whether it is consuming its queues; refreshed every
    ``pipeline.heartbeat_seconds`` and removed when the worker stops (read by ``/readyz``)."""

    __tablename__ = "worker_heartbeats"

    id: Mapped[int] = mapped_column(primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), unique=True)
    queues: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    processes: Mapped[int] = mapped_column(Integer)
    consuming: Mapped[bool] = mapped_column(Boolean)
    problem: Mapped[str | None] = mapped_column(String(500))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
