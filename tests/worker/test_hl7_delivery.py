"""HL7 v2 destination: the delivery queue sends one ORU^R01 per revision over MLLP to a real asyncio MLLP
receiver answering with ACKs built by hl7apy; AA delivers, AE and silence are retried, AR is dead-lettered,
a new revision is sent as a correction (C). Real SQLite database, real result objects on disk."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import select, update

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
from reporting.hl7 import parse, unescape
from worker.config import load_settings
from worker.db import (
    Analysis,
    Database,
    Delivery,
    DeliveryObject,
    DeliveryState,
    FailureReason,
    Instance,
    Series,
    Study,
    StudyState,
    utcnow,
)
from worker.db.migrate import upgrade
from worker.pipeline.delivery import deliver_revision
from worker.pipeline.sources import ophthalmic_photograph
from tests.conftest import free_port
from tests.support.mllp import SILENT, MllpReceiver


@pytest.fixture
def receiver():
    with MllpReceiver() as rx:
        yield rx


def _analysis(study_uid: str, uids: list[str], series_uid: str, revision: int) -> StudyAnalysis:
    images = [
        ImageAnalysis(sop_instance_uid=uid, series_instance_uid=series_uid, laterality=eye,
                      quality=Quality(grade=QualityGrade.GRADABLE, score=0.9),
                      findings=[Finding(condition=Condition.DIABETIC_RETINOPATHY, grade=revision + 1,
                                        probability=0.8)],
                      measurements=[Measurement(key="CDR_vertical", value=0.4, unit="1")])
        for uid, eye in zip(uids, (Laterality.RIGHT, Laterality.LEFT), strict=True)
    ]
    return StudyAnalysis(study_instance_uid=study_uid, revision=revision, patient_id="P1", images=images,
                         referral=Referral.ROUTINE, impression=f"revision {revision}",
                         pipeline=ModelIdentity(name="pipeline", version="1", device_uid="2.25.1"))


class World:
    def __init__(self, tmp_path: Path, retina_rgb: np.ndarray, port: int, **hl7: object) -> None:
        options = "".join(f"{key} = {json.dumps(value)}\n" for key, value in hl7.items())
        config = tmp_path / "config.toml"
        config.write_text(
            f'home = "{tmp_path}"\n[reporting]\nkey_image = false\n'
            f'[[destinations]]\nname = "ehr"\nkind = "hl7v2"\nhost = "127.0.0.1"\nport = {port}\n'
            "timeout = 1.0\nconnect_timeout = 1.0\nbackoff_seconds = 10\nmax_attempts = 3\n"
            f'[destinations.hl7]\nsending_facility = "EYECLINIC"\nreceiving_application = "EHR"\n{options}'
        )
        self.settings = load_settings(config)
        upgrade(self.settings.database.url)
        self.db = Database(self.settings.database.url)
        self.study_uid, self.series_uid = generate_uid(), generate_uid()
        small = np.asarray(Image.fromarray(retina_rgb).resize((128, 128)))
        self.uids = []
        with self.db.session() as session:
            study = Study(study_instance_uid=self.study_uid, state=StudyState.COMPLETE, patient_id="P1")
            session.add(study)
            session.flush()
            series = Series(study_id=study.id, series_instance_uid=self.series_uid, modality="OP")
            session.add(series)
            session.flush()
            for number, eye in enumerate((Laterality.RIGHT, Laterality.LEFT), 1):
                ds = ophthalmic_photograph(small, study_instance_uid=self.study_uid,
                                           series_instance_uid=self.series_uid, patient_id="P1",
                                           patient_name="Test^Patient", laterality=eye, instance_number=number,
                                           accession_number="ACC-7")
                path = tmp_path / f"{number}.dcm"
                ds.save_as(path, enforce_file_format=True)
                self.uids.append(str(ds.SOPInstanceUID))
                session.add(Instance(study_id=study.id, series_id=series.id, sop_instance_uid=ds.SOPInstanceUID,
                                     sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                                     instance_number=number, path=str(path), size_bytes=path.stat().st_size,
                                     sha256="0" * 64, calling_ae_title="CAM", peer_host="127.0.0.1", revision=1,
                                     analysable=True))
            self._add_analysis(session, study, 1)

    def _add_analysis(self, session, study: Study, revision: int) -> None:
        analysis = _analysis(self.study_uid, self.uids, self.series_uid, revision)
        session.add(Analysis(study_id=study.id, revision=revision, model_name="measurement-only", model_version="",
                             result=analysis.model_dump(mode="json")))
        study.revision = revision
        study.state = StudyState.ANALYSED

    def new_revision(self) -> None:
        with self.db.session() as session:
            self._add_analysis(session, session.scalars(select(Study)).one(), 2)

    def deliver(self, revision: int = 1) -> StudyState:
        return deliver_revision(self.settings, self.db, self.study_uid, revision)

    def rows(self) -> list[Delivery]:
        with self.db.session() as session:
            return list(session.scalars(select(Delivery).order_by(Delivery.id)))

    def make_due(self) -> None:
        with self.db.session() as session:
            session.execute(update(Delivery).values(next_attempt_at=utcnow()))


@pytest.fixture
def world_factory(tmp_path: Path, retina_rgb: np.ndarray):
    return lambda port, **hl7: World(tmp_path, retina_rgb, port, **hl7)


def _order(message: str):
    return parse(message).oru_r01_patient_result.oru_r01_order_observation


def test_aa_delivers_one_oru_per_revision_with_patient_order_and_findings(receiver, world_factory) -> None:
    world = world_factory(receiver.port, include_pdf=True)
    assert world.deliver() == StudyState.DELIVERED
    (row,) = world.rows()
    assert row.object_kind == DeliveryObject.HL7 and row.state == DeliveryState.DELIVERED and row.attempts == 1
    (message,) = receiver.received
    msg = parse(message)
    msg.validate()
    assert msg.msh.msh_4.to_er7() == "EYECLINIC" and msg.msh.msh_5.to_er7() == "EHR"
    assert row.remote_id == msg.msh.msh_10.to_er7()
    patient = msg.oru_r01_patient_result.oru_r01_patient
    assert patient.pid.pid_3.to_er7().split("^")[0] == "P1" and patient.pid.pid_5.to_er7() == "Test^Patient"
    order = _order(message)
    assert order.obr.obr_2.to_er7() == order.obr.obr_3.to_er7() == "ACC-7" and order.obr.obr_25.to_er7() == "F"
    observations = [g.obx for g in order.oru_r01_observation]
    dr = [o for o in observations if o.obx_3.to_er7().startswith("4855003^")]
    assert [o.obx_5.to_er7().split("^")[0] for o in dr] == ["312904009", "312904009"]  # grade 2, both eyes
    (pdf,) = [o for o in observations if o.obx_2.to_er7() == "ED"]
    assert pdf.obx_5.to_er7().split("^")[1:4] == ["AP", "PDF", "Base64"]
    assert world.deliver() == StudyState.DELIVERED and len(receiver.received) == 1  # delivered once


def test_ae_is_retried_with_the_same_message_then_delivered(receiver, world_factory) -> None:
    world = world_factory(receiver.port)
    receiver.answers.append("AE")
    assert world.deliver() == StudyState.DELIVERING
    (row,) = world.rows()
    assert row.state == DeliveryState.RETRYING and row.attempts == 1
    assert "ACK AE" in row.last_error and "test receiver says AE" in row.last_error
    world.deliver()
    assert len(receiver.received) == 1  # not due yet
    world.make_due()
    assert world.deliver() == StudyState.DELIVERED
    first, second = receiver.received
    assert first == second  # the very same message, same MSH-10: the receiver can recognise the repeat


def test_no_answer_times_out_and_is_retried(receiver, world_factory) -> None:
    world = world_factory(receiver.port)
    receiver.answers.append(SILENT)
    started = time.monotonic()
    assert world.deliver() == StudyState.DELIVERING
    assert time.monotonic() - started < 10
    (row,) = world.rows()
    assert row.state == DeliveryState.RETRYING and "no acknowledgement" in row.last_error
    world.make_due()
    assert world.deliver() == StudyState.DELIVERED and len(receiver.received) == 2


def test_receiver_down_is_retried_until_attempts_run_out(world_factory) -> None:
    world = world_factory(free_port())
    for _ in range(3):
        world.deliver()
        world.make_due()
    world.deliver()
    (row,) = world.rows()
    assert row.state == DeliveryState.DEAD and row.failure == FailureReason.ATTEMPTS_EXHAUSTED
    assert row.attempts == 3 and "cannot connect" in row.last_error


def test_ar_is_dead_lettered_with_the_reason(receiver, world_factory) -> None:
    world = world_factory(receiver.port)
    receiver.default = "AR"
    assert world.deliver() == StudyState.FAILED
    (row,) = world.rows()
    assert row.state == DeliveryState.DEAD and row.failure == FailureReason.REFUSED and row.attempts == 1
    assert "ACK AR" in row.last_error
    world.make_due()
    world.deliver()
    assert len(receiver.received) == 1


def test_a_new_revision_is_sent_as_a_correction(receiver, world_factory) -> None:
    world = world_factory(receiver.port, result_status="P")
    assert world.deliver() == StudyState.DELIVERED
    world.new_revision()
    assert world.deliver(2) == StudyState.DELIVERED
    first, second = receiver.received
    assert _order(first).obr.obr_25.to_er7() == "P" and _order(second).obr.obr_25.to_er7() == "C"
    assert parse(first).msh.msh_10.to_er7() != parse(second).msh.msh_10.to_er7()
    assert {g.obx.obx_11.to_er7() for g in _order(second).oru_r01_observation} == {"C"}
    impression = [g.obx for g in _order(second).oru_r01_observation if g.obx.obx_3.to_er7().startswith("121073^")]
    assert unescape(impression[0].obx_5.to_er7()) == "revision 2"
    assert _order(second).obr.obr_3.to_er7() == "ACC-7"  # the same order, corrected
