"""Retrieval from a query/retrieve peer (issue 15 item 4): ``studies rerun`` of a purged study and ``studies
fetch``.

A study is fetched by C-FIND (to check what the archive holds), then C-GET (``archives[].retrieve = "get"``, the
default: the instances come back on our own association and are stored by this process through the node's receive
path, :meth:`dicom_node.listener.Listener.retrieval_handlers`) or C-MOVE to our own AE title (``"move"``: the
archive sends them to the running node's listener), :mod:`dicom_node.retrieve`, PS3.4 Annex C. Either way they are
filed like any C-STORE, which is what keeps retrieval safe:

- an instance of a purged study comes back under the same UIDs and path and its row is un-purged; an analysable
  one opens the study's next revision (older analyses superseded), which is analysed at completion, so its new
  SR and FHIR report supersede the old ones;
- a study the archive holds under another Patient ID than the one recorded here is refused before anything is
  moved, and an instance naming another patient, study or series is refused by the listener (0xC004,
  ``instance.uid_conflict``): nothing is ever filed to another patient;
- every failure (archive down, no match, association rejected, the archive refusing the move, sub-operations
  that failed, the node not recording what the archive reported sent) is one :class:`RetrievalError` line; the
  CLI exits non-zero. Whatever was stored stays stored.

Each retrieve is audited (``study.retrieved`` or ``study.retrieve_failed``, actor the operator).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select

from dicom_node.retrieve import FoundStudy, MoveResult, RetrieveError, find_studies, get_study, move_study
from worker.config import Archive, Settings
from worker.db import AuditEvent, Database, Instance, Study, utcnow
from worker.dicom_params import archive_params
from worker.pipeline.jobs import PipelineError

log = logging.getLogger(__name__)

_POLL = 0.25

Progress = Callable[[int, int | None], None]


class RetrievalError(PipelineError):
    """A fetch that did not bring the study back whole; one line saying why."""


@dataclass(frozen=True, slots=True)
class Retrieved:
    study_instance_uid: str
    patient_id: str | None
    sent: int
    """Instances the archive reported sent (completed + warning sub-operations)."""
    revision: int


def find(settings: Settings, archive: Archive, *, study_instance_uid: str | None = None,
         patient_id: str | None = None, since: dt.date | None = None) -> list[FoundStudy]:
    """The archive's studies matching the query (C-FIND, Study Root)."""
    try:
        return find_studies(archive_params(settings, archive), study_instance_uid=study_instance_uid,
                            patient_id=patient_id, since=since)
    except RetrieveError as exc:
        raise RetrievalError(f"archive {archive.name}: {exc}") from None


def retrieve_study(settings: Settings, db: Database, archive: Archive, found: FoundStudy, *, actor: str,
                   progress: Progress | None = None) -> Retrieved:
    """Move one study the archive holds to our listener and wait until the node recorded what was sent.

    Refused without moving anything when the study is recorded here for another Patient ID than the archive
    returned."""
    uid = found.study_instance_uid
    with db.reading() as session:
        recorded_patient = session.scalar(select(Study.patient_id).where(Study.study_instance_uid == uid))
    if recorded_patient and found.patient_id and recorded_patient.strip() != found.patient_id.strip():
        reason = (f"archive {archive.name} holds study {uid} for patient {found.patient_id!r}, but it is recorded "
                  f"here for patient {recorded_patient!r}: not retrieved (nothing is filed to another patient)")
        _audit(db, actor, "study.retrieve_failed", uid, archive=archive.name, reason=reason)
        raise RetrievalError(reason)
    destination = archive.move_destination or settings.dicom.ae_title
    try:
        if archive.retrieve == "get":
            result = _get(settings, db, archive, uid, progress)
        else:
            result = move_study(archive_params(settings, archive), uid, destination, progress)
    except RetrieveError as exc:
        _audit(db, actor, "study.retrieve_failed", uid, archive=archive.name, reason=str(exc))
        raise RetrievalError(f"archive {archive.name}: {exc}") from None
    if not result.ok or result.completed + result.warning == 0:
        reason = _retrieve_failure(archive, uid, destination, result)
        _audit(db, actor, "study.retrieve_failed", uid, archive=archive.name, reason=reason,
               completed=result.completed, failed=result.failed, warning=result.warning)
        raise RetrievalError(reason)
    sent = result.completed + result.warning
    stored = _wait_recorded(db, uid, sent, archive.record_timeout)
    if stored < sent:
        reason = (f"archive {archive.name} reported {sent} instance(s) of study {uid} sent to {destination}, but "
                  f"the node recorded {stored} within {archive.record_timeout:g} s (is `retinalgpt node` the "
                  f"listener called {destination}?)")
        _audit(db, actor, "study.retrieve_failed", uid, archive=archive.name, reason=reason, completed=sent)
        raise RetrievalError(reason)
    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid).with_for_update()).one()
        if study.purged_at is not None and not session.scalar(select(func.count()).select_from(Instance).where(
                Instance.study_id == study.id, Instance.purged_at.is_not(None))):
            study.purged_at = None
        session.add(AuditEvent(actor=actor, action="study.retrieved", study_instance_uid=uid,
                               detail={"archive": archive.name, "instances": sent, "revision": study.revision}))
        revision = study.revision
    log.info("study %s: %d instance(s) retrieved from archive %s (revision %d)", uid, sent, archive.name, revision)
    return Retrieved(uid, found.patient_id, sent, revision)


def retrieve_for_rerun(settings: Settings, db: Database, archive: Archive, study_instance_uid: str, *,
                       actor: str, progress: Progress | None = None) -> Retrieved:
    """Fetch a purged study back by its Study Instance UID (the archive must hold exactly this study for the
    recorded patient); the instances re-open the study for analysis as its next revision."""
    matches = find(settings, archive, study_instance_uid=study_instance_uid)
    matches = [m for m in matches if m.study_instance_uid == study_instance_uid]
    if not matches:
        reason = f"archive {archive.name} has no study {study_instance_uid} (C-FIND found no match)"
        _audit(db, actor, "study.retrieve_failed", study_instance_uid, archive=archive.name, reason=reason)
        raise RetrievalError(reason)
    patients = {(m.patient_id or "").strip() for m in matches}
    if len(patients) > 1:
        reason = (f"archive {archive.name} holds study {study_instance_uid} under several Patient IDs "
                  f"({', '.join(sorted(patients))}): not retrieved")
        _audit(db, actor, "study.retrieve_failed", study_instance_uid, archive=archive.name, reason=reason)
        raise RetrievalError(reason)
    return retrieve_study(settings, db, archive, matches[0], actor=actor, progress=progress)


def _wait_recorded(db: Database, uid: str, sent: int, timeout: float) -> int:
    """Instances of the study stored now (not purged), once at least ``sent`` or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with db.reading() as session:
            stored = session.scalar(select(func.count()).select_from(Instance).join(Study, Study.id == Instance.study_id)
                                    .where(Study.study_instance_uid == uid, Instance.purged_at.is_(None))) or 0
        if stored >= sent or time.monotonic() >= deadline:
            return stored
        time.sleep(_POLL)


def _get(settings: Settings, db: Database, archive: Archive, uid: str, progress: Progress | None) -> MoveResult:
    """C-GET the study into this process: a listener that is never started stores what the archive sends (the
    node's receive path and ingest service, so the rows, routing and revisions are the node's own), then each
    study it received is completed here (queued for analysis), whatever the outcome of the retrieve."""
    from dicom_node.listener import Listener
    from worker.celery_app import make_celery
    from worker.dicom_params import completion_params, listener_params
    from worker.ingest import IngestService
    from worker.pipeline.jobs import Pipeline

    pipeline = Pipeline(settings, db, make_celery(settings))
    service = IngestService(db, pipeline.study_complete, own_manufacturer=settings.reporting.manufacturer,
                            rules=settings.rules, on_forward=pipeline.send_delivery)
    receiver = Listener(listener_params(settings), completion_params(settings), service)
    try:
        return get_study(archive_params(settings, archive), uid, receiver.retrieval_handlers(), progress)
    finally:
        for received in receiver.tracker.tracked():
            service.study_stable(received)


def _retrieve_failure(archive: Archive, uid: str, destination: str, result: MoveResult) -> str:
    comment = f" ({result.error_comment})" if result.error_comment else ""
    how = "C-GET" if archive.retrieve == "get" else "C-MOVE"
    if result.failed or result.status != 0x0000:
        where = ("" if archive.retrieve == "get" else
                 f"; else check that the node is listening as {destination} and that the archive knows that AE title")
        return (f"incomplete retrieve of study {uid} from archive {archive.name} ({how} status "
                f"0x{result.status:04X}{comment}): {result.completed + result.warning} instance(s) sent, "
                f"{result.failed} failed; what was stored stays stored. The node's audit trail says why it refused "
                f"an instance (instance.uid_conflict, instance.rejected){where}")
    return f"archive {archive.name} sent no instance of study {uid} (status 0x{result.status:04X}{comment})"


def _audit(db: Database, actor: str, action: str, uid: str, **detail: object) -> None:
    with db.session() as session:
        session.add(AuditEvent(at=utcnow(), actor=actor, action=action, study_instance_uid=uid, detail=detail))
