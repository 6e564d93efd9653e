"""Drills of issue 18 with the real roles as processes (node with its bookkeeper, inference and delivery
workers on the embedded default), Orthanc as camera and PACS, pynetdicom peers:

- cross-patient reuse of a SOP Instance UID is refused and audited; the first study is analysed and delivered;
  its deliver message is lost (the delivery queue purged) and the outbox still delivers it; Orthanc then sends
  the whole study back (originals, our SR, key images, PDF): no revision opens, nothing is analysed again;
- a PACS slower than ``requeue_after_seconds`` receives each object once; a delivery worker killed mid-send
  leaves the claim to its lease, and the objects reach the PACS once the lease expires — one SR per revision;
- the node killed mid-association and restarted does not report the partial study: it waits for the sender.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from dicom_node.params import PeerParams
from dicom_node.sender import send_files
from dicom_node.status import StoreStatus
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
from tests.e2e.test_pipeline import COMPREHENSIVE_3D_SR, OP_8BIT, Stack, op_files, results_in_pacs, stack
from tests.support.net import free_port
from tests.support.roles import retinalgpt, wait_for
from worker.celery_app import DELIVERY_QUEUE, make_celery
from worker.config import load_settings
from worker.db import (
    Analysis,
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    Series,
    Study,
    StudyState,
)
from worker.pipeline.delivery import create_outbox
from worker.pipeline.jobs import Pipeline
from worker.pipeline.sources import ophthalmic_photograph

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("e2e")]


def _rows(s: Stack, model, *where) -> list:
    db = s.db
    try:
        with db.session() as session:
            return list(session.scalars(select(model).where(*where)))
    finally:
        db.dispose()


def _node_up(s: Stack) -> bool:
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", s.node_port, ae_title="RETINALGPT")
    if not assoc.is_established:
        return False
    assoc.release()
    return True


@pytest.mark.slow  # ≈ 75 s; tests/worker/test_integrity.py and test_pipeline_state.py prove the same in the fast suite
def test_uid_reuse_refused_lost_delivery_message_and_echo_back(tmp_path: Path, retina_rgb: np.ndarray,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETINALGPT_MODEL__ENABLED", "false")  # measurement pipeline only: the drill is not the model
    monkeypatch.setenv("RETINALGPT_PIPELINE__REQUEUE_AFTER_SECONDS", "3")
    with stack(tmp_path) as s:
        s.roles.start("node", "node")
        s.roles.start("inference", "worker", "--queues", "inference")
        wait_for(lambda: _node_up(s), 90, "the node to answer C-ECHO", diagnostics=s.diagnostics)
        study_uid, paths = op_files(tmp_path / "camera", retina_rgb)
        for path in paths:  # Orthanc is the camera: it holds the originals and sends them to us
            s.pacs.upload(path)
        s.pacs.post("/modalities/retinalgpt/store", {"Resources": [s.pacs.study_id(study_uid)], "Synchronous": True})
        peer = PeerParams("RETINALGPT", "127.0.0.1", s.node_port, calling_ae_title="ORTHANC")

        # Another patient's study (another device) reuses the first image's SOP Instance UID: refused, audited,
        # nothing moves.
        reused = dcmread(paths[0])
        reused.StudyInstanceUID, reused.SeriesInstanceUID = generate_uid(), generate_uid()
        reused.PatientID, reused.PatientName = "E2E-2", "Other^Patient"
        reused.save_as(tmp_path / "reused.dcm")
        [refused] = send_files(peer, [tmp_path / "reused.dcm"]).instances
        assert refused.status == StoreStatus.UID_CONFLICT
        [conflict] = _rows(s, AuditEvent, AuditEvent.action == "instance.uid_conflict")
        assert conflict.detail["sop_instance_uid"] == str(reused.SOPInstanceUID) and conflict.detail["patient_id"] == "E2E-2"

        # Analysed with no delivery worker running: the delivery rows exist already (outbox) ...
        wait_for(lambda: (st := s.study(study_uid)) and st.state == StudyState.ANALYSED, 300, "study analysed",
                 interval=0.2, diagnostics=s.diagnostics)
        pending = _rows(s, Delivery)
        assert {(d.destination, d.object_kind.value) for d in pending} == {
            ("pacs", "sr"), ("pacs", "key_image"), ("pacs", "pdf"), ("ehr", "fhir"), ("archive", "sr")}
        # ... and its deliver message is lost.
        with make_celery(load_settings(s.config)).connection_for_write() as conn:
            conn.default_channel.queue_purge(DELIVERY_QUEUE)
        s.roles.start("delivery", "worker", "--queues", "delivery")
        results_in_pacs(s, study_uid)
        wait_for(lambda: s.study(study_uid).state == StudyState.DELIVERED, 120, "delivered",
                 diagnostics=s.diagnostics)
        originals = {str(dcmread(path).SOPInstanceUID) for path in paths}
        [analysis] = _rows(s, Analysis)
        assert {image["sop_instance_uid"] for image in analysis.result["images"]} == originals  # both, reused one too
        with_images = _rows(s, Instance)
        assert {i.study_id for i in with_images} == {s.study(study_uid).id} and len(with_images) == 2

        # Orthanc routes the whole study back to us: originals, our SR, key images and PDF.
        orthanc_study = s.pacs.study_id(study_uid)
        s.pacs.post("/modalities/retinalgpt/store", {"Resources": [orthanc_study], "Synchronous": True})
        echoed = wait_for(lambda: len(rows := _rows(s, AuditEvent, AuditEvent.action == "instance.own_result")) >= 4
                          and rows, 60, "our objects recognised", diagnostics=s.diagnostics)
        time.sleep(5)  # beyond stable_seconds and a bookkeeper sweep: nothing may follow
        study = s.study(study_uid)
        assert (study.revision, study.state) == (1, StudyState.DELIVERED)
        assert len(echoed) == 4
        assert not _rows(s, AuditEvent, AuditEvent.action == "study.revision_opened")
        assert [j.revision for j in _rows(s, Job)] == [1]
        assert not [i for i in _rows(s, Instance, Instance.calling_ae_title == "ORTHANC", Instance.revision == 1)
                    if i.analysable and i.sop_class_uid != OP_8BIT]
        assert s.pacs.sop_classes_in_study(study_uid).count(COMPREHENSIVE_3D_SR) == 1
        assert retinalgpt("jobs", "list", "--state", "dead", "--json", config=s.config).stdout.strip() == "[]"


class SlowPacs:
    """A pynetdicom storage SCP that takes ``delay`` seconds per C-STORE and counts every request."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.port = free_port()
        self.received: list[tuple[str, str]] = []
        self.storing = threading.Event()
        self._lock = threading.Lock()
        ae = AE(ae_title="SLOWPACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        self.storing.set()
        time.sleep(self.delay)
        with self._lock:
            self.received.append((str(event.request.AffectedSOPClassUID), str(event.request.AffectedSOPInstanceUID)))
        return 0x0000

    def counts(self) -> Counter:
        with self._lock:
            return Counter(uid for _, uid in self.received)

    def stop(self) -> None:
        self._server.shutdown()


def _analysed_study(settings, retina_rgb: np.ndarray) -> str:
    """A study as an inference worker leaves it: instances on disk, an analysis, its delivery rows pending."""
    from worker.db import Database

    db = Database(settings.database.url)
    study_uid, series_uid = generate_uid(), generate_uid()
    small = np.asarray(Image.fromarray(retina_rgb).resize((256, 256)))
    folder = settings.storage.path / study_uid / series_uid
    folder.mkdir(parents=True)
    try:
        with db.session() as session:
            study = Study(study_instance_uid=study_uid, state=StudyState.ANALYSED, patient_id="E2E-3")
            session.add(study)
            session.flush()
            series = Series(study_id=study.id, series_instance_uid=series_uid, modality="OP")
            session.add(series)
            session.flush()
            images = []
            for number, eye in enumerate((Laterality.RIGHT, Laterality.LEFT), 1):
                ds = ophthalmic_photograph(small, study_instance_uid=study_uid, series_instance_uid=series_uid,
                                           patient_id="E2E-3", patient_name="Slow^Pacs", laterality=eye,
                                           instance_number=number)
                path = folder / f"{ds.SOPInstanceUID}.dcm"
                ds.save_as(path, enforce_file_format=True)
                session.add(Instance(study_id=study.id, series_id=series.id, sop_instance_uid=ds.SOPInstanceUID,
                                     sop_class_uid=OP_8BIT, transfer_syntax_uid=ExplicitVRLittleEndian,
                                     instance_number=number, path=str(path), size_bytes=path.stat().st_size,
                                     sha256="0" * 64, calling_ae_title="ORTHANC", peer_host="127.0.0.1", revision=1,
                                     analysable=True))
                images.append(ImageAnalysis(sop_instance_uid=str(ds.SOPInstanceUID), laterality=eye,
                                            quality=Quality(grade=QualityGrade.GRADABLE, score=0.9),
                                            findings=[Finding(condition=Condition.DIABETIC_RETINOPATHY, grade=1,
                                                              probability=0.7)]))
            analysis = StudyAnalysis(study_instance_uid=study_uid, patient_id="E2E-3", images=images,
                                     referral=Referral.NONE, impression="drill",
                                     pipeline=ModelIdentity(name="pipeline", version="1", device_uid=generate_uid()))
            session.add(Analysis(study_id=study.id, revision=1, model_name="measurement-only", model_version="",
                                 result=analysis.model_dump(mode="json")))
            create_outbox(session, settings, study, 1)
    finally:
        db.dispose()
    return study_uid


def test_slow_pacs_gets_one_send_and_a_worker_killed_mid_send_loses_nothing(
        tmp_path: Path, retina_rgb: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    pacs = SlowPacs(delay=2.5)  # each C-STORE takes longer than requeue_after and than stale_after
    timings = {"HEARTBEAT_SECONDS": "0.5", "STALE_AFTER_SECONDS": "2", "REQUEUE_AFTER_SECONDS": "1",
               "SWEEP_SECONDS": "0.25", "FAILED_RETRY_SECONDS": "1"}
    for key, value in timings.items():
        monkeypatch.setenv(f"RETINALGPT_PIPELINE__{key}", value)
    home = tmp_path / "home"
    home.mkdir()
    config = home / "config.toml"
    config.write_text(f'home = "{home}"\n[dicom]\nbind_address = "127.0.0.1"\nport = {free_port()}\n'
                      '[[destinations]]\nname = "pacs"\nkind = "dicom"\nae_title = "SLOWPACS"\n'
                      f'host = "127.0.0.1"\nport = {pacs.port}\nbackoff_seconds = 0.5\nmax_attempts = 3\n')
    from tests.support.roles import Roles

    retinalgpt("db", "upgrade", config=config)
    settings = load_settings(config)
    roles = Roles(config, tmp_path / "logs")
    try:
        study_uid = _analysed_study(settings, retina_rgb)
        roles.start("node", "node")
        roles.start("delivery-1", "worker", "--queues", "delivery")

        def diagnostics() -> str:
            return "\n".join(f"--- {n}\n{roles.log(n)}" for n in ("node", "delivery-1", "delivery-2"))

        def delivered() -> bool:
            rows = _pacs_rows(settings)
            return bool(rows) and all(r.state == DeliveryState.DELIVERED for r in rows)

        wait_for(delivered, 120, "delivery to the slow PACS", diagnostics=diagnostics)
        rows = _pacs_rows(settings)
        assert {r.object_kind.value for r in rows} == {"sr", "key_image", "pdf"}
        assert all(r.attempts == 1 for r in rows), [(r.object_kind.value, r.attempts) for r in rows]
        first = pacs.counts()
        assert len(first) == 4 and set(first.values()) == {1}, first  # SR, 2 key images, PDF: one C-STORE each

        # Sent again; the delivery worker is killed while the PACS is storing the first object.
        pacs.storing.clear()
        Pipeline(settings, _db(settings), make_celery(settings)).resend(study_uid, actor="drill")
        assert pacs.storing.wait(60), diagnostics()
        roles.kill("delivery-1", signal.SIGKILL)
        roles.start("delivery-2", "worker", "--queues", "delivery")
        wait_for(delivered, 120, "delivery after the worker was killed", diagnostics=diagnostics)
        rows = _pacs_rows(settings)
        assert all(r.attempts == 2 and r.last_error is None for r in rows), [(r.object_kind.value, r.attempts)
                                                                             for r in rows]
        resent = pacs.counts() - first
        assert set(resent) == set(first) and max(resent.values()) <= 2, resent  # at most the interrupted one twice
        sr_uids = {uid for cls, uid in pacs.received if cls == COMPREHENSIVE_3D_SR}
        assert len(sr_uids) == 1  # one SR per revision
    finally:
        roles.stop_all()
        pacs.stop()


def _db(settings):
    from worker.db import Database

    return Database(settings.database.url)


def _pacs_rows(settings) -> list[Delivery]:
    db = _db(settings)
    try:
        with db.session() as session:
            return list(session.scalars(select(Delivery).where(Delivery.destination == "pacs")))
    finally:
        db.dispose()


def test_node_killed_mid_association_then_restarted_reports_no_partial_study(
        tmp_path: Path, retina_rgb: np.ndarray) -> None:
    with stack(tmp_path, start_pacs=False) as s:
        s.roles.start("node", "node")
        wait_for(lambda: _node_up(s), 90, "the node to answer C-ECHO", diagnostics=s.diagnostics)
        study_uid, series_uid = generate_uid(), generate_uid()
        small = np.asarray(Image.fromarray(retina_rgb).resize((64, 64)))
        datasets = [ophthalmic_photograph(small, study_instance_uid=study_uid, series_instance_uid=series_uid,
                                          patient_id="E2E-4", patient_name="Cut^Off", instance_number=n)
                    for n in range(1, 11)]

        def camera():
            ae = AE(ae_title="ORTHANC")
            ae.add_requested_context(OP_8BIT, [ExplicitVRLittleEndian])
            assoc = ae.associate("127.0.0.1", s.node_port, ae_title="RETINALGPT")
            assert assoc.is_established
            return assoc

        cut = camera()
        for ds in datasets[:4]:
            assert cut.send_c_store(ds).Status == 0
        s.roles.kill("node", signal.SIGKILL)  # mid-association: 4 of 10 images stored
        cut.abort()
        s.roles.start("node", "node")
        wait_for(lambda: _node_up(s), 90, "the node to answer after the restart", diagnostics=s.diagnostics)
        time.sleep(6)  # three times stable_seconds: a partial study would have completed by now
        study = s.study(study_uid)
        assert study.state == StudyState.RECEIVING, s.diagnostics()
        assert not _rows(s, Job)

        again = camera()  # the camera sends the whole study again (Orthanc and cameras retry this way)
        for ds in datasets:
            assert again.send_c_store(ds).Status == 0
        again.release()
        wait_for(lambda: _rows(s, AuditEvent, AuditEvent.action == "study.complete"), 60, "study complete",
                 diagnostics=s.diagnostics)
        [complete] = _rows(s, AuditEvent, AuditEvent.action == "study.complete")
        assert (complete.detail["revision"], complete.detail["instances"]) == (1, 10)
        assert [j.revision for j in _rows(s, Job)] == [1]
        assert not _rows(s, AuditEvent, AuditEvent.action == "study.revision_opened")
