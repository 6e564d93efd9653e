"""The pipeline's database logic: referral rules, delivery retry / dead-letter, bookkeeper re-queueing,
rerun and resend — on a real SQLite database with real result objects; peers are replaced by a scripted
``send`` here (the end-to-end suite runs them against Orthanc and a FHIR server)."""

from __future__ import annotations

import datetime as dt
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import delete, select, update

from model.schema import (
    Condition,
    Finding,
    ImageAnalysis,
    Laterality,
    Measurement,
    ModelIdentity,
    Quality,
    QualityGrade,
    Referral,
    StudyAnalysis,
)
from worker.celery_app import ANSWER_QUESTION, DELIVER_STUDY, PROCESS_STUDY, make_celery
from worker.config import load_settings
from worker.db import (
    Analysis,
    AuditEvent,
    Database,
    Delivery,
    DeliveryObject,
    DeliveryState,
    FailureReason,
    Instance,
    Job,
    JobKind,
    JobState,
    Series,
    Study,
    StudyState,
    utcnow,
)
from worker.db.migrate import upgrade
from worker.pipeline.bookkeeper import Bookkeeper
from worker.pipeline.delivery import SendOutcome, create_outbox, deliver_revision
from worker.pipeline.jobs import Pipeline, PipelineError
from worker.pipeline.operations import list_jobs
from worker.pipeline.processing import run_job
from worker.pipeline.tasks import register_tasks
from worker.pipeline.referral import image_referral, impression, study_referral
from worker.pipeline.sources import ophthalmic_photograph


def image(grade: int | None = None, *, dme: int | None = None, quality: QualityGrade = QualityGrade.GRADABLE,
          cdr: float | None = None, eye: Laterality = Laterality.RIGHT) -> ImageAnalysis:
    findings = []
    if grade is not None:
        findings.append(Finding(condition=Condition.DIABETIC_RETINOPATHY, grade=grade, probability=0.9 if grade else 0.1))
    if dme is not None:
        findings.append(Finding(condition=Condition.DIABETIC_MACULAR_EDEMA, grade=dme, probability=0.5))
    measurements = [Measurement(key="CDR_vertical", value=cdr, unit="1")] if cdr is not None else []
    return ImageAnalysis(sop_instance_uid=generate_uid(), laterality=eye, findings=findings, measurements=measurements,
                         quality=Quality(grade=quality, score=0.9 if quality != QualityGrade.REJECT else 0.1,
                                         reasons=[] if quality != QualityGrade.REJECT else ["blur"]))


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        ([image(0), image(1, eye=Laterality.LEFT)], Referral.NONE),
        ([image(2), image(0, eye=Laterality.LEFT)], Referral.ROUTINE),
        ([image(3), image(0, eye=Laterality.LEFT)], Referral.URGENT),
        ([image(4)], Referral.URGENT),
        ([image(0, dme=2)], Referral.URGENT),
        ([image(0, dme=1)], Referral.ROUTINE),
        ([image(cdr=0.72)], Referral.ROUTINE),
        ([image(cdr=0.5)], Referral.NONE),
        ([image(quality=QualityGrade.REJECT), image(quality=QualityGrade.REJECT, eye=Laterality.LEFT)],
         Referral.UNGRADABLE),
        ([image(quality=QualityGrade.REJECT), image(3, eye=Laterality.LEFT)], Referral.URGENT),
        ([image(quality=QualityGrade.REJECT), image(0, eye=Laterality.LEFT)], Referral.NONE),
    ],
)
def test_study_referral_follows_icdr_thresholds(images: list[ImageAnalysis], expected: Referral) -> None:
    assert study_referral(images) == expected


def test_impression_names_each_eye_and_says_when_the_model_did_not_run() -> None:
    text = impression([image(3), image(0, eye=Laterality.LEFT)], model_ran=False)
    assert "Right eye: severe non-proliferative diabetic retinopathy" in text
    assert "Left eye: no referable findings" in text
    assert "Referral: urgent." in text and "RetinalGPT was not run" in text
    assert image_referral(image(2))[1] == ["moderate non-proliferative diabetic retinopathy"]


def test_impression_names_the_conditions_not_assessed() -> None:
    """A condition the model was not trained on is named "not assessed" on every gradable eye, never implied
    absent by "no referable findings"; an ungradable eye only says it is not gradable."""
    right, left = image(0), image(3, eye=Laterality.LEFT)
    right.not_assessed = [Condition.GLAUCOMA, Condition.CATARACT]
    left.not_assessed = [Condition.GLAUCOMA]
    text = impression([right, left], model_ran=True)
    assert "Right eye: no referable findings among the conditions assessed; not assessed: glaucoma, cataract." in text
    assert "Left eye: severe non-proliferative diabetic retinopathy; not assessed: glaucoma." in text
    blocked = image(quality=QualityGrade.REJECT)
    blocked.not_assessed = [Condition.GLAUCOMA]
    assert impression([blocked], model_ran=True) == "Right eye: image not gradable: blur. Referral: ungradable."


class FakeCelery:
    """Records the tasks the pipeline sends (the broker itself is exercised by the end-to-end suite)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def send_task(self, name: str, kwargs: dict) -> object:
        self.sent.append((name, kwargs))
        return type("Result", (), {"id": f"task-{len(self.sent)}"})()


@dataclass
class World:
    settings: object
    db: Database
    celery: FakeCelery
    pipeline: Pipeline
    study_uid: str
    sources: list = field(default_factory=list)


@pytest.fixture
def world(tmp_path: Path, retina_rgb: np.ndarray) -> World:
    config = tmp_path / "config.toml"
    config.write_text(
        f'home = "{tmp_path}"\n'
        "[[destinations]]\nname = \"pacs\"\nkind = \"dicom\"\nae_title = \"PACS\"\nhost = \"127.0.0.1\"\nport = 1\n"
        "backoff_seconds = 10\nmax_attempts = 3\n"
        "[[destinations]]\nname = \"archive\"\nkind = \"folder\"\npath = \"out\"\n"
    )
    settings = load_settings(config)
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    celery = FakeCelery()
    study_uid, series_uid = generate_uid(), generate_uid()
    small = np.asarray(Image.fromarray(retina_rgb).resize((256, 256)))
    with db.session() as session:
        study = Study(study_instance_uid=study_uid, state=StudyState.COMPLETE, patient_id="P1")
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_instance_uid=series_uid, modality="OP")
        session.add(series)
        session.flush()
        images = []
        for number, eye in enumerate((Laterality.RIGHT, Laterality.LEFT), 1):
            ds = ophthalmic_photograph(small, study_instance_uid=study_uid, series_instance_uid=series_uid,
                                       patient_id="P1", patient_name="Test^Patient", laterality=eye,
                                       instance_number=number)
            path = tmp_path / f"{number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            session.add(Instance(study_id=study.id, series_id=series.id, sop_instance_uid=ds.SOPInstanceUID,
                                 sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                                 instance_number=number, path=str(path), size_bytes=path.stat().st_size,
                                 sha256="0" * 64, calling_ae_title="CAM", peer_host="127.0.0.1", revision=1,
                                 analysable=True))
            images.append(ImageAnalysis(sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=series_uid,
                                        laterality=eye, quality=Quality(grade=QualityGrade.GRADABLE, score=0.9),
                                        findings=[Finding(condition=Condition.DIABETIC_RETINOPATHY, grade=2,
                                                          probability=0.8)],
                                        measurements=[Measurement(key="CDR_vertical", value=0.4, unit="1")]))
        analysis = StudyAnalysis(study_instance_uid=study_uid, patient_id="P1", images=images,
                                 referral=Referral.ROUTINE, impression="test",
                                 pipeline=ModelIdentity(name="pipeline", version="1", device_uid=generate_uid()))
        session.add(Analysis(study_id=study.id, revision=1, model_name="measurement-only", model_version="",
                             result=analysis.model_dump(mode="json")))
        study.state = StudyState.ANALYSED
    return World(settings, db, celery, Pipeline(settings, db, celery), study_uid)


def deliveries(w: World) -> dict[str, Delivery]:
    with w.db.session() as session:
        return {d.destination: d for d in session.scalars(select(Delivery))}


def state(w: World) -> StudyState:
    with w.db.session() as session:
        return session.scalars(select(Study.state)).one()


def test_transient_failures_back_off_then_succeed_and_objects_keep_their_uids(world: World) -> None:
    attempts: list[str] = []

    def send(settings, destination, kind, written):
        attempts.append(f"{destination.name}:{kind.value}")
        if destination.kind == "dicom" and attempts.count(f"{destination.name}:{kind.value}") < 2:
            return SendOutcome(ok=False, detail="connection refused")
        return SendOutcome(ok=True)

    assert deliver_revision(world.settings, world.db, world.study_uid, 1, send=send) == StudyState.DELIVERING
    rows = deliveries(world)
    assert rows["archive"].state == DeliveryState.DELIVERED
    pacs_rows = [d for d in _all(world) if d.destination == "pacs"]
    assert {d.object_kind.value for d in pacs_rows} == {"sr", "key_image", "pdf"}
    assert all(d.state == DeliveryState.RETRYING and d.attempts == 1 for d in pacs_rows)
    assert all(dt.timedelta(seconds=9) < d.next_attempt_at - utcnow() <= dt.timedelta(seconds=10) for d in pacs_rows)
    sr = (world.settings.home / "results" / world.study_uid / "r1" / "sr.dcm").read_bytes()

    # not due yet: nothing is sent again
    before = len(attempts)
    deliver_revision(world.settings, world.db, world.study_uid, 1, send=send)
    assert len(attempts) == before
    with world.db.session() as session:
        session.execute(update(Delivery).values(next_attempt_at=utcnow()))
    assert deliver_revision(world.settings, world.db, world.study_uid, 1, send=send) == StudyState.DELIVERED
    assert all(d.state == DeliveryState.DELIVERED for d in _all(world))
    assert (world.settings.home / "results" / world.study_uid / "r1" / "sr.dcm").read_bytes() == sr


def _all(w: World) -> list[Delivery]:
    with w.db.session() as session:
        return list(session.scalars(select(Delivery)))


def test_permanent_failure_is_dead_lettered_once_and_resend_revives_it(world: World) -> None:
    calls = []

    def refused(settings, destination, kind, written):
        calls.append(destination.name)
        if destination.kind == "dicom":
            return SendOutcome(ok=False, permanent=True, detail="association rejected")
        return SendOutcome(ok=True)

    assert deliver_revision(world.settings, world.db, world.study_uid, 1, send=refused) == StudyState.FAILED
    with world.db.session() as session:
        session.execute(update(Delivery).values(next_attempt_at=utcnow() - dt.timedelta(hours=1)))
    deliver_revision(world.settings, world.db, world.study_uid, 1, send=refused)
    assert calls.count("pacs") == 3  # sr, key image, pdf: once each, never again
    assert all(d.state == DeliveryState.DEAD and d.attempts == 1 for d in _all(world) if d.destination == "pacs")

    world.pipeline.resend(world.study_uid, actor="test")
    assert world.celery.sent[-1][0] == "retinalgpt.deliver_study"
    assert state(world) == StudyState.DELIVERING
    assert deliver_revision(world.settings, world.db, world.study_uid, 1,
                            send=lambda *a: SendOutcome(ok=True)) == StudyState.DELIVERED
    with world.db.session() as session:
        actions = list(session.scalars(select(AuditEvent.action)))
    assert "delivery.dead" in actions and "study.resend" in actions


def test_attempts_exhausted_is_dead(world: World) -> None:
    flaky = lambda settings, destination, kind, written: SendOutcome(ok=destination.kind != "dicom", detail="timeout")
    for _ in range(3):
        deliver_revision(world.settings, world.db, world.study_uid, 1, send=flaky)
        with world.db.session() as session:
            session.execute(update(Delivery).values(next_attempt_at=utcnow()))
    pacs = [d for d in _all(world) if d.destination == "pacs"]
    assert all(d.state == DeliveryState.DEAD and d.attempts == 3 for d in pacs)
    assert state(world) == StudyState.FAILED


def test_enqueue_is_idempotent_and_rerun_opens_a_superseding_revision(world: World) -> None:
    with world.db.session() as session:
        session.execute(update(Study).values(state=StudyState.COMPLETE))
        session.execute(update(Analysis).values(revision=1))
    job_id = world.pipeline.enqueue(world.study_uid, 1, actor="test")
    assert world.pipeline.enqueue(world.study_uid, 1, actor="test") == job_id
    with world.db.session() as session:
        assert session.scalars(select(Job)).one().state == JobState.QUEUED
        session.execute(update(Job).values(state=JobState.SUCCEEDED))
        session.execute(update(Study).values(state=StudyState.DELIVERED))
    assert world.pipeline.enqueue(world.study_uid, 1, actor="test") == job_id
    assert [name for name, _ in world.celery.sent] == ["retinalgpt.process_study"] * 2

    assert world.pipeline.rerun(world.study_uid, actor="test") == 2
    with world.db.session() as session:
        study = session.scalars(select(Study)).one()
        assert (study.revision, study.state) == (2, StudyState.QUEUED)
        assert session.scalars(select(Analysis.superseded)).all() == [True]
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        assert [(j.revision, j.state) for j in jobs] == [(1, JobState.SUCCEEDED), (2, JobState.QUEUED)]
    with pytest.raises(PipelineError, match="no study"):
        world.pipeline.rerun("1.2.3", actor="test")


def test_bookkeeper_requeues_a_job_whose_worker_died(world: World) -> None:
    with world.db.session() as session:
        study = session.scalars(select(Study)).one()
        study.state = StudyState.PROCESSING
        job = Job(study_id=study.id, revision=1, kind=JobKind.ANALYSIS, state=JobState.RUNNING, attempts=1)
        session.add(job)
        session.flush()
        session.execute(update(Job).values(updated_at=utcnow() - dt.timedelta(minutes=5)))
        job_id = job.id
    counts = Bookkeeper(world.pipeline).sweep()
    assert counts == {"jobs": 1, "deliveries": 0, "shadows": 0}
    assert world.celery.sent == [("retinalgpt.process_study", {"job_id": job_id})]
    with world.db.session() as session:
        assert session.get(Job, job_id).state == JobState.QUEUED
    # fresh now: not sent twice
    assert Bookkeeper(world.pipeline).sweep() == {"jobs": 0, "deliveries": 0, "shadows": 0}


def test_bookkeeper_sends_due_retries(world: World) -> None:
    deliver_revision(world.settings, world.db, world.study_uid, 1,
                     send=lambda s, d, k, w: SendOutcome(ok=d.kind != "dicom", detail="refused"))
    assert Bookkeeper(world.pipeline).sweep()["deliveries"] == 0  # backoff not elapsed
    due = utcnow() - dt.timedelta(seconds=1)  # the backoff has elapsed since the failed attempt
    with world.db.session() as session:
        session.execute(update(Delivery).values(next_attempt_at=due, updated_at=due - dt.timedelta(seconds=10)))
    assert Bookkeeper(world.pipeline).sweep() == {"jobs": 0, "deliveries": 1, "shadows": 0}
    assert world.celery.sent[-1] == ("retinalgpt.deliver_study", {"study_instance_uid": world.study_uid,
                                                                  "revision": 1})
    sent = len(world.celery.sent)
    assert Bookkeeper(world.pipeline).sweep()["deliveries"] == 0  # sent once, not again at every sweep
    assert len(world.celery.sent) == sent
    with world.db.session() as session:  # the message was lost: no worker touched the rows since
        session.execute(update(Delivery).where(Delivery.state == DeliveryState.RETRYING)
                        .values(updated_at=utcnow() - dt.timedelta(minutes=5)))
    assert Bookkeeper(world.pipeline).sweep()["deliveries"] == 1


def test_a_stale_claim_does_not_overwrite_the_newer_attempt(world: World) -> None:
    """A send that outlives ``requeue_after``: the bookkeeper hands the row to another worker; when the first
    send finally fails, its outcome must not overwrite what the newer attempt recorded."""
    def slow_then_rejected(settings, destination, kind, written):
        if destination.kind != "dicom":
            return SendOutcome(ok=True)
        with world.db.session() as session:  # meanwhile: judged stale, re-queued, claimed and delivered
            session.execute(update(Delivery).where(Delivery.destination == "pacs")
                            .values(updated_at=utcnow() - dt.timedelta(minutes=5)))
        Bookkeeper(world.pipeline).sweep()
        deliver_revision(world.settings, world.db, world.study_uid, 1, send=lambda *a: SendOutcome(ok=True))
        return SendOutcome(ok=False, permanent=True, detail="association rejected")

    assert deliver_revision(world.settings, world.db, world.study_uid, 1, send=slow_then_rejected) == (
        StudyState.DELIVERED)
    assert {(d.state, d.attempts) for d in _all(world) if d.destination == "pacs"} == {(DeliveryState.DELIVERED, 2)}


def test_each_celery_app_runs_its_own_configuration(tmp_path: Path) -> None:
    """Two apps in one process (the API's and a worker's, or two configurations in tests): each app's tasks
    are bound to the settings it was registered with, not to the first app's."""
    first, second = (load_settings(None, home=tmp_path / name) for name in ("a", "b"))
    apps = []
    for settings in (first, second):
        app = make_celery(settings)
        register_tasks(app, settings)
        app.finalize()
        apps.append(app)
    for name in (ANSWER_QUESTION, DELIVER_STUDY, PROCESS_STUDY):
        bound = inspect.getclosurevars(apps[1].tasks[name].__wrapped__).nonlocals["settings"]
        assert bound is second, name


# --- issue 18: nothing lost, never stuck ------------------------------------------------------------------------

def _settings(w: World, **pipeline) -> object:
    """The world's configuration with other pipeline timings (and no RetinalGPT: measurement pipeline only)."""
    return load_settings(w.settings._toml_file, pipeline=pipeline, model={"enabled": False})


def _queued_job(w: World) -> int:
    """Back to before the analysis: the study is queued with a job and no analysis."""
    with w.db.session() as session:
        session.execute(delete(Analysis))
        study = session.scalars(select(Study)).one()
        study.state = StudyState.QUEUED
        job = Job(study_id=study.id, revision=1, kind=JobKind.ANALYSIS, state=JobState.QUEUED,
                  model_name="measurement-only", model_version="")
        session.add(job)
        session.flush()
        return job.id


def test_the_analysis_creates_its_deliveries_and_the_bookkeeper_sends_them_when_the_message_is_lost(world: World) -> None:
    """Outbox: the transaction storing the analysis creates the delivery rows; the inference task survives a
    broker that refuses its deliver message, and the bookkeeper sends the pending rows later."""
    settings = _settings(world)
    job_id = _queued_job(world)
    app = make_celery(settings)
    register_tasks(app, settings)
    app.finalize()

    def broker_down(name, *args, **kwargs):
        raise ConnectionRefusedError(f"cannot send {name}")

    app.send_task = broker_down
    assert app.tasks[PROCESS_STUDY].run(job_id=job_id)["status"] == "analysed"
    with world.db.session() as session:
        study = session.scalars(select(Study)).one()
        rows = {(d.destination, d.object_kind.value, d.state) for d in session.scalars(select(Delivery))}
    assert study.state == StudyState.ANALYSED
    assert rows == {("pacs", "sr", DeliveryState.PENDING), ("pacs", "key_image", DeliveryState.PENDING),
                    ("pacs", "pdf", DeliveryState.PENDING), ("archive", "sr", DeliveryState.PENDING)}
    bookkeeper = Bookkeeper(world.pipeline)
    assert bookkeeper.sweep() == {"jobs": 0, "deliveries": 0, "shadows": 0}  # not before requeue_after
    with world.db.session() as session:
        session.execute(update(Delivery).values(updated_at=utcnow() - dt.timedelta(minutes=5)))
    assert bookkeeper.sweep()["deliveries"] == 1
    assert world.celery.sent == [(DELIVER_STUDY, {"study_instance_uid": world.study_uid, "revision": 1})]


def test_a_send_slower_than_requeue_after_keeps_its_lease_and_is_sent_once(world: World) -> None:
    settings = _settings(world, heartbeat_seconds=0.1, stale_after_seconds=1.0, requeue_after_seconds=0.3,
                         sweep_seconds=0.1)
    pipeline = Pipeline(settings, world.db, world.celery)
    sends: list[str] = []

    def slow(settings_, destination, kind, written):
        sends.append(f"{destination.name}:{kind.value}")
        deadline = time.monotonic() + (1.5 if len(sends) == 1 else 0)  # 5 × requeue_after, beyond stale_after
        while time.monotonic() < deadline:
            Bookkeeper(pipeline).sweep()
            time.sleep(0.1)
        return SendOutcome(ok=True)

    assert deliver_revision(settings, world.db, world.study_uid, 1, send=slow) == StudyState.DELIVERED
    assert sorted(sends) == ["archive:sr", "pacs:key_image", "pacs:pdf", "pacs:sr"]
    assert world.celery.sent == []  # never re-queued while it was being sent
    assert {(d.state, d.attempts) for d in _all(world)} == {(DeliveryState.DELIVERED, 1)}


def test_a_send_whose_worker_died_is_retried_after_its_lease_within_max_attempts(world: World) -> None:
    settings = _settings(world, heartbeat_seconds=0.1, stale_after_seconds=1.0)
    pipeline = Pipeline(settings, world.db, world.celery)
    with world.db.session() as session:
        study = session.scalars(select(Study)).one()
        create_outbox(session, settings, study, 1)
    # Two workers died mid-send: the PACS SR on its last allowed attempt, the others on their first.
    with world.db.session() as session:
        session.execute(update(Delivery).values(state=DeliveryState.SENDING, attempts=1,
                                                updated_at=utcnow() - dt.timedelta(seconds=5)))
        session.execute(update(Delivery).where(Delivery.destination == "pacs", Delivery.object_kind == DeliveryObject.SR)
                        .values(attempts=3, updated_at=utcnow() - dt.timedelta(seconds=5)))
    assert Bookkeeper(pipeline).sweep()["deliveries"] == 1
    rows = {(d.destination, d.object_kind.value): d for d in _all(world)}
    dead = rows[("pacs", "sr")]
    assert (dead.state, dead.failure, dead.attempts) == (DeliveryState.DEAD, FailureReason.ATTEMPTS_EXHAUSTED, 3)
    assert "stopped renewing its lease" in dead.last_error
    assert all(r.state == DeliveryState.RETRYING for key, r in rows.items() if key != ("pacs", "sr"))
    sends = []
    assert deliver_revision(settings, world.db, world.study_uid, 1,
                            send=lambda s, d, k, w: sends.append(k) or SendOutcome(ok=True)) == StudyState.FAILED
    assert len(sends) == 3 and {(d.state, d.attempts) for d in _all(world) if d.id != dead.id} == {
        (DeliveryState.DELIVERED, 2)}

    # A retry that is due but has used every attempt is dead-lettered, not sent a fourth time.
    world.pipeline.resend(world.study_uid, actor="test")
    with world.db.session() as session:
        session.execute(update(Delivery).values(state=DeliveryState.RETRYING, attempts=3, last_error="timeout"))
    sends.clear()
    assert deliver_revision(settings, world.db, world.study_uid, 1,
                            send=lambda s, d, k, w: sends.append(k) or SendOutcome(ok=True)) == StudyState.FAILED
    pacs = [d for d in _all(world) if d.destination == "pacs"]
    assert sends == [DeliveryObject.SR]  # the archive (max_attempts 8) only
    assert all((d.state, d.attempts, d.failure) == (DeliveryState.DEAD, 3, FailureReason.ATTEMPTS_EXHAUSTED)
               for d in pacs)


def test_a_claim_taken_over_starts_no_further_send(world: World) -> None:
    """The first worker's remaining claims were handed on while it was stuck: it must not send them too."""
    sends: list[str] = []

    def stuck(settings, destination, kind, written):
        sends.append(f"{destination.name}:{kind.value}")
        if len(sends) == 1:  # meanwhile its lease expired and another worker delivered everything
            with world.db.session() as session:
                session.execute(update(Delivery).where(Delivery.state == DeliveryState.SENDING)
                                .values(updated_at=utcnow() - dt.timedelta(minutes=5)))
            Bookkeeper(world.pipeline).sweep()
            deliver_revision(world.settings, world.db, world.study_uid, 1, send=lambda *a: SendOutcome(ok=True))
        return SendOutcome(ok=True)

    assert deliver_revision(world.settings, world.db, world.study_uid, 1, send=stuck) == StudyState.DELIVERED
    assert len(sends) == 1


def test_a_failure_to_build_the_results_is_counted_and_ends_dead(world: World, tmp_path: Path) -> None:
    settings = _settings(world)
    with world.db.session() as session:
        create_outbox(session, settings, session.scalars(select(Study)).one(), 1)
    for source in (tmp_path / "1.dcm", tmp_path / "2.dcm"):
        source.unlink()  # the source images are gone: nothing can be built
    for attempt in range(1, 9):
        state_after = deliver_revision(settings, world.db, world.study_uid, 1)
        with world.db.session() as session:
            session.execute(update(Delivery).where(Delivery.state == DeliveryState.RETRYING)
                            .values(next_attempt_at=utcnow()))
        rows = _all(world)
        assert all(r.attempts == min(attempt, 3 if r.destination == "pacs" else 8) for r in rows)
        assert all("cannot build the result objects" in r.last_error for r in rows)
    assert state_after == StudyState.FAILED
    assert {(r.state, r.failure) for r in _all(world)} == {(DeliveryState.DEAD, FailureReason.ATTEMPTS_EXHAUSTED)}
    dead = list_jobs(settings, state="dead")
    assert len(dead) == 4 and {r["reason"] for r in dead} == {"attempts_exhausted"}


def test_only_permanent_job_failures_are_dead_at_once(world: World, tmp_path: Path) -> None:
    settings = _settings(world)
    job_id = _queued_job(world)
    for source in (tmp_path / "1.dcm", tmp_path / "2.dcm"):  # pixel data the decoder refuses (a ValueError)
        ds = pydicom.dcmread(source)
        ds.PixelData = ds.PixelData[:1000]
        ds.save_as(source)
    outcomes = [run_job(settings, world.db, job_id).status for _ in range(3)]
    assert outcomes == ["retry", "retry", "failed"]
    with world.db.session() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.attempts, job.failure) == (JobState.DEAD, 3, FailureReason.ATTEMPTS_EXHAUSTED)
        assert "could be read" in job.error and "pixel data" in job.error
        assert session.scalars(select(Study.state)).one() == StudyState.FAILED
    [row] = [r for r in list_jobs(settings, state="dead") if r["kind"] == "job:analysis"]
    assert row["reason"] == "attempts_exhausted" and "could be read" in row["error"]

    world.pipeline.retry_job(job_id, actor="test")
    with world.db.session() as session:
        session.execute(update(Instance).values(analysable=False))  # nothing to analyse: permanent
    assert run_job(settings, world.db, job_id).status == "failed"
    with world.db.session() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.attempts, job.failure) == (JobState.DEAD, 1, FailureReason.NO_ANALYSABLE_IMAGE)


def test_bookkeeper_leaves_no_study_with_nothing_pending(world: World) -> None:
    """A study ``analysed`` with no delivery row (a lost deliver message before the outbox existed), and one
    ``complete`` whose completion callback never queued a job: both are picked up, nothing else."""
    old = utcnow() - dt.timedelta(minutes=5)
    with world.db.session() as session:
        session.execute(update(Study).values(updated_at=old))
        analysed = session.scalars(select(Study)).one()
        waiting = Study(study_instance_uid=generate_uid(), state=StudyState.COMPLETE, updated_at=old)
        nothing_to_analyse = Study(study_instance_uid=generate_uid(), state=StudyState.COMPLETE, updated_at=old)
        session.add_all([waiting, nothing_to_analyse])
        session.flush()
        for study, analysable in ((waiting, True), (nothing_to_analyse, False)):
            series = Series(study_id=study.id, series_instance_uid=generate_uid())
            session.add(series)
            session.flush()
            session.add(Instance(study_id=study.id, series_id=series.id, sop_instance_uid=generate_uid(),
                                 sop_class_uid="1.2.3", transfer_syntax_uid="1.2.840.10008.1.2.1", path="/x",
                                 size_bytes=1, sha256="0" * 64, calling_ae_title="CAM", peer_host="127.0.0.1",
                                 revision=1, analysable=analysable))
        waiting_uid = waiting.study_instance_uid
    assert Bookkeeper(world.pipeline).sweep() == {"jobs": 1, "deliveries": 1, "shadows": 0}
    sent = sorted(world.celery.sent, key=lambda item: item[0])
    assert sent[0] == (DELIVER_STUDY, {"study_instance_uid": analysed.study_instance_uid, "revision": 1})
    assert sent[1][0] == PROCESS_STUDY
    with world.db.session() as session:
        states = {s.study_instance_uid: s.state for s in session.scalars(select(Study))}
    assert states[waiting_uid] == StudyState.QUEUED
    # sent once, not every sweep
    assert Bookkeeper(world.pipeline).sweep() == {"jobs": 0, "deliveries": 0, "shadows": 0}
