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
from worker.config import ConfigError, load_settings
from worker.db import DeliveryObject, DeliveryState, FailureReason, StudyState
from tests.conftest import free_port
from tests.dicom_node.dicom_fixtures import Certificates, make_certificates
from tests.support.mllp import SILENT, MllpReceiver
from tests.worker.delivery_world import World


@pytest.fixture
def receiver():
    with MllpReceiver() as rx:
        yield rx


@pytest.fixture
def world_factory(tmp_path: Path, retina_rgb: np.ndarray):
    def make(port: int, tls: str = "", timeout: float = 1.0, **hl7: object) -> World:
        options = "".join(f"{key} = {json.dumps(value)}\n" for key, value in hl7.items())
        return World(tmp_path, retina_rgb,
                     f'name = "ehr"\nkind = "hl7v2"\nhost = "127.0.0.1"\nport = {port}\n'
                     f"timeout = {timeout}\nconnect_timeout = {timeout}\nbackoff_seconds = 10\nmax_attempts = 3\n"
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


TLS_TIMEOUT = 10.0
"""Timeouts of the TLS drills that expect a handshake to finish or be refused: a loaded CI machine may take
more than a second for one, which would read as a timeout instead."""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA that did not sign the receiver's certificate, with a client certificate of its own."""
    return make_certificates(tmp_path_factory.mktemp("foreign-pki"))


def _receiver_tls(certs: Certificates, client_ca: Path | None = None) -> ssl.SSLContext:
    """The receiver's server context; with ``client_ca`` it talks only to clients with a certificate of that CA."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca) if client_ca else None)
    server.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    if client_ca is not None:
        server.verify_mode = ssl.CERT_REQUIRED
    return server


def _tls(ca: Path, client: Certificates | None = None) -> str:
    ours = f'certificate = "{client.client_cert}", private_key = "{client.client_key}", ' if client else ""
    return f'tls = {{ enabled = true, {ours}ca_certificates = "{ca}" }}\n'


def test_mllp_over_tls_verifies_the_receiver_and_presents_our_certificate(world_factory, certs) -> None:
    with MllpReceiver(tls=_receiver_tls(certs, client_ca=certs.ca)) as receiver:
        world = world_factory(receiver.port, tls=_tls(certs.ca, client=certs), timeout=TLS_TIMEOUT)
        assert world.deliver() == StudyState.DELIVERED
        (message,) = receiver.received
        assert parse(message).msh.msh_9.to_er7() == "ORU^R01^ORU_R01"


def test_mllp_over_server_only_tls_needs_no_client_certificate(world_factory, certs) -> None:
    """Most interface engines authenticate the server only: TLS with a CA bundle and no certificate of ours
    (the configuration used to refuse ``tls.enabled`` without ``certificate`` and ``private_key``)."""
    with MllpReceiver(tls=_receiver_tls(certs)) as receiver:
        world = world_factory(receiver.port, tls=_tls(certs.ca), timeout=TLS_TIMEOUT)
        assert world.deliver() == StudyState.DELIVERED
        (message,) = receiver.received
        assert parse(message).msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
        assert world.rows()[0].attempts == 1


@pytest.mark.parametrize("case", ["untrusted receiver", "untrusted receiver, server-only", "no client certificate",
                                  "foreign client certificate"])
def test_a_tls_failure_is_recorded_and_retried_per_policy(world_factory, certs, foreign, case: str) -> None:
    """A receiver we cannot verify, or one that refuses our certificate (or its absence): each attempt fails
    with the TLS reason, is retried with backoff, and the row goes dead once the attempts run out; nothing is
    received."""
    client_ca = None if case.startswith("untrusted") else certs.ca
    tls = {"untrusted receiver": _tls(foreign.ca, client=certs), "untrusted receiver, server-only": _tls(foreign.ca),
           "no client certificate": _tls(certs.ca), "foreign client certificate": _tls(certs.ca, client=foreign)}[case]
    with MllpReceiver(tls=_receiver_tls(certs, client_ca=client_ca)) as receiver:
        world = world_factory(receiver.port, tls=tls, timeout=TLS_TIMEOUT)
        for attempt in (1, 2, 3):
            expected = StudyState.FAILED if attempt == 3 else StudyState.DELIVERING
            assert world.deliver() == expected
            (row,) = world.rows()
            assert row.attempts == attempt and "TLS" in row.last_error
            world.make_due()
        assert row.state == DeliveryState.DEAD and row.failure == FailureReason.ATTEMPTS_EXHAUSTED
        if case.startswith("untrusted"):
            assert "CERTIFICATE_VERIFY_FAILED" in row.last_error
        assert receiver.received == []


def test_a_receiver_that_does_not_speak_tls_is_a_handshake_timeout_retried(world_factory, certs) -> None:
    """A plain MLLP listener never answers our ClientHello: the handshake is bounded by ``connect_timeout`` and
    recorded as such (it used to read as a missing acknowledgement)."""
    with MllpReceiver(default=SILENT) as receiver:
        world = world_factory(receiver.port, tls=_tls(certs.ca))
        assert world.deliver() == StudyState.DELIVERING
        (row,) = world.rows()
        assert row.state == DeliveryState.RETRYING
        assert row.last_error == f"TLS handshake with 127.0.0.1:{receiver.port} not done within 1 s"


def test_only_the_listener_must_have_a_certificate_of_its_own(tmp_path: Path) -> None:
    """Clients (hl7v2 and dicom destinations, archives) may use server-only TLS; the DICOM listener cannot."""
    server_only = {"enabled": True, "ca_certificates": "ca.pem"}
    settings = load_settings(None, home=tmp_path, destinations=[
        {"name": "ehr", "kind": "hl7v2", "host": "ehr.example", "port": 2575, "tls": server_only},
        {"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "pacs.example", "port": 2762,
         "tls": server_only}])
    assert settings.destination("ehr").tls.certificate is None
    with pytest.raises(ConfigError, match="dicom.tls.enabled needs dicom.tls.certificate"):
        load_settings(None, home=tmp_path, dicom={"tls": server_only})
    with pytest.raises(ConfigError, match="tls.certificate and tls.private_key go together"):
        load_settings(None, home=tmp_path, destinations=[
            {"name": "ehr", "kind": "hl7v2", "host": "ehr.example", "port": 2575,
             "tls": {**server_only, "certificate": "client.pem"}}])
