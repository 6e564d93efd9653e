"""Reporting and delivery of one study revision (DESIGN step 4).

Outbox: the transaction that stores an analysis also creates its delivery rows (:func:`create_outbox`), one
:class:`~worker.db.Delivery` per (destination, object kind), ``pending``; the delivery task is only a nudge, and
the bookkeeper sends whatever stays pending, so a lost message cannot strand a study in ``analysed``.

The result objects are built once and written to ``<home>/results/<Study>/r<revision>/`` before the first
send, so every retry sends the same instances; their UIDs are recorded (``result_objects``) so that the node
recognises them when a PACS sends them back. A worker *claims* due rows in one transaction
(``pending``/``retrying`` → ``sending``) so two workers never send the same row at once, and holds the claim
with a lease it renews while it works (:mod:`worker.pipeline.lease`): a slow destination is never sent to
twice; only a claim whose lease expired (the worker died) is taken back by the bookkeeper. Each claim is
checked again just before its send, so a worker that lost its claim starts no send. Every claim counts as an
attempt and ``max_attempts`` is never exceeded. A transient failure schedules the next attempt with exponential
backoff (``backoff_seconds · 2^(attempts-1)``); a permanent one (association rejected, SOP class refused, HTTP
4xx) goes straight to the dead-letter state ``dead``, as does a row whose attempts are exhausted, each with its
reason (:class:`~worker.db.FailureReason`). Only a worker holding claims builds the objects, and a failure to
build them counts as a failed attempt of its claims, so it ends in ``dead`` with its error instead of looping.

Originals (issue 15 item 2): a study revision that routing rules forward has one ``originals`` row per DICOM
destination, created when the study completes (:mod:`worker.ingest`), before and independently of any
analysis. :func:`forward_originals` sends the instances received in that revision as they are stored (the
data set bytes, UIDs and transfer syntax unchanged; transcoded only when the peer accepts nothing else, by
:func:`dicom_node.sender.send_files`), with the same claims, lease, retries, backoff and dead-letter state as
results; to a ``dicomweb`` destination the stored files go by STOW-RS
(:func:`worker.pipeline.dicomweb_delivery.send_originals_stow`), byte for byte. For a destination with
``originals_first`` (the default) the results of a revision are not claimed
before its originals were delivered there, and are dead-lettered (``originals_failed``) when the originals are.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from sqlalchemy import ColumnElement, and_, or_, update

from model.schema import StudyAnalysis
from worker.config import FORWARD_KINDS, ConfigError, Destination, Settings
from worker.db import (
    Analysis,
    AuditEvent,
    Database,
    Delivery,
    DeliveryObject,
    DeliveryState,
    FailureReason,
    Instance,
    ResultObject,
    Study,
    StudyState,
    utcnow,
)
from worker.logsetup import remember_dataset
from worker.pipeline.lease import Lease
from worker.pipeline.results import WrittenResults, read_results, write_results

if TYPE_CHECKING:
    from reporting import ReportObjects

log = logging.getLogger(__name__)

ACTOR = "delivery"
SOURCE_DEFER_SIZE = "256 KB"
"""Source elements larger than this (Pixel Data) stay on disk until a builder needs them: the SR and FHIR
Bundle never do, a key image reads its own source's."""
OPEN_STATES = (DeliveryState.PENDING, DeliveryState.RETRYING)
DICOM_KINDS = FORWARD_KINDS
"""Destinations that receive the DICOM result objects (one delivery row per object kind) and forwarded originals."""


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
        .where(Analysis.study_id == study.id, Analysis.revision == revision, Analysis.shadow.is_(False))
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
    from worker.signoff import signoff_for, verification_of

    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one()
        row = latest_analysis(session, study, revision)
        if row is None:
            raise LookupError(f"study {study_instance_uid} revision {revision} has no analysis")
        analysis = StudyAnalysis.model_validate(row.result)
        signed = signoff_for(session, study.id, revision)
        verification = verification_of(signed) if signed is not None else None
        if signed is not None:
            session.expunge(signed)
        uids = [image.sop_instance_uid for image in analysis.images if image.sop_instance_uid]
        paths = session.scalars(select(Instance.path).where(Instance.sop_instance_uid.in_(uids))).all()
    sources = [pydicom.dcmread(path, defer_size=SOURCE_DEFER_SIZE) for path in paths]  # Pixel Data read when used
    for source in sources:
        remember_dataset(source)  # redacted from this process's log lines (worker/logsetup.py)
    masks = _read_masks(folder if signed is None else  # a signed revision re-uses the masks of the one it signed
                        results_folder(settings, study_instance_uid, signed.signed_revision), uids)
    previous = read_results(results_folder(settings, study_instance_uid, revision - 1)) if revision > 1 else None
    previous_sr = pydicom.dcmread(previous.sr) if previous is not None else None
    objects = build_report_objects(
        analysis, sources, report_options(settings.reporting), vessel_masks=masks, previous_sr=previous_sr,
        verification=verification,
    )
    _register_objects(db, study_instance_uid, revision, objects)
    written = write_results(folder, analysis, objects, verification)
    _index_fhir(db, study_instance_uid, revision, objects.fhir_bundle)
    return written


def _register_objects(db: Database, study_instance_uid: str, revision: int, objects: ReportObjects) -> None:
    """Record the UIDs of the DICOM objects built (before they are written or sent), so that the node
    recognises them as ours when a PACS sends them back. Idempotent: rebuilding gives the same UIDs."""
    built = [(DeliveryObject.SR, objects.sr)]
    built += [(DeliveryObject.KEY_IMAGE, ds) for ds in objects.key_images]
    built += [(DeliveryObject.SEG, ds) for ds in objects.segmentations]
    built += [(DeliveryObject.PDF, objects.pdf)] if objects.pdf is not None else []
    with db.session() as session:
        study_id = session.scalars(select(Study.id).where(Study.study_instance_uid == study_instance_uid)).one()
        known = set(session.scalars(select(ResultObject.sop_instance_uid).where(
            ResultObject.sop_instance_uid.in_([str(ds.SOPInstanceUID) for _, ds in built]))))
        for kind, ds in built:
            if str(ds.SOPInstanceUID) not in known:
                session.add(ResultObject(study_id=study_id, revision=revision, object_kind=kind,
                                         sop_instance_uid=str(ds.SOPInstanceUID),
                                         series_instance_uid=str(ds.SeriesInstanceUID)))


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


def expected_kinds(settings: Settings, destination: Destination) -> list[DeliveryObject]:
    """The object kinds an analysis will send to ``destination`` with this configuration (the outbox rows)."""
    if destination.kind == "fhir":
        return [DeliveryObject.FHIR]
    if destination.kind == "folder":
        return [DeliveryObject.SR]  # the whole folder of result objects is one delivery
    if destination.kind == "hl7v2":
        return [DeliveryObject.HL7]  # one ORU^R01 per revision
    reporting = settings.reporting
    wanted = {DeliveryObject.KEY_IMAGE: reporting.key_image, DeliveryObject.PDF: reporting.pdf,
              DeliveryObject.SEG: reporting.segmentation}
    return [DeliveryObject.SR, *(kind for kind, on in wanted.items() if on)]


def create_outbox(session: Session, settings: Settings, study: Study, revision: int) -> int:
    """In the caller's transaction (the one storing the analysis): a ``pending`` delivery row for every
    destination and expected object kind of the revision that has none yet. Returns how many were created."""
    existing = set(session.execute(select(Delivery.destination, Delivery.object_kind).where(
        Delivery.study_id == study.id, Delivery.revision == revision)).tuples())
    now = utcnow()
    created = 0
    for destination in settings.destinations:
        for kind in expected_kinds(settings, destination):
            if (destination.name, kind) not in existing:
                session.add(Delivery(study_id=study.id, revision=revision, destination=destination.name,
                                     object_kind=kind, state=DeliveryState.PENDING, next_attempt_at=now,
                                     created_at=now, updated_at=now))
                created += 1
    return created


def _has_objects(destination: Destination, kind: DeliveryObject, written: WrittenResults) -> bool:
    """Whether the built results have anything of ``kind`` to send to ``destination``."""
    return destination.kind not in DICOM_KINDS or bool(written.dicom_objects.get(kind.value))


def _send(settings: Settings, destination: Destination, kind: DeliveryObject, written: WrittenResults) -> SendOutcome:
    if destination.kind == "dicom":
        return _send_dicom(settings, destination, written.dicom_objects[kind.value])
    if destination.kind == "dicomweb":
        from worker.pipeline.dicomweb_delivery import send_stow

        return send_stow(destination, written.dicom_objects[kind.value])
    if destination.kind == "fhir":
        return _send_fhir(destination, written.bundle)
    if destination.kind == "hl7v2":
        from worker.pipeline.hl7_delivery import send_hl7

        return send_hl7(destination, written)
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
    """Claim the due deliveries of one revision, build its result objects (once) and send them; return the
    study state. Only the worker holding claims builds, so concurrent messages for one revision never build it
    twice at once; with no destination configured the results are only built."""
    forward_originals(settings, db, study_instance_uid, revision)
    with db.reading() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one()
        if latest_analysis(session, study, revision) is None:
            return study.state  # nothing analysed (yet, or ever: not_applicable): only originals to forward
    if not settings.destinations:
        return _results_only(settings, db, study_instance_uid, revision)
    claims = _claim(settings, db, study_instance_uid, revision)
    if not claims:
        return _settle(db, study_instance_uid, revision)
    active = list(claims)
    with Lease(db, _renewal(active), settings.pipeline.heartbeat_seconds,
               f"deliveries of {study_instance_uid} r{revision}"):
        try:
            written = ensure_results(settings, db, study_instance_uid, revision)
        except Exception as exc:  # noqa: BLE001 -- counted as a failed attempt of every claim, never lost
            log.exception("building the results of study %s revision %d failed", study_instance_uid, revision)
            for claim in claims:
                _record(db, claim, SendOutcome(ok=False, detail=f"cannot build the result objects: "
                                                                f"{type(exc).__name__}: {exc}"))
            return _settle(db, study_instance_uid, revision)
        for claim in claims:
            if not _has_objects(claim.destination, claim.kind, written):
                _drop(db, claim)
            elif not _still_ours(db, claim):
                log.warning("delivery %d to %s: the claim was taken over before its send; not sending",
                            claim.delivery_id, claim.destination.name)
            else:
                try:
                    outcome = send(settings, claim.destination, claim.kind, written)
                except Exception as exc:  # a bug or an unexpected environment problem: retry, never crash the loop
                    log.exception("delivery %d to %s failed unexpectedly", claim.delivery_id, claim.destination.name)
                    outcome = SendOutcome(ok=False, detail=f"{type(exc).__name__}: {exc}")
                _record(db, claim, outcome)
            active.remove(claim)
    return _settle(db, study_instance_uid, revision)


def _results_only(settings: Settings, db: Database, study_instance_uid: str, revision: int) -> StudyState:
    """No destination: build the results on disk; a failure to build fails the study (audited)."""
    try:
        ensure_results(settings, db, study_instance_uid, revision)
    except Exception as exc:  # noqa: BLE001 -- the study fails visibly instead of staying analysed
        log.exception("building the results of study %s revision %d failed", study_instance_uid, revision)
        with db.session() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)
                                    .with_for_update()).one()
            if study.revision == revision:
                study.state = StudyState.FAILED
                session.add(AuditEvent(actor=ACTOR, action="results.failed", study_instance_uid=study_instance_uid,
                                       detail={"revision": revision, "detail": f"{type(exc).__name__}: {exc}"[:500]}))
    return _settle(db, study_instance_uid, revision)


@dataclass(frozen=True)
class Claim:
    """A delivery row this worker moved to ``sending``, as its ``attempts``-th attempt."""

    delivery_id: int
    destination: Destination
    kind: DeliveryObject
    attempt: int


def _is_claim(claim: Claim) -> ColumnElement[bool]:
    return and_(Delivery.id == claim.delivery_id, Delivery.attempts == claim.attempt,
                Delivery.state == DeliveryState.SENDING)


def _renewal(active: list[Claim]) -> Callable[[Session], int]:
    """Refresh ``updated_at`` (the lease) of the claims not yet settled that are still this worker's."""
    def renew(session: Session) -> int:
        current = list(active)
        if not current:
            return 1  # everything settled: nothing taken over
        return session.execute(update(Delivery).where(or_(*(_is_claim(c) for c in current)))
                               .values(updated_at=utcnow())).rowcount
    return renew


def _still_ours(db: Database, claim: Claim) -> bool:
    with db.session() as session:
        return session.scalars(select(Delivery.id).where(_is_claim(claim))).first() is not None


def _drop(db: Database, claim: Claim) -> None:
    """The results have no object of the claimed kind (e.g. no segmentation was possible): no delivery."""
    with db.session() as session:
        row = session.scalars(select(Delivery).where(_is_claim(claim))).first()
        if row is not None:
            log.info("delivery %d: the results have no %s object; nothing to send to %s", row.id,
                     row.object_kind.value, row.destination)
            session.delete(row)


def _destination(settings: Settings, name: str) -> Destination | None:
    try:
        return settings.destination(name)
    except ConfigError:
        return None


def _claim(settings: Settings, db: Database, study_instance_uid: str, revision: int) -> list[Claim]:
    """Create missing delivery rows and move the due ones to ``sending`` in one transaction. A row whose
    attempts are exhausted is dead-lettered instead, as is a row for a destination no longer configured."""
    claimed: list[Claim] = []
    with db.session() as session:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == study_instance_uid).with_for_update()
        ).one()
        if study.revision != revision:
            log.info("study %s revision %d is superseded by %d; not delivering", study_instance_uid, revision,
                     study.revision)
            return []
        if latest_analysis(session, study, revision) is None:
            log.warning("study %s revision %d has no analysis; nothing to deliver", study_instance_uid, revision)
            return []
        create_outbox(session, settings, study, revision)
        session.flush()
        now = utcnow()
        originals = {name: state for name, state in session.execute(select(Delivery.destination, Delivery.state)
                     .where(Delivery.study_id == study.id, Delivery.revision == revision,
                            Delivery.object_kind == DeliveryObject.ORIGINALS)).all()}
        rows = session.scalars(select(Delivery).where(Delivery.study_id == study.id, Delivery.revision == revision,
                                                      Delivery.object_kind != DeliveryObject.ORIGINALS,
                                                      Delivery.state.in_(OPEN_STATES))).all()
        for row in rows:
            destination = _destination(settings, row.destination)
            if destination is None:
                _dead(session, row, study, FailureReason.DESTINATION_REMOVED,
                      f"destination {row.destination!r} is no longer configured")
                continue
            waiting_for = originals.get(row.destination) if destination.originals_first else None
            if waiting_for == DeliveryState.DEAD:
                _dead(session, row, study, FailureReason.ORIGINALS_FAILED,
                      f"the originals of this revision could not be delivered to {row.destination!r} "
                      "(destinations[].originals_first)")
                continue
            if waiting_for is not None and waiting_for != DeliveryState.DELIVERED:
                continue  # the originals go first: claimed once they are delivered
            if row.next_attempt_at is not None and row.next_attempt_at > now:
                continue
            if row.attempts >= destination.max_attempts:
                _dead(session, row, study, FailureReason.ATTEMPTS_EXHAUSTED,
                      f"{row.attempts} of {destination.max_attempts} attempts used; last error: {row.last_error}")
                continue
            row.state = DeliveryState.SENDING
            row.attempts += 1
            row.updated_at = now
            claimed.append(Claim(row.id, destination, row.object_kind, row.attempts))
        if study.state in (StudyState.ANALYSED, StudyState.DELIVERED, StudyState.FAILED) and claimed:
            study.state = StudyState.DELIVERING
    return claimed


def forward_originals(settings: Settings, db: Database, study_instance_uid: str, revision: int) -> int:
    """Claim the due ``originals`` rows of a revision and send its received instances to each destination;
    returns how many were claimed. Never needs an analysis or the model."""
    claims = _claim_originals(settings, db, study_instance_uid, revision)
    if not claims:
        return 0
    with db.reading() as session:
        study_id = session.scalars(select(Study.id).where(Study.study_instance_uid == study_instance_uid)).one()
        rows = session.execute(select(Instance.path, Instance.purged_at).where(
            Instance.study_id == study_id, Instance.revision == revision,
            or_(Instance.not_analysed_reason.is_(None),
                ~Instance.not_analysed_reason.startswith(OWN_RESULT_REASON))).order_by(Instance.id)).all()
    paths = [Path(row.path) for row in rows if row.purged_at is None]
    purged = len(rows) - len(paths)
    active = list(claims)
    with Lease(db, _renewal(active), settings.pipeline.heartbeat_seconds,
               f"originals of {study_instance_uid} r{revision}"):
        for claim in claims:
            if not _still_ours(db, claim):
                log.warning("delivery %d to %s: the claim was taken over before its send; not sending",
                            claim.delivery_id, claim.destination.name)
            elif purged:
                _record(db, claim, SendOutcome(ok=False, permanent=True, detail=(
                    f"{purged} original(s) of this revision were purged (storage.retain_days) before forwarding")))
            else:
                try:
                    outcome = _forward(settings, claim.destination, study_instance_uid, paths)
                except Exception as exc:  # a bug or an unexpected environment problem: retried
                    log.exception("forwarding %d to %s failed unexpectedly", claim.delivery_id,
                                  claim.destination.name)
                    outcome = SendOutcome(ok=False, detail=f"{type(exc).__name__}: {exc}")
                _record(db, claim, outcome)
            active.remove(claim)
    return len(claims)


def _forward(settings: Settings, destination: Destination, study_instance_uid: str, paths: list[Path]) -> SendOutcome:
    """One attempt to send a revision's stored originals, unchanged: C-STORE to a ``dicom`` destination, STOW-RS
    of the stored files to a ``dicomweb`` one."""
    if destination.kind == "dicomweb":
        from worker.pipeline.dicomweb_delivery import send_originals_stow

        return send_originals_stow(destination, study_instance_uid, paths)
    from dicom_node.sender import Failure, send_files
    from worker.dicom_params import peer_params

    result = send_files(peer_params(settings, destination), paths)
    if result.ok:
        return SendOutcome(ok=True, detail=f"{len(result.instances)} original(s) stored")
    failed = [r for r in result.instances if not r.ok]
    detail = result.association_error or "; ".join(f"{r.sop_instance_uid}: {r.message}" for r in failed)
    return SendOutcome(ok=False, permanent=result.failure == Failure.PERMANENT, detail=detail[:500])


OWN_RESULT_REASON = "our own result object"
"""How :mod:`worker.ingest` starts the not-analysed reason of our own objects sent back (never forwarded)."""


def _claim_originals(settings: Settings, db: Database, study_instance_uid: str, revision: int) -> list[Claim]:
    """Move the due ``originals`` rows of a revision to ``sending`` (one transaction), dead-lettering rows
    whose destination is gone or whose attempts are exhausted."""
    claimed: list[Claim] = []
    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)
                                .with_for_update()).one()
        now = utcnow()
        rows = session.scalars(select(Delivery).where(
            Delivery.study_id == study.id, Delivery.revision == revision,
            Delivery.object_kind == DeliveryObject.ORIGINALS, Delivery.state.in_(OPEN_STATES))).all()
        for row in rows:
            destination = _destination(settings, row.destination)
            if destination is None or destination.kind not in FORWARD_KINDS:
                _dead(session, row, study, FailureReason.DESTINATION_REMOVED,
                      f"destination {row.destination!r} is no longer configured as a dicom or dicomweb destination")
                continue
            if row.next_attempt_at is not None and row.next_attempt_at > now:
                continue
            if row.attempts >= destination.max_attempts:
                _dead(session, row, study, FailureReason.ATTEMPTS_EXHAUSTED,
                      f"{row.attempts} of {destination.max_attempts} attempts used; last error: {row.last_error}")
                continue
            row.state, row.attempts, row.updated_at = DeliveryState.SENDING, row.attempts + 1, now
            claimed.append(Claim(row.id, destination, row.object_kind, row.attempts))
    return claimed


def _dead(session: Session, row: Delivery, study: Study, reason: FailureReason, detail: str) -> None:
    """Dead-letter a delivery row with its reason (audited)."""
    row.state, row.failure, row.last_error = DeliveryState.DEAD, reason, detail[:2000]
    session.add(AuditEvent(actor=ACTOR, action="delivery.dead", study_instance_uid=study.study_instance_uid,
                           detail={"destination": row.destination, "object": row.object_kind.value,
                                   "revision": row.revision, "attempts": row.attempts, "reason": reason.value,
                                   "detail": detail[:500]}))
    log.warning("delivery.dead %s → %s (%s): %s", study.study_instance_uid, row.destination, reason.value, detail)


def _record(db: Database, claim: Claim, outcome: SendOutcome) -> None:
    """Store the outcome of a claimed attempt, unless the row was taken from this worker meanwhile (its lease
    expired, or an operator resent): then the newer claim's outcome counts and this one starts nothing."""
    destination = claim.destination
    with db.session() as session:
        row = session.get(Delivery, claim.delivery_id)
        assert row is not None
        study = session.get(Study, row.study_id)
        study_uid = study.study_instance_uid
        if row.state != DeliveryState.SENDING or row.attempts != claim.attempt:
            log.warning("delivery %d to %s: attempt %d finished after the row moved on (%s, attempt %d); "
                        "outcome not recorded: %s", row.id, destination.name, claim.attempt, row.state.value,
                        row.attempts, outcome.detail)
            return
        if outcome.ok:
            row.state, row.delivered_at, row.last_error = DeliveryState.DELIVERED, utcnow(), None
            row.remote_id, row.failure = outcome.remote_id, None
            action = "delivery.delivered"
        elif outcome.permanent:
            _dead(session, row, study, FailureReason.REFUSED, outcome.detail)
            return
        elif row.attempts >= destination.max_attempts:
            _dead(session, row, study, FailureReason.ATTEMPTS_EXHAUSTED,
                  f"{row.attempts} of {destination.max_attempts} attempts used; last error: {outcome.detail}")
            return
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
