"""Forwarded originals to a DICOMweb destination (issue 16 item 1) against a real Orthanc with its DICOMweb
plugin: the stored files go by STOW-RS byte for byte, through the durable delivery queue.

- with real processes (``retinalgpt node`` and ``retinalgpt worker --queues delivery``, no inference worker):
  an analysed camera study and a not-analysed OCT study arrive with every file byte-equal (so pixel data, UIDs
  and the JPEG Baseline transfer syntax as received), without waiting for the model;
- Orthanc down: the originals delivery retries with backoff and, once Orthanc is up, is delivered once, every
  instance once (drill, ``-m slow``);
- in process: the originals of a revision reach the destination before its SR (``originals_first``); wrong
  credentials dead-letter the originals with the HTTP reason and the SR with ``originals_failed``, and
  ``jobs retry`` sends both again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from sqlalchemy import select, update

from tests.dicom_node.dicom_fixtures import dataset_bytes, storescu
from tests.support.orthanc import Orthanc
from tests.support.roles import Roles, retinalgpt, wait_for
from tests.worker.test_forwarding import analysed_study, originals, state, wait_for_node
from worker.config import load_settings
from worker.db import (
    Database,
    Delivery,
    DeliveryObject,
    DeliveryState,
    FailureReason,
    Instance,
    Study,
    StudyState,
    utcnow,
)

USERS = {"retinalgpt": "s3cret"}
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def write_config(tmp_path: Path, port: int, url: str, password: str = "s3cret") -> Path:
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
        "[reporting]\nkey_image = false\npdf = false\n"
        "[[destinations]]\n"
        f'name = "pacs"\nkind = "dicomweb"\nurl = "{url}"\n'
        "backoff_seconds = 0.5\nmax_attempts = 30\ntimeout = 20\nconnect_timeout = 2\n"
        f'auth = {{ kind = "basic", username = "retinalgpt", password = "{password}" }}\n'
        '[[rules]]\nname = "oct"\ncalling_ae = "OCT*"\nanalyse = false\nforward = ["pacs"]\n'
        '[[rules]]\nname = "camera1"\ncalling_ae = "CAMERA1"\nforward = ["pacs"]\n'
    )
    return config


def assert_files_equal(sent: list[Path], stored: dict[str, bytes], tmp_path: Path) -> None:
    """Each sent instance is in Orthanc unchanged: its data set bytes (so every element as the camera sent it),
    pixel data, UIDs and transfer syntax."""
    assert len(stored) == len(sent)
    for path in sent:
        ours = dcmread(path)
        copy = tmp_path / f"orthanc-{ours.SOPInstanceUID}.dcm"
        copy.write_bytes(stored[str(ours.SOPInstanceUID)])
        theirs = dcmread(copy)
        assert theirs.file_meta.TransferSyntaxUID == ours.file_meta.TransferSyntaxUID
        assert (theirs.StudyInstanceUID, theirs.SeriesInstanceUID, theirs.SOPInstanceUID) == (
            ours.StudyInstanceUID, ours.SeriesInstanceUID, ours.SOPInstanceUID)
        assert theirs.PixelData == ours.PixelData
        assert dataset_bytes(copy) == dataset_bytes(path)


def assert_node_files_stowed_as_stored(db: Database, patient: str, stored: dict[str, bytes]) -> None:
    """What Orthanc holds is the node's stored file itself, File Meta Information included: STOW-RS sent the
    file, nothing re-encoded it."""
    with db.reading() as session:
        paths = session.execute(select(Instance.sop_instance_uid, Instance.path).join(
            Study, Study.id == Instance.study_id).where(Study.patient_id == patient)).all()
    assert paths and {uid for uid, _ in paths} == set(stored)
    for uid, path in paths:
        assert stored[uid] == Path(path).read_bytes()


@pytest.fixture
def deployment(tmp_path, free_tcp_port):
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS)  # its port is chosen now, started by the test
    config = write_config(tmp_path, free_tcp_port, pacs.dicomweb_url)
    retinalgpt("db", "upgrade", config=config)
    roles = Roles(config, tmp_path / "logs")
    roles.start("node", "node")
    roles.start("delivery", "worker", "--queues", "delivery")
    db = Database(load_settings(config).database.url)
    wait_for_node(free_tcp_port)
    yield roles, db, pacs, free_tcp_port
    roles.stop_all()
    pacs.stop()
    db.dispose()


def test_originals_reach_the_dicomweb_archive_byte_equal_without_any_inference_worker(deployment, op_file,
                                                                                         tmp_path):
    roles, db, pacs, port = deployment
    with pacs:
        study_uid, series_uid = generate_uid(), generate_uid()
        camera = [op_file(f"cam{n}.dcm", study_uid=study_uid, series_uid=series_uid, patient_id="CAM",
                          laterality="RL"[n]) for n in range(2)]
        oct_study = generate_uid()
        octs = [op_file("oct.dcm", study_uid=oct_study, patient_id="OCT")]
        assert dcmread(camera[0]).file_meta.TransferSyntaxUID == JPEGBaseline8Bit  # kept, not decompressed
        assert storescu(port, camera).returncode == 0
        assert storescu(port, octs, calling="OCT1").returncode == 0
        delivered = lambda patient: (row := originals(db, patient)) is not None and row.state == DeliveryState.DELIVERED  # noqa: E731
        wait_for(lambda: delivered("CAM") and delivered("OCT"), 90, "both studies forwarded",
                 diagnostics=lambda: roles.log("delivery") + roles.log("node"))
        assert_files_equal(camera, pacs.stored_files(study_uid), tmp_path)
        assert_files_equal(octs, pacs.stored_files(oct_study), tmp_path)
        assert_node_files_stowed_as_stored(db, "CAM", pacs.stored_files(study_uid))
        assert state(db, "OCT") == StudyState.NOT_APPLICABLE
        assert state(db, "CAM") == StudyState.QUEUED  # its analysis waits for an inference worker; its originals did not
        row = originals(db, "CAM")
        assert row.attempts == 1 and row.remote_id == f"{pacs.dicomweb_url}/studies/{study_uid}"


@pytest.mark.slow
def test_archive_down_the_originals_are_stowed_after_recovery_once(deployment, op_file, tmp_path):
    roles, db, pacs, port = deployment
    study_uid = generate_uid()
    files = [op_file(f"late{n}.dcm", study_uid=study_uid, patient_id="DOWN") for n in range(3)]
    assert storescu(port, files).returncode == 0
    wait_for(lambda: (row := originals(db, "DOWN")) is not None and row.attempts >= 2, 60,
             "forwarding attempts while the archive is down", diagnostics=lambda: roles.log("delivery"))
    row = originals(db, "DOWN")
    assert row.state in (DeliveryState.RETRYING, DeliveryState.SENDING) and "ConnectionError" in (row.last_error or "")
    with pacs:
        wait_for(lambda: originals(db, "DOWN").state == DeliveryState.DELIVERED, 90, "forwarding after recovery",
                 diagnostics=lambda: roles.log("delivery"))
        assert_files_equal(files, pacs.stored_files(study_uid), tmp_path)
        assert pacs.get("/statistics")["CountInstances"] == 3  # each instance once
        new = [c for c in pacs.get("/changes?limit=100")["Changes"] if c["ChangeType"] == "NewInstance"]
        assert len(new) == 3  # stored once each, no second copy


def _arrivals(pacs: Orthanc) -> list[str]:
    """SOP Class UIDs of the instances Orthanc received, in the order they arrived."""
    changes = pacs.get("/changes?limit=100")["Changes"]
    return [pacs.get(f"/instances/{c['ID']}/tags?simplify")["SOPClassUID"] for c in changes
            if c["ChangeType"] == "NewInstance"]


def odd_length_patient_id(path: Path) -> None:
    """Make the stored file carry Patient ID ``ORDER`` with its odd length, as some devices write it (PS3.5 §7.1.1
    wants even lengths): forwarding neither repairs nor pads what was received; the archive gets the file as it
    is stored."""
    raw = path.read_bytes()
    padded = b"\x10\x00\x20\x00LO\x06\x00ORDER "
    assert raw.count(padded) == 1
    path.write_bytes(raw.replace(padded, b"\x10\x00\x20\x00LO\x05\x00ORDER"))


def test_the_originals_are_stowed_before_the_sr(tmp_path, retina_rgb, free_tcp_port):
    from worker.db.migrate import upgrade
    from worker.pipeline.delivery import deliver_revision

    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS)
    settings = load_settings(write_config(tmp_path, free_tcp_port, pacs.dicomweb_url))
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    study_uid, paths = analysed_study(settings, db, tmp_path, retina_rgb)
    odd_length_patient_id(paths[0])
    with pacs:
        assert deliver_revision(settings, db, study_uid, 1) == StudyState.DELIVERING
        with db.reading() as session:
            rows = {d.object_kind: d for d in session.scalars(select(Delivery))}
        assert (rows[DeliveryObject.SR].state, rows[DeliveryObject.SR].attempts) == (DeliveryState.PENDING, 0)
        assert pacs.get("/statistics")["CountInstances"] == 0  # the SR waits for the originals' retry

        with db.session() as session:
            session.execute(update(Delivery).values(next_attempt_at=utcnow()))
        assert deliver_revision(settings, db, study_uid, 1) == StudyState.DELIVERED
        assert _arrivals(pacs) == [str(dcmread(p).SOPClassUID) for p in paths] + [COMPREHENSIVE_3D_SR]
        sent = {str(dcmread(p).SOPInstanceUID) for p in paths}
        stored = pacs.stored_files(study_uid)
        assert_files_equal(paths, {sop: data for sop, data in stored.items() if sop in sent}, tmp_path)
        assert all(stored[str(dcmread(p).SOPInstanceUID)] == p.read_bytes() for p in paths)  # the files themselves
    db.dispose()


def test_refused_originals_are_dead_lettered_with_the_reason_and_jobs_retry_sends_both(tmp_path, retina_rgb,
                                                                                       free_tcp_port):
    from worker.db.migrate import upgrade
    from worker.pipeline.delivery import deliver_revision
    from worker.pipeline.jobs import Pipeline

    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS)
    config = write_config(tmp_path, free_tcp_port, pacs.dicomweb_url, password="wrong")
    settings = load_settings(config)
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    study_uid, paths = analysed_study(settings, db, tmp_path, retina_rgb)
    with db.session() as session:
        session.execute(update(Delivery).values(next_attempt_at=utcnow()))
    with pacs:
        assert deliver_revision(settings, db, study_uid, 1) == StudyState.FAILED
        with db.reading() as session:
            rows = {d.object_kind: d for d in session.scalars(select(Delivery))}
        original, sr = rows[DeliveryObject.ORIGINALS], rows[DeliveryObject.SR]
        assert (original.state, original.failure, original.attempts) == (DeliveryState.DEAD, FailureReason.REFUSED, 2)
        assert original.last_error.startswith("HTTP 401")
        assert (sr.state, sr.failure, sr.attempts) == (DeliveryState.DEAD, FailureReason.ORIGINALS_FAILED, 0)
        assert pacs.get("/statistics")["CountInstances"] == 0

        class Sent:
            def __init__(self) -> None:
                self.tasks = []

            def send_task(self, name, kwargs):
                self.tasks.append((name, kwargs))

        config.write_text(config.read_text().replace('password = "wrong"', 'password = "s3cret"'))
        settings = load_settings(config)  # the operator fixed the credentials
        celery = Sent()
        assert Pipeline(settings, db, celery).resend(study_uid, actor="test") == 1  # what `jobs retry` does
        assert celery.tasks == [("retinalgpt.deliver_study", {"study_instance_uid": study_uid, "revision": 1})]
        assert deliver_revision(settings, db, study_uid, 1) == StudyState.DELIVERED
        assert _arrivals(pacs) == [str(dcmread(p).SOPClassUID) for p in paths] + [COMPREHENSIVE_3D_SR]
    db.dispose()


def test_large_studies_go_in_several_requests_and_stop_at_the_first_refused(tmp_path, op_file, monkeypatch):
    """Originals are posted in requests of at most ``STOW_BATCH_BYTES`` of files; a refused request (here a
    file of another study, 409) ends the attempt with its reason, the instances stored before it recorded."""
    from worker.config import Destination
    from worker.pipeline import dicomweb_delivery

    study_uid = generate_uid()
    files = [op_file(f"b{n}.dcm", study_uid=study_uid, patient_id="BATCH") for n in range(3)]
    stray = op_file("stray.dcm", study_uid=generate_uid(), patient_id="BATCH")
    monkeypatch.setattr(dicomweb_delivery, "STOW_BATCH_BYTES", max(p.stat().st_size for p in [*files, stray]) + 1)
    with Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS) as pacs:
        destination = Destination(name="cloud", kind="dicomweb", url=pacs.dicomweb_url,
                                  auth={"kind": "basic", "username": "retinalgpt", "password": "s3cret"})
        result = dicomweb_delivery.store_files(destination, study_uid, [*files[:2], stray, files[2]])
        assert result.status == 409 and result.permanent and not result.ok
        assert result.stored == [str(dcmread(p).SOPInstanceUID) for p in files[:2]]  # one request each
        assert result.failed == [(str(dcmread(stray).SOPInstanceUID), 0x0110)]
        assert pacs.get("/statistics")["CountInstances"] == 2

        result = dicomweb_delivery.store_files(destination, study_uid, files)
        assert result.ok and sorted(result.stored) == sorted(str(dcmread(p).SOPInstanceUID) for p in files)
        new = [c for c in pacs.get("/changes?limit=100")["Changes"] if c["ChangeType"] == "NewInstance"]
        assert len(new) == 3  # the instances already stored are filed once
        assert_files_equal(files, pacs.stored_files(study_uid), tmp_path)
