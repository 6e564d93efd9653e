"""Store-and-forward of originals (issue 15 item 2) with real processes: ``retinalgpt node`` and
``retinalgpt worker --queues delivery`` (no inference worker at all), dcmtk's storescu as two cameras, and
Orthanc as the PACS the routing rules forward to.

- camera 1's study (analysed) and the OCT camera's study (not analysed, ``not_applicable``) both arrive in
  Orthanc with every instance byte-equal (data set bytes, so pixel data, UIDs and transfer syntax), while no
  inference worker runs: forwarding never waits for the model;
- Orthanc down: the originals delivery retries with backoff and is delivered once Orthanc is back, every
  instance once (drill, ``-m slow``).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests.dicom_node.dicom_fixtures import dataset_bytes, storescu
from tests.support.net import free_port
from tests.support.orthanc import Orthanc
from tests.support.roles import Roles, retinalgpt, wait_for
from worker.config import load_settings
from worker.db import Database, Delivery, DeliveryObject, DeliveryState, Study, StudyState, utcnow


def write_config(tmp_path: Path, port: int, pacs_port: int) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(
        f'home = "{tmp_path / "home"}"\n'
        "[dicom]\n"
        'bind_address = "127.0.0.1"\n'
        f"port = {port}\n"
        "stable_seconds = 0.5\n"
        'allowed_callers = [{ ae_title = "CAMERA1" }, { ae_title = "OCT1" }]\n'
        "[pipeline]\n"
        "sweep_seconds = 0.5\n"
        "requeue_after_seconds = 3\n"
        "[[destinations]]\n"
        'name = "pacs"\nkind = "dicom"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f"port = {pacs_port}\nbackoff_seconds = 0.5\nmax_attempts = 30\ntimeout = 5\n"
        '[[rules]]\nname = "oct"\ncalling_ae = "OCT*"\nanalyse = false\nforward = ["pacs"]\n'
        '[[rules]]\nname = "camera1"\ncalling_ae = "CAMERA1"\nforward = ["pacs"]\n'
    )
    return config


def assert_byte_equal(sent: list[Path], stored: dict[str, bytes], tmp_path: Path) -> None:
    assert len(stored) == len(sent)
    for path in sent:
        ours = dcmread(path, stop_before_pixels=True)
        copy = tmp_path / f"orthanc-{ours.SOPInstanceUID}.dcm"
        copy.write_bytes(stored[str(ours.SOPInstanceUID)])
        assert dataset_bytes(copy) == dataset_bytes(path)  # pixel data, UIDs, every element as sent
        theirs = dcmread(copy, stop_before_pixels=True)
        assert theirs.file_meta.TransferSyntaxUID == ours.file_meta.TransferSyntaxUID


def originals(db: Database, patient: str) -> Delivery | None:
    with db.reading() as session:
        return session.scalars(select(Delivery).join(Study, Study.id == Delivery.study_id).where(
            Study.patient_id == patient, Delivery.object_kind == DeliveryObject.ORIGINALS)).first()


def state(db: Database, patient: str) -> StudyState | None:
    with db.reading() as session:
        return session.scalar(select(Study.state).where(Study.patient_id == patient))


@pytest.fixture
def deployment(tmp_path, free_tcp_port):
    pacs_port = free_port()
    config = write_config(tmp_path, free_tcp_port, pacs_port)
    retinalgpt("db", "upgrade", config=config)
    roles = Roles(config, tmp_path / "logs")
    roles.start("node", "node")
    roles.start("delivery", "worker", "--queues", "delivery")
    db = Database(load_settings(config).database.url)
    yield roles, db, pacs_port, free_tcp_port
    roles.stop_all()
    db.dispose()


def wait_for_node(port: int) -> None:
    import socket

    def accepting() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(accepting, 60, "the node to listen")


def test_originals_reach_the_pacs_byte_equal_without_any_inference_worker(deployment, op_file, tmp_path):
    roles, db, pacs_port, port = deployment
    with Orthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
        wait_for_node(port)
        study_uid, series_uid = generate_uid(), generate_uid()
        camera = [op_file(f"cam{n}.dcm", study_uid=study_uid, series_uid=series_uid, patient_id="CAM",
                          laterality="RL"[n]) for n in range(2)]
        oct_study = generate_uid()
        octs = [op_file("oct.dcm", study_uid=oct_study, patient_id="OCT")]
        assert storescu(port, camera).returncode == 0
        assert storescu(port, octs, calling="OCT1").returncode == 0
        delivered = lambda patient: (row := originals(db, patient)) is not None and row.state == DeliveryState.DELIVERED  # noqa: E731
        wait_for(lambda: delivered("CAM") and delivered("OCT"), 90, "both studies forwarded",
                 diagnostics=lambda: roles.log("delivery") + roles.log("node"))
        assert_byte_equal(camera, pacs.stored_files(study_uid), tmp_path)
        assert_byte_equal(octs, pacs.stored_files(oct_study), tmp_path)
        assert state(db, "OCT") == StudyState.NOT_APPLICABLE
        assert state(db, "CAM") == StudyState.QUEUED  # its analysis waits for an inference worker; its originals did not
        assert originals(db, "CAM").attempts == 1


@pytest.mark.slow
def test_pacs_down_the_originals_are_forwarded_after_recovery_once(deployment, op_file, tmp_path):
    roles, db, pacs_port, port = deployment
    wait_for_node(port)
    study_uid = generate_uid()
    files = [op_file(f"late{n}.dcm", study_uid=study_uid, patient_id="DOWN") for n in range(3)]
    assert storescu(port, files).returncode == 0
    wait_for(lambda: (row := originals(db, "DOWN")) is not None and row.attempts >= 2, 60,
             "forwarding attempts while the PACS is down", diagnostics=lambda: roles.log("delivery"))
    row = originals(db, "DOWN")
    assert row.state in (DeliveryState.RETRYING, DeliveryState.SENDING) and "ORTHANC@127.0.0.1" in (row.last_error or "")
    with Orthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
        wait_for(lambda: originals(db, "DOWN").state == DeliveryState.DELIVERED, 90, "forwarding after recovery",
                 diagnostics=lambda: roles.log("delivery"))
        assert_byte_equal(files, pacs.stored_files(study_uid), tmp_path)
        assert pacs.get("/statistics")["CountInstances"] == 3  # each instance once


def analysed_study(settings, db: Database, folder: Path, rgb) -> tuple[str, list[Path]]:
    """A study with two stored photographs, an analysis, and a pending originals delivery to ``pacs`` (as the
    ingest service creates it at completion)."""
    import numpy as np
    from PIL import Image

    from model.schema import (
        Condition,
        Finding,
        ImageAnalysis,
        Laterality,
        ModelIdentity,
        Quality,
        QualityGrade,
        Referral,
        StudyAnalysis,
    )
    from worker.db import Analysis, Instance, Series
    from worker.pipeline.sources import ophthalmic_photograph

    study_uid, series_uid = generate_uid(), generate_uid()
    small = np.asarray(Image.fromarray(rgb).resize((256, 256)))
    paths, images = [], []
    with db.session() as session:
        study = Study(study_instance_uid=study_uid, state=StudyState.ANALYSED, patient_id="ORDER",
                      route={"rules": ["camera1"], "forward": ["pacs"], "priority": "normal"})
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_instance_uid=series_uid, modality="OP")
        session.add(series)
        session.flush()
        for number, eye in enumerate((Laterality.RIGHT, Laterality.LEFT), 1):
            ds = ophthalmic_photograph(small, study_instance_uid=study_uid, series_instance_uid=series_uid,
                                       patient_id="ORDER", patient_name="Order^Test", laterality=eye,
                                       instance_number=number)
            path = folder / f"{number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
            session.add(Instance(study_id=study.id, series_id=series.id, sop_instance_uid=ds.SOPInstanceUID,
                                 sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                                 instance_number=number, path=str(path), size_bytes=path.stat().st_size,
                                 sha256="0" * 64, calling_ae_title="CAMERA1", peer_host="127.0.0.1", revision=1,
                                 analysable=True))
            images.append(ImageAnalysis(sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=series_uid,
                                        laterality=eye, quality=Quality(grade=QualityGrade.GRADABLE, score=0.9),
                                        findings=[Finding(condition=Condition.DIABETIC_RETINOPATHY, grade=1,
                                                          probability=0.7)]))
        analysis = StudyAnalysis(study_instance_uid=study_uid, patient_id="ORDER", images=images,
                                 referral=Referral.ROUTINE, impression="test",
                                 pipeline=ModelIdentity(name="pipeline", version="1", device_uid=generate_uid()))
        session.add(Analysis(study_id=study.id, revision=1, model_name="measurement-only", model_version="",
                             result=analysis.model_dump(mode="json")))
        session.add(Delivery(study_id=study.id, revision=1, destination="pacs", object_kind=DeliveryObject.ORIGINALS,
                             state=DeliveryState.RETRYING, attempts=1, last_error="PACS was down",
                             next_attempt_at=utcnow() + dt.timedelta(hours=1)))
    return study_uid, paths


def test_the_originals_reach_a_destination_before_the_results(tmp_path, retina_rgb):
    """Results wait for the originals of their revision at the same destination (``originals_first``): while
    the originals delivery waits for its retry nothing is sent; then the originals arrive first, then the SR."""
    from sqlalchemy import update

    from worker.db.migrate import upgrade
    from worker.pipeline.delivery import deliver_revision

    pacs_port = free_port()
    config = write_config(tmp_path, free_port(), pacs_port)
    config.write_text(config.read_text() + "[reporting]\nkey_image = false\npdf = false\n")
    settings = load_settings(config)
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    study_uid, paths = analysed_study(settings, db, tmp_path, retina_rgb)
    with Orthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
        assert deliver_revision(settings, db, study_uid, 1) == StudyState.DELIVERING
        with db.reading() as session:
            rows = {d.object_kind: d for d in session.scalars(select(Delivery))}
        assert (rows[DeliveryObject.SR].state, rows[DeliveryObject.SR].attempts) == (DeliveryState.PENDING, 0)
        assert pacs.get("/statistics")["CountInstances"] == 0  # the SR waits for the originals

        with db.session() as session:
            session.execute(update(Delivery).values(next_attempt_at=utcnow()))
        assert deliver_revision(settings, db, study_uid, 1) == StudyState.DELIVERED
        arrivals = [change["ID"] for change in pacs.get("/changes?limit=100")["Changes"]
                    if change["ChangeType"] == "NewInstance"]
        sop_classes = [pacs.get(f"/instances/{ident}/tags?simplify")["SOPClassUID"] for ident in arrivals]
        assert sop_classes[:2] == [str(dcmread(p).SOPClassUID) for p in paths]
        assert sop_classes[2:] == ["1.2.840.10008.5.1.4.1.1.88.34"]  # Comprehensive 3D SR, after the originals
        assert_byte_equal(paths, {sop: data for sop, data in pacs.stored_files(study_uid).items()
                                  if sop in {str(dcmread(p).SOPInstanceUID) for p in paths}}, tmp_path)
    db.dispose()


def test_results_are_dead_lettered_when_the_originals_are_and_jobs_retry_sends_both_again(tmp_path, retina_rgb):
    from sqlalchemy import update

    from worker.db.migrate import upgrade
    from worker.db.states import FailureReason
    from worker.pipeline.delivery import deliver_revision
    from worker.pipeline.jobs import Pipeline

    pacs_port = free_port()
    config = write_config(tmp_path, free_port(), pacs_port)
    config.write_text(config.read_text() + "[reporting]\nkey_image = false\npdf = false\n")
    settings = load_settings(config)
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    study_uid, paths = analysed_study(settings, db, tmp_path, retina_rgb)
    with db.session() as session:
        session.execute(update(Delivery).values(state=DeliveryState.DEAD, failure=FailureReason.ATTEMPTS_EXHAUSTED))
    assert deliver_revision(settings, db, study_uid, 1) == StudyState.FAILED
    with db.reading() as session:
        sr = session.scalars(select(Delivery).where(Delivery.object_kind == DeliveryObject.SR)).one()
    assert (sr.state, sr.failure, sr.attempts) == (DeliveryState.DEAD, FailureReason.ORIGINALS_FAILED, 0)

    class Sent:
        def __init__(self) -> None:
            self.tasks = []

        def send_task(self, name, kwargs):
            self.tasks.append((name, kwargs))

    celery = Sent()
    assert Pipeline(settings, db, celery).resend(study_uid, actor="test") == 1  # what `jobs retry` does
    assert celery.tasks == [("retinalgpt.deliver_study", {"study_instance_uid": study_uid, "revision": 1})]
    with Orthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
        assert deliver_revision(settings, db, study_uid, 1) == StudyState.DELIVERED
        assert pacs.get("/statistics")["CountInstances"] == 3
    db.dispose()
