"""HL7 v2 destination: the delivery queue sends one ORU^R01 per revision over MLLP to a real asyncio MLLP
receiver answering with ACKs built by hl7apy; AA delivers, AE and silence are retried, AR is dead-lettered,
a new revision is sent as a correction (C). Real SQLite database, real result objects on disk."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import numpy as np
import pytest

from reporting.hl7 import parse, unescape
from worker.db import DeliveryObject, DeliveryState, FailureReason, StudyState
from tests.conftest import free_port
from tests.dicom_node.dicom_fixtures import make_certificates
from tests.support.mllp import SILENT, MllpReceiver
from tests.worker.delivery_world import World


@pytest.fixture
def receiver():
    with MllpReceiver() as rx:
        yield rx


@pytest.fixture
def world_factory(tmp_path: Path, retina_rgb: np.ndarray):
    def make(port: int, tls: str = "", **hl7: object) -> World:
        options = "".join(f"{key} = {json.dumps(value)}\n" for key, value in hl7.items())
        return World(tmp_path, retina_rgb,
                     f'name = "ehr"\nkind = "hl7v2"\nhost = "127.0.0.1"\nport = {port}\n'
                     "timeout = 1.0\nconnect_timeout = 1.0\nbackoff_seconds = 10\nmax_attempts = 3\n"
                     f"{tls}"
                     f'[destinations.hl7]\nsending_facility = "EYECLINIC"\nreceiving_application = "EHR"\n{options}')

    return make


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
    assert order.obr.obr_2.to_er7() == order.obr.obr_3.to_er7() == "ACC-7" and order.obr.obr_25.to_er7() == "P"  # unsigned: preliminary
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
    world = world_factory(receiver.port, result_status="F")  # a site that takes unsigned AI results as final
    assert world.deliver() == StudyState.DELIVERED
    world.new_revision()
    assert world.deliver(2) == StudyState.DELIVERED
    first, second = receiver.received
    assert _order(first).obr.obr_25.to_er7() == "F" and _order(second).obr.obr_25.to_er7() == "C"
    assert parse(first).msh.msh_10.to_er7() != parse(second).msh.msh_10.to_er7()
    assert {g.obx.obx_11.to_er7() for g in _order(second).oru_r01_observation} == {"C"}
    impression = [g.obx for g in _order(second).oru_r01_observation if g.obx.obx_3.to_er7().startswith("121073^")]
    assert unescape(impression[0].obx_5.to_er7()) == "revision 2"
    assert _order(second).obr.obr_3.to_er7() == "ACC-7"  # the same order, corrected


def test_mllp_over_tls_verifies_the_receiver_and_presents_our_certificate(world_factory, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.ca))
    server.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    server.verify_mode = ssl.CERT_REQUIRED  # the receiver only talks to clients with a certificate of its CA
    with MllpReceiver(tls=server) as receiver:
        tls = (f'tls = {{ enabled = true, certificate = "{certs.client_cert}", private_key = "{certs.client_key}", '
               f'ca_certificates = "{certs.ca}" }}\n')
        world = world_factory(receiver.port, tls=tls)
        assert world.deliver() == StudyState.DELIVERED
        (message,) = receiver.received
        assert parse(message).msh.msh_9.to_er7() == "ORU^R01^ORU_R01"


def test_mllp_over_tls_refuses_a_receiver_it_cannot_verify(world_factory, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    (tmp_path / "other").mkdir()
    other = make_certificates(tmp_path / "other")  # a CA that did not sign the receiver's certificate
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    with MllpReceiver(tls=server) as receiver:
        tls = (f'tls = {{ enabled = true, certificate = "{certs.client_cert}", private_key = "{certs.client_key}", '
               f'ca_certificates = "{other.ca}" }}\n')
        world = world_factory(receiver.port, tls=tls)
        assert world.deliver() == StudyState.DELIVERING
        (row,) = world.rows()
        assert row.state == DeliveryState.RETRYING and "CERTIFICATE_VERIFY_FAILED" in row.last_error
        assert receiver.received == []
