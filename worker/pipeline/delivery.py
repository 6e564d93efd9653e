"""Reporting and delivery of one study revision (DESIGN step 4).

The result objects are built once and written to ``<home>/results/<Study>/r<revision>/`` before the first
send, so every retry sends the same instances. Each (destination, object kind) pair is one
:class:`~worker.db.Delivery` row with its own retry state: a worker *claims* due rows in one transaction
(``pending``/``retrying`` → ``sending``) so two workers never send the same row at once; a transient failure
schedules the next attempt with exponential backoff (``backoff_seconds · 2^(attempts-1)``) until
``max_attempts``, a permanent failure (association rejected, SOP class refused, HTTP 4xx) goes straight to the
dead-letter state ``dead``. The bookkeeper re-enqueues rows whose next attempt is due.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from model.schema import StudyAnalysis
from worker.config import Destination, Settings
from worker.db import (
    Analysis,
    AuditEvent,
    Database,
    Delivery,
    DeliveryObject,
    DeliveryState,
    Instance,
    Study,
    StudyState,
    utcnow,
)
from worker.pipeline.results import WrittenResults, read_results, write_results

log = logging.getLogger(__name__)

ACTOR = "delivery"
SOURCE_DEFER_SIZE = "256 KB"
"""Source elements larger than this (Pixel Data) stay on disk until a builder needs them: the SR and FHIR
Bundle never do, a key image reads its own source's."""
OPEN_STATES = (DeliveryState.PENDING, DeliveryState.RETRYING)


@dataclass(frozen=True)
class SendOutcome:
    """What one attempt did: ``ok``, else whether the failure is permanent, with a one-line reason."""

    ok: bool
    permanent: bool = False
    detail: str = ""
    remote_id: str | None = None


def results_folder(settings: Settings, study_instance_uid: str, revision: int) -> Path:
    return settings.home / "results" / study_instance_uid / f"r{revision}"


def latest_analysis(session: Session, study: Study, revision: int) -> Analysis | None:
    return session.scalars(
        select(Analysis)
        .where(Analysis.study_id == study.id, Analysis.revision == revision)
        .order_by(Analysis.id.desc())
    ).first()


def ensure_results(settings: Settings, db: Database, study_instance_uid: str, revision: int) -> WrittenResults:
    """The result objects of a revision, built from its stored analysis on first use."""
    folder = results_folder(settings, study_instance_uid, revision)
    written = read_results(folder)
    if written is not None:
        return written
    from reporting import build_report_objects
    from worker.reporting_params import report_options

    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one()
        row = latest_analysis(session, study, revision)
        if row is None:
            raise LookupError(f"study {study_instance_uid} revision {revision} has no analysis")
        analysis = StudyAnalysis.model_validate(row.result)
        uids = [image.sop_instance_uid for image in analysis.images if image.sop_instance_uid]
        paths = session.scalars(select(Instance.path).where(Instance.sop_instance_uid.in_(uids))).all()
    sources = [pydicom.dcmread(path, defer_size=SOURCE_DEFER_SIZE) for path in paths]  # Pixel Data read when used
    masks = _read_masks(folder, uids)
    previous = read_results(results_folder(settings, study_instance_uid, revision - 1)) if revision > 1 else None
    previous_sr = pydicom.dcmread(previous.sr) if previous is not None else None
    objects = build_report_objects(
        analysis, sources, report_options(settings.reporting), vessel_masks=masks, previous_sr=previous_sr
    )
    written = write_results(folder, analysis, objects)
    _index_fhir(db, study_instance_uid, revision, objects.fhir_bundle)
    return written


def _read_masks(folder: Path, uids: list[str]) -> dict:
    import numpy as np
    from PIL import Image

    masks = {}
    for uid in uids:
        path = folder / "masks" / f"vessels-{uid}.png"
        if path.is_file():
            with Image.open(path) as img:
                masks[uid] = np.asarray(img) > 0
    return masks


def _index_fhir(db: Database, study_instance_uid: str, revision: int, bundle: dict) -> None:
    """Make the built FHIR resources searchable through the API (the same resources, one source of truth)."""
    from worker.fhir_store import index_bundle

    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one()
        index_bundle(session, study.id, revision, bundle)


def _kinds_for(destination: Destination, written: WrittenResults) -> list[DeliveryObject]:
    if destination.kind == "fhir":
        return [DeliveryObject.FHIR]
    if destination.kind == "folder":
        return [DeliveryObject.SR]  # the whole folder of result objects is one delivery
    return [DeliveryObject(kind) for kind, paths in written.dicom_objects.items() if paths]


def _send(settings: Settings, destination: Destination, kind: DeliveryObject, written: WrittenResults) -> SendOutcome:
    if destination.kind == "dicom":
        return _send_dicom(settings, destination, written.dicom_objects[kind.value])
    if destination.kind == "fhir":
        return _send_fhir(destination, written.bundle)
    return _copy_folder(destination, written)


def _send_dicom(settings: Settings, destination: Destination, paths: list[Path]) -> SendOutcome:
    from dicom_node.sender import Failure, send_files
    from worker.dicom_params import peer_params

    result = send_files(peer_params(settings, destination), paths)
    if result.ok:
        return SendOutcome(ok=True, detail=f"{len(result.instances)} instance(s) stored")
    failed = [r for r in result.instances if not r.ok]
    detail = result.association_error or "; ".join(f"{r.sop_instance_uid}: {r.message}" for r in failed)
    return SendOutcome(ok=False, permanent=result.failure == Failure.PERMANENT, detail=detail[:500])


def _send_fhir(destination: Destination, bundle_path: Path) -> SendOutcome:
    from worker.reporting_params import fhir_client

    bundle = json.loads(bundle_path.read_text())
    with fhir_client(destination, max_attempts=1) as client:
        result = client.post_transaction(bundle)
    return SendOutcome(ok=result.ok, permanent=result.permanent, detail=result.detail)


def _copy_folder(destination: Destination, written: WrittenResults) -> SendOutcome:
    assert destination.path is not None
    study_uid, revision = written.folder.parent.name, written.folder.name
    target = destination.path / study_uid / revision
    staging = target.with_name(f".{revision}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in written.all_files():
        shutil.copy2(path, staging / path.name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return SendOutcome(ok=True, detail=f"copied to {target}", remote_id=str(target))


def backoff(destination: Destination, attempts: int) -> dt.timedelta:
    return dt.timedelta(seconds=destination.backoff_seconds * 2 ** max(attempts - 1, 0))


def deliver_revision(
    settings: Settings, db: Database, study_instance_uid: str, revision: int,
    *, send: Callable[[Settings, Destination, DeliveryObject, WrittenResults], SendOutcome] = _send,
) -> StudyState:
    """Build (once) and send the results of one revision to every destination; return the study state."""
    written = ensure_results(settings, db, study_instance_uid, revision)
    for claim in _claim(settings, db, study_instance_uid, revision, written):
        try:
            outcome = send(settings, claim.destination, claim.kind, written)
        except Exception as exc:  # a bug or an unexpected environment problem: retry, never crash the loop
            log.exception("delivery %d to %s failed unexpectedly", claim.delivery_id, claim.destination.name)
            outcome = SendOutcome(ok=False, detail=f"{type(exc).__name__}: {exc}")
        _record(db, claim, outcome)
    return _settle(db, study_instance_uid, revision)


@dataclass(frozen=True)
class Claim:
    """A delivery row this worker moved to ``sending``, as its ``attempts``-th attempt."""

    delivery_id: int
    destination: Destination
    kind: DeliveryObject
    attempt: int


def _claim(
    settings: Settings, db: Database, study_instance_uid: str, revision: int, written: WrittenResults
) -> list[Claim]:
    """Create missing delivery rows and move the due ones to ``sending`` in one transaction."""
    now = utcnow()
    claimed: list[Claim] = []
    with db.session() as session:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == study_instance_uid).with_for_update()
        ).one()
        if study.revision != revision:
            log.info("study %s revision %d is superseded by %d; not delivering", study_instance_uid, revision,
                     study.revision)
            return []
        existing = {
            (d.destination, d.object_kind): d
            for d in session.scalars(select(Delivery).where(Delivery.study_id == study.id,
                                                            Delivery.revision == revision))
        }
        for destination in settings.destinations:
            for kind in _kinds_for(destination, written):
                row = existing.get((destination.name, kind))
                if row is None:
                    row = Delivery(study_id=study.id, revision=revision, destination=destination.name,
                                   object_kind=kind, state=DeliveryState.PENDING, next_attempt_at=now)
                    session.add(row)
                    session.flush()
                due = row.next_attempt_at is None or row.next_attempt_at <= now
                if row.state in OPEN_STATES and due:
                    row.state = DeliveryState.SENDING
                    row.attempts += 1
                    claimed.append(Claim(row.id, destination, kind, row.attempts))
        if study.state in (StudyState.ANALYSED, StudyState.DELIVERED, StudyState.FAILED) and claimed:
            study.state = StudyState.DELIVERING
    return claimed


def _record(db: Database, claim: Claim, outcome: SendOutcome) -> None:
    """Store the outcome of a claimed attempt, unless the row was taken from this worker meanwhile (the
    bookkeeper judged the claim stale, or an operator resent): then the newer claim's outcome counts."""
    destination = claim.destination
    with db.session() as session:
        row = session.get(Delivery, claim.delivery_id)
        assert row is not None
        study_uid = session.get(Study, row.study_id).study_instance_uid
        if row.state != DeliveryState.SENDING or row.attempts != claim.attempt:
            log.warning("delivery %d to %s: attempt %d finished after the row moved on (%s, attempt %d); "
                        "outcome not recorded: %s", row.id, destination.name, claim.attempt, row.state.value,
                        row.attempts, outcome.detail)
            return
        if outcome.ok:
            row.state, row.delivered_at, row.last_error = DeliveryState.DELIVERED, utcnow(), None
            row.remote_id = outcome.remote_id
            action = "delivery.delivered"
        elif outcome.permanent or row.attempts >= destination.max_attempts:
            row.state, row.last_error = DeliveryState.DEAD, outcome.detail
            action = "delivery.dead"
        else:
            now = utcnow()  # one clock reading: the bookkeeper tells a scheduled retry by updated_at <= next
            row.state, row.last_error, row.updated_at = DeliveryState.RETRYING, outcome.detail, now
            row.next_attempt_at = now + backoff(destination, row.attempts)
            action = "delivery.retrying"
        session.add(AuditEvent(actor=ACTOR, action=action, study_instance_uid=study_uid,
                               detail={"destination": destination.name, "object": row.object_kind.value,
                                       "revision": row.revision, "attempts": row.attempts,
                                       "detail": outcome.detail}))
    log_line = log.info if outcome.ok else log.warning
    log_line("%s %s → %s: %s", action, study_uid, destination.name, outcome.detail)


def _settle(db: Database, study_instance_uid: str, revision: int) -> StudyState:
    """The study state that follows from its deliveries: all delivered, some dead, or still going."""
    with db.session() as session:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == study_instance_uid).with_for_update()
        ).one()
        if study.revision != revision:
            return study.state
        states = set(session.scalars(select(Delivery.state).where(Delivery.study_id == study.id,
                                                                  Delivery.revision == revision)))
        if states and states <= {DeliveryState.DELIVERED}:
            study.state = StudyState.DELIVERED
        elif not states:
            study.state = StudyState.DELIVERED  # no destinations configured: the results are on disk
        elif states <= {DeliveryState.DELIVERED, DeliveryState.DEAD}:
            study.state = StudyState.FAILED
        else:
            study.state = StudyState.DELIVERING
        return study.state
