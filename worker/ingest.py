"""The worker side of the DICOM node: records what :mod:`dicom_node` receives in the database.

:class:`IngestService` implements :class:`dicom_node.events.IngestSink`. It keeps one row per study, series
and instance, opens a new revision when an analysable instance arrives for a study that already left
``receiving``, marks a study ``complete`` when the listener's completion tracker says it is stable, and then
calls every registered completion callback with ``(study_instance_uid, revision)`` — the end-to-end pipeline
hangs its Celery work on that. Associations, rejections, duplicates and completions are written as audit events.

Nothing is ever moved between studies or patients: an instance whose SOP Instance UID is recorded under another
study or series, a series recorded under another study, or an instance naming another Patient ID than its
study is a *UID conflict*, refused and audited (``instance.uid_conflict``); the first recording stays.

Our own result objects (SR, key images, PDF, SEG) sent back by a PACS are recognised by their SOP Instance UID
or Series Instance UID (recorded in ``result_objects`` when they were built) or by our Manufacturer: they are
stored, never analysed, and — like every instance that is not analysed — never open a revision.

Every other instance is routed (:mod:`worker.routing`, the ``[[rules]]`` of the configuration): the deciding
rule and its decision are recorded on the instance row (``route``), ``analyse = false`` files it as not analysed.
When the study completes, the decisions of its instances are combined on the study row (``route``: forward
destinations, priority) and audited (``study.routed``); a study with no analysable image ends ``not_applicable``
(audit ``study.not_analysed``), is not queued and gets no SR.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from sqlalchemy import Connection, bindparam, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from dicom_node.events import (
    AssociationSummary,
    InstanceConflict,
    PendingStudy,
    Placement,
    PlacementKind,
    ReceivedInstance,
    RejectedAssociation,
    RejectedInstance,
)
from dicom_node.listener import Listener
from worker.config import Rule, Settings
from worker.db import (
    Analysis,
    AuditEvent,
    Database,
    Delivery,
    DeliveryObject,
    DeliveryState,
    Instance,
    ResultObject,
    Series,
    Study,
    StudyState,
    check_transition,
    utcnow,
)
from worker.dicom_params import completion_params, listener_params
from worker.logsetup import phi_enabled, remember_patient
from worker.routing import DEFAULT, RouteInput, header_reader, route, study_route

log = logging.getLogger(__name__)

CompletionCallback = Callable[[str, int], None]
"""Called as ``callback(study_instance_uid, revision)`` after a study revision was marked ``complete``."""

ACTOR = "dicom-node"


class IngestService:
    """Records received instances and study completion (thread-safe; one short transaction per call)."""

    def __init__(self, db: Database, on_complete: CompletionCallback | Iterable[CompletionCallback] | None = None,
                 *, own_manufacturer: str | None = None, rules: Sequence[Rule] = (),
                 on_forward: CompletionCallback | None = None):
        self.db = db
        self.rules = tuple(rules)
        self.on_forward = on_forward
        """Called as ``on_forward(study_instance_uid, revision)`` after a completed revision's originals were
        queued for forwarding (their delivery rows committed): the pipeline sends the delivery task."""
        self.own_manufacturer = (own_manufacturer or "").strip().casefold() or None
        if on_complete is None:
            self._callbacks: list[CompletionCallback] = []
        elif callable(on_complete):
            self._callbacks = [on_complete]
        else:
            self._callbacks = list(on_complete)
        self._callbacks_lock = threading.Lock()
        self._series_ids: dict[str, tuple[int, int]] = {}

    def add_completion_callback(self, callback: CompletionCallback) -> None:
        with self._callbacks_lock:
            self._callbacks.append(callback)

    # -- IngestSink ------------------------------------------------------------------------------------

    def placement(self, instance: ReceivedInstance) -> Placement:
        """NEW, DUPLICATE (same SOP Instance UID in the same study and series, same patient) or CONFLICT.
        One statement (this is on the C-STORE hot path)."""
        with self.db.engine.connect() as conn:
            found = conn.execute(_PLACEMENT, {"sop": instance.sop_instance_uid, "study": instance.study_instance_uid,
                                              "series": instance.series_instance_uid}).one()
        sop, study, series, patient = (instance.sop_instance_uid, instance.study_instance_uid,
                                       instance.series_instance_uid, instance.patient_id)
        if found.recorded_study is not None:
            if (found.recorded_study, found.recorded_series) != (study, series):
                return Placement(PlacementKind.CONFLICT, (
                    f"SOP Instance UID {sop} is already stored in study {found.recorded_study} series "
                    f"{found.recorded_series} (patient {found.recorded_patient!r}); received for study {study} "
                    f"series {series} (patient {patient!r})"))
            if _other_patient(found.recorded_patient, patient):
                return Placement(PlacementKind.CONFLICT, (
                    f"SOP Instance UID {sop} is already stored for patient {found.recorded_patient!r}; received "
                    f"for patient {patient!r}"))
            return Placement(PlacementKind.DUPLICATE)
        if _other_patient(found.study_patient, patient):
            return Placement(PlacementKind.CONFLICT, (
                f"study {study} is recorded for patient {found.study_patient!r}; instance {sop} names patient "
                f"{patient!r}"))
        if found.series_study is not None and found.series_study != study:
            return Placement(PlacementKind.CONFLICT, (
                f"series {series} is recorded in study {found.series_study}; instance {sop} names study {study}"))
        return Placement(PlacementKind.NEW)

    def instance_stored(self, instance: ReceivedInstance, *, replaced: bool) -> None:
        """One short Core transaction (this is on the C-STORE hot path): recognise our own objects, touch the
        receiving study (or open it / its next revision), find or create the series, upsert the instance row.
        Raises :class:`InstanceConflict` rather than move anything to another study or patient."""
        remember_patient(instance.patient_id, instance.patient_name)  # redacted from log lines (logsetup)
        for attempt in (1, 2):
            try:
                with self.db.engine.begin() as conn:
                    own = self._own_result(conn, instance)
                    recorded, route = instance, None
                    if own is not None:
                        recorded = dataclasses.replace(instance, analysable=False, not_analysed_reason=own)
                    else:
                        recorded, route = self._routed(instance)
                    study_id, revision = self._receiving_study(conn, recorded)
                    series_id = self._series_id(conn, recorded, study_id)
                    _upsert_instance(conn, recorded, study_id, series_id, revision, route)
                    if replaced:
                        conn.execute(insert(AuditEvent).values(_audit_values(
                            instance.calling_ae_title, instance.peer_host, "instance.replaced",
                            instance.study_instance_uid, sop_instance_uid=instance.sop_instance_uid)))
                    if own is not None:
                        conn.execute(insert(AuditEvent).values(_audit_values(
                            instance.calling_ae_title, instance.peer_host, "instance.own_result",
                            instance.study_instance_uid, sop_instance_uid=instance.sop_instance_uid,
                            sop_class_uid=instance.sop_class_uid, reason=own)))
                return
            except InstanceConflict:
                self._series_ids.pop(instance.series_instance_uid, None)
                raise
            except IntegrityError:
                if attempt == 2:  # a concurrent association created the same study or series first
                    raise
                self._series_ids.pop(instance.series_instance_uid, None)

    def _routed(self, instance: ReceivedInstance) -> tuple[ReceivedInstance, dict]:
        """Apply the routing rules: the instance as it is recorded (not analysed when the deciding rule says
        ``analyse = false``) and the decision to record with it."""
        if not self.rules:
            decision = DEFAULT
        else:
            read = header_reader(instance.path)

            def attribute(keyword: str) -> str | None:
                try:
                    return read(keyword)
                except Exception as exc:  # noqa: BLE001 - identified already; an unreadable header is "absent"
                    log.warning("routing: cannot read %s of %s: %s", keyword, instance.sop_instance_uid, exc)
                    return None

            decision, _ = route(self.rules, RouteInput(
                calling_ae=instance.calling_ae_title, called_ae=instance.called_ae_title,
                peer_host=instance.peer_host, modality=instance.modality, sop_class_uid=instance.sop_class_uid,
                attribute=attribute))
        recorded = instance
        if not decision.analyse and instance.analysable:
            recorded = dataclasses.replace(instance, analysable=False,
                                           not_analysed_reason=f"rule {decision.rule}: analyse = false")
        return recorded, {"rule": decision.rule, "analyse": decision.analyse, "forward": list(decision.forward),
                          "priority": decision.priority.value}

    def duplicate_ignored(self, instance: ReceivedInstance) -> None:
        with self.db.session() as session:
            session.add(_audit(instance.calling_ae_title, instance.peer_host, "instance.duplicate_ignored",
                               instance.study_instance_uid, sop_instance_uid=instance.sop_instance_uid,
                               sha256=instance.sha256))

    def uid_conflict(self, instance: ReceivedInstance, reason: str) -> None:
        with self.db.session() as session:
            session.add(_audit(instance.calling_ae_title, instance.peer_host, "instance.uid_conflict",
                               instance.study_instance_uid, sop_instance_uid=instance.sop_instance_uid,
                               series_instance_uid=instance.series_instance_uid, patient_id=instance.patient_id,
                               sha256=instance.sha256, reason=reason))

    def instance_rejected(self, rejection: RejectedInstance) -> None:
        """Audited as ``instance.rejected``, or ``instance.no_space`` when the storage was short of space."""
        action = "instance.no_space" if rejection.no_space else "instance.rejected"
        with self.db.session() as session:
            session.add(_audit(rejection.calling_ae_title, rejection.peer_host, action,
                               rejection.study_instance_uid, status=f"0x{rejection.status:04X}",
                               reason=rejection.reason, sop_class_uid=rejection.sop_class_uid,
                               sop_instance_uid=rejection.sop_instance_uid))

    def association_rejected(self, rejection: RejectedAssociation) -> None:
        with self.db.session() as session:
            session.add(_audit(rejection.calling_ae_title, rejection.peer_host, "association.rejected", None,
                               called_ae_title=rejection.called_ae_title, reason=rejection.reason))

    def association_ended(self, summary: AssociationSummary) -> None:
        """Audit the association; a release (not an abort) marks its studies as cleanly sent so far."""
        detail = asdict(summary)
        detail.pop("calling_ae_title")
        detail.pop("peer_host")
        detail["studies"] = list(summary.studies)
        with self.db.session() as session:
            session.add(_audit(summary.calling_ae_title, summary.peer_host, "association.ended", None, **detail))
            if summary.studies and not summary.aborted:
                session.execute(update(Study).where(Study.study_instance_uid.in_(summary.studies))
                                .values(released_at=utcnow()))

    def pending_studies(self) -> list[PendingStudy]:
        """Studies still receiving; interrupted when no release followed their last instance."""
        with self.db.session() as session:
            rows = session.execute(select(Study.study_instance_uid, Study.released_at, Study.last_instance_at)
                                   .where(Study.state == StudyState.RECEIVING)).all()
            return [PendingStudy(row.study_instance_uid,
                                 interrupted=row.released_at is None or row.released_at < row.last_instance_at)
                    for row in rows]

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
            count = session.scalar(select(func.count()).select_from(Instance).where(
                Instance.study_id == study.id, Instance.revision == revision))
            analysable = session.scalar(select(func.count()).select_from(Instance).where(
                Instance.study_id == study.id, Instance.revision <= revision, Instance.analysable.is_(True)))
            routes = session.scalars(select(Instance.route).where(
                Instance.study_id == study.id, Instance.revision <= revision, Instance.route.is_not(None))
                .order_by(Instance.id)).all()
            study.route = study_route(routes)
            session.add(AuditEvent(actor=ACTOR, action="study.complete", study_instance_uid=study_instance_uid,
                                   detail={"revision": revision, "instances": count, "analysable": analysable}))
            if self.rules:
                session.add(AuditEvent(actor=ACTOR, action="study.routed", study_instance_uid=study_instance_uid,
                                       detail={"revision": revision, **study.route}))
            forwarding = _queue_originals(session, study, revision, study.route["forward"])
            if not analysable:
                check_transition(study.state, StudyState.NOT_APPLICABLE)
                study.state = StudyState.NOT_APPLICABLE
                reasons = sorted(set(session.scalars(select(Instance.not_analysed_reason).where(
                    Instance.study_id == study.id, Instance.revision <= revision)).all()) - {None})
                session.add(AuditEvent(actor=ACTOR, action="study.not_analysed", study_instance_uid=study_instance_uid,
                                       detail={"revision": revision, "reason": "no analysable image",
                                               "state": StudyState.NOT_APPLICABLE.value,
                                               "instances_not_analysed": reasons}))
            patient = f" of patient {study.patient_id} ({study.patient_name})" if phi_enabled() else ""
        log.info("study %s revision %d complete (%d instances, %d analysable%s)%s", study_instance_uid, revision, count,
                 analysable, "; not applicable: nothing to analyse" if not analysable else "", patient)
        if forwarding and self.on_forward is not None:
            try:
                self.on_forward(study_instance_uid, revision)
            except Exception:  # noqa: BLE001 - the rows are pending: the bookkeeper sends them
                log.exception("cannot queue the forwarding of study %s; the bookkeeper will", study_instance_uid)
        if not analysable:
            return
        with self._callbacks_lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(study_instance_uid, revision)
            except Exception:
                log.exception("completion callback %r failed for study %s", callback, study_instance_uid)

    # -- helpers ---------------------------------------------------------------------------------------

    def _own_result(self, conn: Connection, instance: ReceivedInstance) -> str | None:
        """Why ``instance`` is one of our own result objects, or None: its SOP Instance UID or Series Instance
        UID is one we built, or its Manufacturer is ours (``reporting.manufacturer``)."""
        built = conn.execute(
            select(ResultObject.object_kind, ResultObject.revision)
            .where(or_(ResultObject.sop_instance_uid == instance.sop_instance_uid,
                       ResultObject.series_instance_uid == instance.series_instance_uid))
            .limit(1)
        ).first()
        if built is not None:
            return f"our own result object ({built.object_kind.value} of revision {built.revision})"
        if self.own_manufacturer and (instance.manufacturer or "").strip().casefold() == self.own_manufacturer:
            return f"our own result object (Manufacturer {instance.manufacturer!r})"
        return None

    def _receiving_study(self, conn: Connection, instance: ReceivedInstance) -> tuple[int, int]:
        """(study id, revision) for an arriving instance. Usually one UPDATE … RETURNING on a study already
        receiving; otherwise the study is created, or, when it already left ``receiving``, revision N+1 is
        opened (older analyses become superseded) — only by an analysable instance: anything else is filed
        under the current revision and changes nothing. An instance naming another Patient ID than the study
        raises :class:`InstanceConflict`."""
        touched = conn.execute(
            _TOUCH_RECEIVING,
            {"uid": instance.study_instance_uid, "at": instance.received_at,
             **{field: getattr(instance, field) for field in _STUDY_FIELDS}},
        ).first()
        if touched is not None:
            return touched.id, touched.revision
        now = instance.received_at
        found = conn.execute(
            select(Study.id, Study.state, Study.revision, Study.patient_id)
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
        if _other_patient(found.patient_id, instance.patient_id):
            raise InstanceConflict(f"study {instance.study_instance_uid} is recorded for patient {found.patient_id!r}; "
                                   f"instance {instance.sop_instance_uid} names patient {instance.patient_id!r}")
        if found.state == StudyState.RECEIVING:  # opened by a concurrent association since the touch above
            return found.id, found.revision
        if not instance.analysable:
            log.info("instance %s (%s) filed under study %s revision %d without opening a revision",
                     instance.sop_instance_uid, instance.not_analysed_reason, instance.study_instance_uid,
                     found.revision)
            return found.id, found.revision
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
        """The series row id, cached per process; a series recorded under another study is a conflict."""
        uid = instance.series_instance_uid
        cached = self._series_ids.get(uid)
        if cached is None:
            row = conn.execute(select(Series.id, Series.study_id).where(Series.series_instance_uid == uid)).first()
            if row is None:
                series_id = conn.execute(
                    insert(Series).values(
                        study_id=study_id, series_instance_uid=uid, modality=instance.modality,
                        series_number=instance.series_number, series_description=instance.series_description,
                        created_at=instance.received_at,
                    ).returning(Series.id)
                ).scalar_one()
                row = (series_id, study_id)
            cached = self._series_ids[uid] = (row[0], row[1])
        if cached[1] != study_id:
            raise InstanceConflict(f"series {uid} is recorded under another study than {instance.study_instance_uid}")
        return cached[0]


def _queue_originals(session, study: Study, revision: int, destinations: Sequence[str]) -> int:  # noqa: ANN001
    """In the completion transaction (the outbox): a pending ``originals`` delivery row of this revision for
    each destination the routing rules forward it to. Returns how many were created."""
    existing = set(session.scalars(select(Delivery.destination).where(
        Delivery.study_id == study.id, Delivery.revision == revision,
        Delivery.object_kind == DeliveryObject.ORIGINALS)))
    now = utcnow()
    created = 0
    for name in destinations:
        if name not in existing:
            session.add(Delivery(study_id=study.id, revision=revision, destination=name,
                                 object_kind=DeliveryObject.ORIGINALS, state=DeliveryState.PENDING,
                                 next_attempt_at=now, created_at=now, updated_at=now))
            created += 1
    return created


def _other_patient(recorded: str | None, received: str | None) -> bool:
    """Two Patient IDs that are both present and differ (an absent one is filled in, never a conflict)."""
    return bool(recorded and received and recorded.strip() != received.strip())


def _placement_statement():
    """Where the SOP Instance UID is recorded (study, series, patient), the Patient ID the study is recorded
    for, and the study the series is recorded in — NULL when unknown — as one row."""
    by_sop = Instance.sop_instance_uid == bindparam("sop")
    return select(
        select(Study.study_instance_uid).join(Instance, Instance.study_id == Study.id).where(by_sop)
        .scalar_subquery().label("recorded_study"),
        select(Series.series_instance_uid).join(Instance, Instance.series_id == Series.id).where(by_sop)
        .scalar_subquery().label("recorded_series"),
        select(Study.patient_id).join(Instance, Instance.study_id == Study.id).where(by_sop)
        .scalar_subquery().label("recorded_patient"),
        select(Study.patient_id).where(Study.study_instance_uid == bindparam("study"))
        .scalar_subquery().label("study_patient"),
        select(Study.study_instance_uid).join(Series, Series.study_id == Study.id)
        .where(Series.series_instance_uid == bindparam("series")).scalar_subquery().label("series_study"),
    )


_PLACEMENT = _placement_statement()


_STUDY_FIELDS = ("patient_id", "patient_name", "accession_number", "study_date", "study_description")


_TOUCH_RECEIVING = (
    update(Study)
    .where(
        Study.study_instance_uid == bindparam("uid"),
        Study.state == StudyState.RECEIVING,
        or_(Study.patient_id.is_(None), Study.patient_id == func.coalesce(bindparam("patient_id"), Study.patient_id)),
    )
    .values(
        last_instance_at=bindparam("at"),
        updated_at=bindparam("at"),
        **{field: func.coalesce(getattr(Study, field), bindparam(field)) for field in _STUDY_FIELDS},
    )
    .returning(Study.id, Study.revision)
)
"""Touch a study that is still receiving, filling identifying fields it lacks; no row if it is not (or if the
instance names another Patient ID)."""

_INSTANCE_COLUMNS = (
    "study_id", "series_id", "sop_class_uid", "transfer_syntax_uid", "instance_number", "laterality", "path",
    "size_bytes", "sha256", "calling_ae_title", "peer_host", "received_at", "revision", "analysable",
    "not_analysed_reason", "purged_at", "route",
)


@functools.cache
def _upsert_statement(dialect: str):
    """INSERT … ON CONFLICT (sop_instance_uid) DO UPDATE … RETURNING id: a replaced instance (or a row left by
    an earlier attempt) takes the new values — only in the same study and series (no row comes back otherwise:
    an instance never moves). Built once per dialect with bind parameters."""
    dialect_insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    statement = dialect_insert(Instance).values(
        {name: bindparam(name) for name in ("sop_instance_uid", *_INSTANCE_COLUMNS)}
    )
    return statement.on_conflict_do_update(
        index_elements=[Instance.sop_instance_uid],
        set_={name: statement.excluded[name] for name in _INSTANCE_COLUMNS},
        where=(Instance.study_id == statement.excluded.study_id) & (Instance.series_id == statement.excluded.series_id),
    ).returning(Instance.id)


def _upsert_instance(conn: Connection, instance: ReceivedInstance, study_id: int, series_id: int,
                     revision: int, route: dict | None = None) -> None:
    upserted = conn.execute(_upsert_statement(conn.dialect.name), {
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
        "not_analysed_reason": instance.not_analysed_reason,
        "purged_at": None,  # an instance received again after its file was purged has its file again
        "route": route,
    }).first()
    if upserted is None:
        raise InstanceConflict(f"SOP Instance UID {instance.sop_instance_uid} is recorded in another study or series")


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


class ReceivingWatcher:
    """Tells the node's completion tracker about instances recorded by another process: the API's DICOMweb
    STOW-RS service files instances through the same store and :class:`IngestService`, but the tracker lives in
    the node. Every ``interval`` seconds the studies still ``receiving`` are read (one small query); a study
    whose ``last_instance_at`` changed since the last look is armed (its stable window starts again from the
    moment the change was seen, on this process's clock, so clocks of other hosts do not matter). Instances the
    listener received itself are already tracked; arming them again changes nothing but a sub-second shift of
    their window, and never ends an interruption."""

    def __init__(self, db: Database, arm: Callable[[str], None], interval: float = 1.0) -> None:
        self.db = db
        self._arm = arm
        self.interval = interval
        self._seen: dict[str, object] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> list[str]:
        """One look; returns the studies armed."""
        with self.db.reading() as session:
            rows = session.execute(select(Study.study_instance_uid, Study.last_instance_at)
                                   .where(Study.state == StudyState.RECEIVING)).all()
        armed = [row.study_instance_uid for row in rows
                 if self._seen.get(row.study_instance_uid) != row.last_instance_at]
        self._seen = {row.study_instance_uid: row.last_instance_at for row in rows}
        for study_uid in armed:
            self._arm(study_uid)
        return armed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="receiving-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the watching
                log.exception("cannot read the studies still receiving; trying again")


@dataclass
class RunningNode:
    """A started listener with its ingest service, the watcher of instances filed by other processes, and its
    database; ``stop()`` shuts them down."""

    listener: Listener
    service: IngestService
    db: Database
    watcher: ReceivingWatcher | None = None

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.listener.stop()
        self.db.dispose()


def start_node(
    settings: Settings,
    on_complete: CompletionCallback | Iterable[CompletionCallback] | None = None,
    *,
    db: Database | None = None,
    on_forward: CompletionCallback | None = None,
) -> RunningNode:
    """Start the DICOM listener of ``settings`` recording into its database (already migrated), and the watcher
    that brings studies stored by DICOMweb STOW-RS (the API process) to completion."""
    db = db or Database(settings.database.url, echo=settings.database.echo)
    service = IngestService(db, on_complete, own_manufacturer=settings.reporting.manufacturer, rules=settings.rules,
                            on_forward=on_forward)
    listener = Listener(listener_params(settings), completion_params(settings), service)
    listener.start()
    watcher = ReceivingWatcher(db, listener.tracker.arm)
    watcher.check()  # the baseline: what pending_studies() already armed
    watcher.start()
    return RunningNode(listener, service, db, watcher)
