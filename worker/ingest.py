"""The worker side of the DICOM node: records what :mod:`dicom_node` receives in the database.

:class:`IngestService` implements :class:`dicom_node.events.IngestSink`. It keeps one row per study, series
and instance, opens a new revision when an instance arrives for a study that already left ``receiving``,
marks a study ``complete`` when the listener's completion tracker says it is stable, and then calls every
registered completion callback with ``(study_instance_uid, revision)`` — the end-to-end pipeline hangs its
Celery work on that. Associations, rejections, duplicates and completions are written as audit events.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from dicom_node.events import (
    AssociationSummary,
    PendingStudy,
    ReceivedInstance,
    RejectedAssociation,
    RejectedInstance,
)
from dicom_node.listener import Listener
from worker.config import Settings
from worker.db import (
    Analysis,
    AuditEvent,
    Database,
    Instance,
    Series,
    Study,
    StudyState,
    check_transition,
    utcnow,
)
from worker.dicom_params import completion_params, listener_params
from worker.logsetup import phi_enabled, remember_patient

log = logging.getLogger(__name__)

CompletionCallback = Callable[[str, int], None]
"""Called as ``callback(study_instance_uid, revision)`` after a study revision was marked ``complete``."""

ACTOR = "dicom-node"


class IngestService:
    """Records received instances and study completion (thread-safe; one short transaction per call)."""

    def __init__(self, db: Database, on_complete: CompletionCallback | Iterable[CompletionCallback] | None = None):
        self.db = db
        if on_complete is None:
            self._callbacks: list[CompletionCallback] = []
        elif callable(on_complete):
            self._callbacks = [on_complete]
        else:
            self._callbacks = list(on_complete)
        self._callbacks_lock = threading.Lock()
        self._series_ids: dict[str, int] = {}

    def add_completion_callback(self, callback: CompletionCallback) -> None:
        with self._callbacks_lock:
            self._callbacks.append(callback)

    # -- IngestSink ------------------------------------------------------------------------------------

    def instance_stored(self, instance: ReceivedInstance, *, replaced: bool) -> None:
        """One short Core transaction (this is on the C-STORE hot path): touch the receiving study (or open
        it / its next revision), find or create the series, upsert the instance row."""
        remember_patient(instance.patient_id, instance.patient_name)  # redacted from log lines (logsetup)
        for attempt in (1, 2):
            try:
                with self.db.engine.begin() as conn:
                    study_id, revision = self._receiving_study(conn, instance)
                    series_id = self._series_id(conn, instance, study_id)
                    _upsert_instance(conn, instance, study_id, series_id, revision)
                    if replaced:
                        conn.execute(insert(AuditEvent).values(_audit_values(
                            instance.calling_ae_title, instance.peer_host, "instance.replaced",
                            instance.study_instance_uid, sop_instance_uid=instance.sop_instance_uid)))
                return
            except IntegrityError:
                if attempt == 2:  # a concurrent association created the same study or series first
                    raise
                self._series_ids.pop(instance.series_instance_uid, None)

    def instance_recorded(self, sop_instance_uid: str) -> bool:
        with self.db.engine.connect() as conn:
            found = conn.execute(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)).first()
            return found is not None

    def duplicate_ignored(self, instance: ReceivedInstance) -> None:
        with self.db.session() as session:
            session.add(_audit(instance.calling_ae_title, instance.peer_host, "instance.duplicate_ignored",
                               instance.study_instance_uid, sop_instance_uid=instance.sop_instance_uid,
                               sha256=instance.sha256))

    def instance_rejected(self, rejection: RejectedInstance) -> None:
        with self.db.session() as session:
            session.add(_audit(rejection.calling_ae_title, rejection.peer_host, "instance.rejected",
                               rejection.study_instance_uid, status=f"0x{rejection.status:04X}",
                               reason=rejection.reason, sop_class_uid=rejection.sop_class_uid,
                               sop_instance_uid=rejection.sop_instance_uid))

    def association_rejected(self, rejection: RejectedAssociation) -> None:
        with self.db.session() as session:
            session.add(_audit(rejection.calling_ae_title, rejection.peer_host, "association.rejected", None,
                               called_ae_title=rejection.called_ae_title, reason=rejection.reason))

    def association_ended(self, summary: AssociationSummary) -> None:
        detail = asdict(summary)
        detail.pop("calling_ae_title")
        detail.pop("peer_host")
        detail["studies"] = list(summary.studies)
        with self.db.session() as session:
            session.add(_audit(summary.calling_ae_title, summary.peer_host, "association.ended", None, **detail))

    def pending_studies(self) -> list[PendingStudy]:
        with self.db.session() as session:
            rows = session.scalars(select(Study).where(Study.state == StudyState.RECEIVING)).all()
            return [PendingStudy(s.study_instance_uid, s.receiving_since, s.last_instance_at) for s in rows]

    def study_stable(self, study_instance_uid: str) -> None:
        with self.db.session() as session:
            study = session.scalars(
                select(Study).where(Study.study_instance_uid == study_instance_uid).with_for_update()
            ).one_or_none()
            if study is None or study.state is not StudyState.RECEIVING:
                return
            check_transition(study.state, StudyState.COMPLETE)
            study.state = StudyState.COMPLETE
            study.completed_at = utcnow()
            revision = study.revision
            count = len(session.scalars(
                select(Instance.id).where(Instance.study_id == study.id, Instance.revision == revision)
            ).all())
            session.add(AuditEvent(actor=ACTOR, action="study.complete", study_instance_uid=study_instance_uid,
                                   detail={"revision": revision, "instances": count}))
            patient = f" of patient {study.patient_id} ({study.patient_name})" if phi_enabled() else ""
        log.info("study %s revision %d complete (%d instances)%s", study_instance_uid, revision, count,
                 patient)
        with self._callbacks_lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(study_instance_uid, revision)
            except Exception:
                log.exception("completion callback %r failed for study %s", callback, study_instance_uid)

    # -- helpers ---------------------------------------------------------------------------------------

    def _receiving_study(self, conn: Connection, instance: ReceivedInstance) -> tuple[int, int]:
        """(study id, revision) for an arriving instance. Usually one UPDATE … RETURNING on a study already
        receiving; otherwise the study is created, or, when it already left ``receiving``, revision N+1 is
        opened (older analyses become superseded)."""
        touched = conn.execute(
            _TOUCH_RECEIVING,
            {"uid": instance.study_instance_uid, "at": instance.received_at,
             **{field: getattr(instance, field) for field in _STUDY_FIELDS}},
        ).first()
        if touched is not None:
            return touched.id, touched.revision
        now = instance.received_at
        found = conn.execute(
            select(Study.id, Study.state, Study.revision)
            .where(Study.study_instance_uid == instance.study_instance_uid)
            .with_for_update()
        ).first()
        if found is None:
            study_id = conn.execute(
                insert(Study).values(
                    study_instance_uid=instance.study_instance_uid, revision=1, state=StudyState.RECEIVING,
                    created_at=now, updated_at=now, receiving_since=now, last_instance_at=now,
                    **{field: getattr(instance, field) for field in _STUDY_FIELDS},
                ).returning(Study.id)
            ).scalar_one()
            conn.execute(insert(AuditEvent).values(_audit_values(
                instance.calling_ae_title, instance.peer_host, "study.receiving", instance.study_instance_uid,
                revision=1)))
            return study_id, 1
        revision = found.revision + 1
        conn.execute(
            update(Study).where(Study.id == found.id).values(
                revision=revision, state=StudyState.RECEIVING, receiving_since=now, last_instance_at=now,
                updated_at=now, completed_at=None,
                **{f: func.coalesce(getattr(Study, f), getattr(instance, f)) for f in _STUDY_FIELDS},
            )
        )
        conn.execute(
            update(Analysis).where(Analysis.study_id == found.id, Analysis.revision < revision).values(superseded=True)
        )
        conn.execute(insert(AuditEvent).values(_audit_values(
            instance.calling_ae_title, instance.peer_host, "study.revision_opened", instance.study_instance_uid,
            revision=revision, previous_state=str(found.state), sop_instance_uid=instance.sop_instance_uid)))
        log.info("late instance for study %s opens revision %d", instance.study_instance_uid, revision)
        return found.id, revision

    def _series_id(self, conn: Connection, instance: ReceivedInstance, study_id: int) -> int:
        """The series row id, cached per process (a series never moves between studies)."""
        uid = instance.series_instance_uid
        cached = self._series_ids.get(uid)
        if cached is not None:
            return cached
        series_id = conn.execute(select(Series.id).where(Series.series_instance_uid == uid)).scalar_one_or_none()
        if series_id is None:
            series_id = conn.execute(
                insert(Series).values(
                    study_id=study_id, series_instance_uid=uid, modality=instance.modality,
                    series_number=instance.series_number, series_description=instance.series_description,
                    created_at=instance.received_at,
                ).returning(Series.id)
            ).scalar_one()
        self._series_ids[uid] = series_id
        return series_id


_STUDY_FIELDS = ("patient_id", "patient_name", "accession_number", "study_date", "study_description")


_TOUCH_RECEIVING = (
    update(Study)
    .where(Study.study_instance_uid == bindparam("uid"), Study.state == StudyState.RECEIVING)
    .values(
        last_instance_at=bindparam("at"),
        updated_at=bindparam("at"),
        **{field: func.coalesce(getattr(Study, field), bindparam(field)) for field in _STUDY_FIELDS},
    )
    .returning(Study.id, Study.revision)
)
"""Touch a study that is still receiving, filling identifying fields it lacks; no row if it is not."""

_INSTANCE_COLUMNS = (
    "study_id", "series_id", "sop_class_uid", "transfer_syntax_uid", "instance_number", "laterality", "path",
    "size_bytes", "sha256", "calling_ae_title", "peer_host", "received_at", "revision", "analysable",
)


@functools.cache
def _upsert_statement(dialect: str):
    """INSERT … ON CONFLICT (sop_instance_uid) DO UPDATE: a replaced instance (or a row left by an earlier
    attempt) takes the new values. Built once per dialect with bind parameters."""
    dialect_insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    statement = dialect_insert(Instance).values(
        {name: bindparam(name) for name in ("sop_instance_uid", *_INSTANCE_COLUMNS)}
    )
    return statement.on_conflict_do_update(
        index_elements=[Instance.sop_instance_uid],
        set_={name: statement.excluded[name] for name in _INSTANCE_COLUMNS},
    )


def _upsert_instance(conn: Connection, instance: ReceivedInstance, study_id: int, series_id: int,
                     revision: int) -> None:
    conn.execute(_upsert_statement(conn.dialect.name), {
        "sop_instance_uid": instance.sop_instance_uid,
        "study_id": study_id,
        "series_id": series_id,
        "sop_class_uid": instance.sop_class_uid,
        "transfer_syntax_uid": instance.transfer_syntax_uid,
        "instance_number": instance.instance_number,
        "laterality": instance.laterality,
        "path": str(instance.path),
        "size_bytes": instance.size,
        "sha256": instance.sha256,
        "calling_ae_title": instance.calling_ae_title,
        "peer_host": instance.peer_host,
        "received_at": instance.received_at,
        "revision": revision,
        "analysable": instance.analysable,
    })


def _audit_values(calling: str, host: str, action: str, study_uid: str | None, **detail: object) -> dict:
    return {
        "at": utcnow(),
        "actor": f"{calling}@{host}",
        "action": action,
        "study_instance_uid": study_uid,
        "detail": {k: v for k, v in detail.items() if v is not None},
    }


def _audit(calling: str, host: str, action: str, study_uid: str | None, **detail: object) -> AuditEvent:
    return AuditEvent(**_audit_values(calling, host, action, study_uid, **detail))


@dataclass
class RunningNode:
    """A started listener with its ingest service and database; ``stop()`` shuts all three down."""

    listener: Listener
    service: IngestService
    db: Database

    def stop(self) -> None:
        self.listener.stop()
        self.db.dispose()


def start_node(
    settings: Settings,
    on_complete: CompletionCallback | Iterable[CompletionCallback] | None = None,
    *,
    db: Database | None = None,
) -> RunningNode:
    """Start the DICOM listener of ``settings`` recording into its database (already migrated)."""
    db = db or Database(settings.database.url, echo=settings.database.echo)
    service = IngestService(db, on_complete)
    listener = Listener(listener_params(settings), completion_params(settings), service)
    listener.start()
    return RunningNode(listener, service, db)
