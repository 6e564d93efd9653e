"""Nothing misfiled, nothing half-reported (issue 18 items 1, 2, 5, 6): the real node (listener + ingest service
on SQLite) against dcmtk's storescu and pynetdicom senders.

- a SOP Instance UID, Series Instance UID or Study Instance UID reused under another study or patient is refused
  with 0xC004 and audited; the first recording keeps its row and its file;
- our own SR, key images and PDF sent back into the study are stored, never analysed, and open no revision;
  derived images are not analysed unless configured;
- a sender cut off mid-association (A-ABORT, or the node stopping under it) does not end its study: the study
  waits for a later association; after a restart every pending study gets a fresh stable window;
- a database error while checking for a duplicate fails the C-STORE (0xA701), never Success without a row.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.params import PeerParams
from dicom_node.sender import Failure, send_files
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
from tests.dicom_node.dicom_fixtures import storescu
from worker.config import Settings, load_settings
from worker.db import Analysis, AuditEvent, Instance, ResultObject, Series, Study, StudyState
from worker.db.migrate import upgrade
from worker.ingest import RunningNode, start_node
from worker.pipeline.delivery import deliver_revision

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


class Completions:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._event = threading.Condition()

    def __call__(self, study_uid: str, revision: int) -> None:
        with self._event:
            self.calls.append((study_uid, revision))
            self._event.notify_all()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[tuple[str, int]]:
        with self._event:
            assert self._event.wait_for(lambda: len(self.calls) >= count, timeout), self.calls
            return list(self.calls)


@pytest.fixture
def node(tmp_path, free_tcp_port) -> Callable[..., tuple[RunningNode, Completions, Settings]]:
    """``node(extra="…toml…")`` starts the node on a fixed port (restartable) with a folder destination."""
    running: list[RunningNode] = []

    def start(extra: str = "", stable_seconds: float = 1.0) -> tuple[RunningNode, Completions, Settings]:
        config = tmp_path / "node.toml"
        config.write_text(
            f'home = "{tmp_path / "home"}"\n'
            "[dicom]\n"
            'bind_address = "127.0.0.1"\n'
            f"port = {free_tcp_port}\n"
            f"stable_seconds = {stable_seconds}\n"
            "max_wait_seconds = 600\n"
            'allowed_callers = [{ ae_title = "CAMERA1" }, { ae_title = "PACS" }]\n'
            + extra +
            '[[destinations]]\nname = "archive"\nkind = "folder"\npath = "out"\n'
        )
        settings = load_settings(config)
        upgrade(settings.database.url)
        completions = Completions()
        started = start_node(settings, completions)
        running.append(started)
        return started, completions, settings

    yield start
    for started in running:
        started.stop()


def _peer(node: RunningNode, calling: str = "CAMERA1") -> PeerParams:
    return PeerParams("RETINALGPT", "127.0.0.1", node.listener.port, calling_ae_title=calling)


def _statuses(node: RunningNode, paths: list[Path], calling: str = "CAMERA1") -> list[int | None]:
    return [r.status for r in send_files(_peer(node, calling), paths).instances]


def _rewrite(source: Path, target: Path, **attributes: str) -> Path:
    """A copy of ``source`` (same SOP Instance UID) with other identifying attributes."""
    ds = dcmread(source)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(target)
    return target


def _actions(node: RunningNode) -> list[str]:
    with node.db.session() as session:
        return list(session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))


@pytest.mark.parametrize("policy", ["keep_first", "replace"])
def test_reused_uids_under_another_study_or_patient_are_refused_and_audited(node, op_file, tmp_path, policy):
    running, completions, _ = node(extra=f'duplicate_policy = "{policy}"\n')
    study_a, series_a = generate_uid(), generate_uid()
    first = [op_file(f"a{eye}.dcm", study_uid=study_a, series_uid=series_a, laterality=eye) for eye in "RL"]
    assert storescu(running.listener.port, first).returncode == 0
    sop = str(dcmread(first[0]).SOPInstanceUID)
    with running.db.session() as session:
        original = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
        original_path, original_sha = Path(original.path), original.sha256
    assert hashlib.sha256(original_path.read_bytes()).hexdigest() == original_sha

    study_b = generate_uid()
    same_sop_other_patient = _rewrite(first[0], tmp_path / "b.dcm", StudyInstanceUID=study_b, PatientID="PAT999",
                                      PatientName="Other^Patient")
    same_sop_same_study_other_patient = _rewrite(first[0], tmp_path / "c.dcm", PatientID="PAT999")
    new_sop_other_patient = op_file("d.dcm", study_uid=study_a, series_uid=series_a, patient_id="PAT999")
    series_in_other_study = op_file("e.dcm", study_uid=generate_uid(), series_uid=series_a)
    refused = [same_sop_other_patient, same_sop_same_study_other_patient, new_sop_other_patient, series_in_other_study]
    result = send_files(_peer(running), refused)
    assert [(r.status, r.failure) for r in result.instances] == [(StoreStatus.UID_CONFLICT, Failure.PERMANENT)] * 4

    with running.db.session() as session:
        studies = session.scalars(select(Study)).all()
        assert [(s.study_instance_uid, s.patient_id) for s in studies] == [(study_a, "PAT001")]
        instance = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
        assert (instance.study_id, instance.path, instance.sha256) == (studies[0].id, str(original_path), original_sha)
        assert len(session.scalars(select(Instance)).all()) == 2
        assert [s.series_instance_uid for s in session.scalars(select(Series))] == [series_a]
        conflicts = session.scalars(select(AuditEvent).where(AuditEvent.action == "instance.uid_conflict")
                                    .order_by(AuditEvent.id)).all()
    assert len(conflicts) == 4 and all(c.actor == "CAMERA1@127.0.0.1" for c in conflicts)
    assert conflicts[0].detail["sop_instance_uid"] == sop and study_a in conflicts[0].detail["reason"]
    assert conflicts[0].detail["patient_id"] == "PAT999" and "PAT001" in conflicts[0].detail["reason"]
    assert "series" in conflicts[3].detail["reason"]
    assert hashlib.sha256(original_path.read_bytes()).hexdigest() == original_sha  # first file untouched
    assert not (running.listener.params.storage_root / study_b).exists()
    assert not list((running.listener.params.storage_root / ".incoming").iterdir())
    assert completions.wait_for(1) == [(study_a, 1)]  # the first study completes as sent, once


def _synthetic_analysis(node: RunningNode, study_uid: str) -> None:
    """Store an analysis of the study's received images (what an inference worker would store)."""
    with node.db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        images = [ImageAnalysis(sop_instance_uid=i.sop_instance_uid, laterality=Laterality(i.laterality or "unknown"),
                                quality=Quality(grade=QualityGrade.GRADABLE, score=0.9),
                                findings=[Finding(condition=Condition.DIABETIC_RETINOPATHY, grade=1, probability=0.6)])
                  for i in session.scalars(select(Instance).where(Instance.study_id == study.id))]
        analysis = StudyAnalysis(study_instance_uid=study_uid, patient_id=study.patient_id, images=images,
                                 referral=Referral.NONE, impression="test",
                                 pipeline=ModelIdentity(name="pipeline", version="1", device_uid=generate_uid()))
        session.add(Analysis(study_id=study.id, revision=1, model_name="measurement-only", model_version="",
                             result=analysis.model_dump(mode="json")))
        study.state = StudyState.ANALYSED


def _secondary_capture(path: Path, study_uid: str, *, image_type: str, manufacturer: str, burned_in: str) -> Path:
    """A Secondary Capture image of the study (another vendor's key image, a montage, a screenshot)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientID, ds.Modality, ds.ImageType = "PAT001", "OT", image_type
    ds.Manufacturer, ds.BurnedInAnnotation = manufacturer, burned_in
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(64)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_our_own_results_sent_back_open_no_revision_and_derived_images_are_not_analysed(node, tmp_path, retina_rgb):
    running, completions, settings = node(extra="analyse_derived_images = true\n")
    from worker.pipeline.sources import ophthalmic_photograph

    study_uid, series_uid = generate_uid(), generate_uid()
    small = np.asarray(Image.fromarray(retina_rgb).resize((256, 256)))
    originals = []
    for number, eye in enumerate((Laterality.RIGHT, Laterality.LEFT), 1):
        ds = ophthalmic_photograph(small, study_instance_uid=study_uid, series_instance_uid=series_uid,
                                   patient_id="PAT001", patient_name="Doe^Jane", laterality=eye, instance_number=number)
        ds.save_as(tmp_path / f"{number}.dcm", enforce_file_format=True)
        originals.append(tmp_path / f"{number}.dcm")
    assert _statuses(running, originals) == [0, 0]
    assert completions.wait_for(1) == [(study_uid, 1)]
    _synthetic_analysis(running, study_uid)
    assert deliver_revision(settings, running.db, study_uid, 1) == StudyState.DELIVERED
    results = settings.home / "results" / study_uid / "r1"
    ours = [results / "sr.dcm", *sorted(results.glob("key-image-*.dcm")), results / "report-pdf.dcm"]
    assert len(ours) == 4
    with running.db.session() as session:  # recorded when built, before any send
        assert len(session.scalars(select(ResultObject)).all()) == 4

    # A PACS routing rule sends the whole study back: our objects and the originals (duplicates).
    assert _statuses(running, [*ours, *originals], calling="PACS") == [0] * 6
    time.sleep(2.5)  # beyond stable_seconds: nothing may complete or open a revision
    with running.db.session() as session:
        study = session.scalars(select(Study)).one()
        assert (study.revision, study.state) == (1, StudyState.DELIVERED)
        echoed = {i.sop_instance_uid: i for i in session.scalars(select(Instance).where(
            Instance.calling_ae_title == "PACS"))}
    assert len(echoed) == 4
    assert all(not i.analysable and i.revision == 1 and "our own result object" in i.not_analysed_reason
               for i in echoed.values())
    actions = _actions(running)
    assert actions.count("instance.own_result") == 4 and "study.revision_opened" not in actions
    assert completions.calls == [(study_uid, 1)]

    # Another vendor's derived image (analysed here, since analyse_derived_images = true) opens revision 2;
    # by default (next test) it would not.
    foreign = _secondary_capture(tmp_path / "montage.dcm", study_uid, image_type="DERIVED\\PRIMARY",
                                 manufacturer="Other Vendor", burned_in="NO")
    assert _statuses(running, [foreign]) == [0]
    with running.db.session() as session:
        assert session.scalars(select(Study.revision)).one() == 2


def test_derived_images_are_stored_but_not_analysed_by_default(node, tmp_path):
    running, completions, _ = node()
    study_uid = generate_uid()
    derived = _secondary_capture(tmp_path / "key.dcm", study_uid, image_type="DERIVED\\SECONDARY",
                                 manufacturer="Other Vendor", burned_in="NO")
    annotated = _secondary_capture(tmp_path / "shot.dcm", study_uid, image_type="ORIGINAL\\PRIMARY",
                                   manufacturer="Other Vendor", burned_in="YES")
    original = _secondary_capture(tmp_path / "orig.dcm", study_uid, image_type="ORIGINAL\\PRIMARY",
                                  manufacturer="Other Vendor", burned_in="NO")
    assert _statuses(running, [derived, annotated, original]) == [0, 0, 0]
    with running.db.session() as session:
        reasons = {Path(i.path).name: (i.analysable, i.not_analysed_reason) for i in session.scalars(select(Instance))}
    assert reasons[f"{dcmread(derived).SOPInstanceUID}.dcm"] == (False, "derived image (Image Type DERIVED)")
    assert reasons[f"{dcmread(annotated).SOPInstanceUID}.dcm"] == (False, "burned-in annotation")
    assert reasons[f"{dcmread(original).SOPInstanceUID}.dcm"] == (True, None)


def test_study_of_images_none_of_them_analysable_is_not_applicable_and_not_queued(node, tmp_path):
    running, completions, _ = node()
    study_uid = generate_uid()
    derived = _secondary_capture(tmp_path / "key.dcm", study_uid, image_type="DERIVED\\SECONDARY",
                                 manufacturer="Other Vendor", burned_in="YES")
    assert _statuses(running, [derived]) == [0]
    deadline = time.monotonic() + 10
    while "study.not_analysed" not in _actions(running) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "study.not_analysed" in _actions(running)
    assert completions.calls == []
    with running.db.session() as session:
        assert session.scalars(select(Study.state)).one() == StudyState.NOT_APPLICABLE


def _association(node: RunningNode):
    ae = AE(ae_title="CAMERA1")
    ae.add_requested_context(OP_8BIT, [JPEGBaseline8Bit])
    assoc = ae.associate("127.0.0.1", node.listener.port, ae_title="RETINALGPT")
    assert assoc.is_established
    return assoc


def _study_files(op_file, count: int) -> tuple[str, list]:
    study_uid, series_uid = generate_uid(), generate_uid()
    return study_uid, [dcmread(op_file(f"{n}.dcm", study_uid=study_uid, series_uid=series_uid)) for n in range(count)]


def _state(node: RunningNode, study_uid: str) -> tuple[StudyState, int]:
    with node.db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        return study.state, len(session.scalars(select(Instance.id).where(Instance.study_id == study.id)).all())


def test_an_aborted_association_does_not_end_its_study(node, op_file):
    running, completions, _ = node()
    study_uid, datasets = _study_files(op_file, 4)
    cut = _association(running)
    for ds in datasets[:2]:
        assert cut.send_c_store(ds).Status == 0
    cut.abort()
    time.sleep(3.5)  # well beyond stable_seconds = 1
    assert completions.calls == []
    assert _state(running, study_uid) == (StudyState.RECEIVING, 2)
    again = _association(running)  # the sender starts over: duplicates, then the rest
    for ds in datasets:
        assert again.send_c_store(ds).Status == 0
    again.release()
    assert completions.wait_for(1) == [(study_uid, 1)]
    assert _state(running, study_uid) == (StudyState.COMPLETE, 4)


def test_after_a_restart_pending_studies_get_a_fresh_window_and_cut_ones_wait_for_their_sender(node, op_file):
    running, _, _ = node(stable_seconds=2.0)
    released_uid, released = _study_files(op_file, 1)
    assert storescu(running.listener.port, [op_file("released.dcm", study_uid=released_uid)]).returncode == 0
    cut_uid, cut_files = _study_files(op_file, 3)
    cut = _association(running)
    assert cut.send_c_store(cut_files[0]).Status == 0
    running.stop()  # the node goes down under the open association (and before released_uid became stable)
    cut.abort()
    time.sleep(2.5)  # down longer than stable_seconds

    restarted, completions, _ = node(stable_seconds=2.0)
    time.sleep(1.0)
    assert completions.calls == []  # not at once: a fresh stable window from the restart
    assert completions.wait_for(1) == [(released_uid, 1)]
    time.sleep(2.5)
    assert completions.calls == [(released_uid, 1)]  # the cut study waits for its sender
    assert _state(restarted, cut_uid) == (StudyState.RECEIVING, 1)
    again = _association(restarted)
    for ds in cut_files:
        assert again.send_c_store(ds).Status == 0
    again.release()
    assert completions.wait_for(2)[1] == (cut_uid, 1)
    assert _state(restarted, cut_uid) == (StudyState.COMPLETE, 3)


def test_database_error_in_the_duplicate_check_fails_the_store(node, op_file, caplog):
    running, _, settings = node()
    sent = op_file()
    assert _statuses(running, [sent]) == [0]
    database = settings.database.url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as conn:  # the database breaks under the node
        conn.execute("ALTER TABLE instances RENAME TO instances_moved")
    try:
        with caplog.at_level(logging.ERROR, logger="dicom_node.listener"):
            result = send_files(_peer(running), [sent, op_file("other.dcm")]).instances
        assert [(r.status, r.failure) for r in result] == [(StoreStatus.OUT_OF_RESOURCES_DATABASE,
                                                            Failure.TRANSIENT)] * 2
        assert "cannot tell whether" in caplog.text and "instances" in caplog.text
    finally:
        with sqlite3.connect(database) as conn:
            conn.execute("ALTER TABLE instances_moved RENAME TO instances")
    assert not [p for p in running.listener.params.storage_root.rglob("*.dcm") if "other" in p.name]
    assert _statuses(running, [sent]) == [0]  # back: a duplicate again, answered from the database


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_placement_and_the_guards_of_the_recording_on_both_backends(backend, tmp_path, request):
    """The ingest service's own checks, as the listener asks them, on SQLite and PostgreSQL: the one-statement
    placement check, and the recording refusing to move anything even when asked without a check."""
    from dicom_node.events import InstanceConflict, PlacementKind, ReceivedInstance
    from worker.db import Database, utcnow
    from worker.ingest import IngestService

    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    db = Database(url)
    service = IngestService(db)

    def received(sop: str, study: str, series: str, patient: str | None = "P1") -> ReceivedInstance:
        return ReceivedInstance(sop_class_uid=OP_8BIT, sop_instance_uid=sop, study_instance_uid=study,
                                series_instance_uid=series, transfer_syntax_uid="1.2.840.10008.1.2.1",
                                path=tmp_path / f"{sop}.dcm", size=1, sha256="0" * 64, calling_ae_title="CAMERA1",
                                peer_host="127.0.0.1", received_at=utcnow(), analysable=True, patient_id=patient)

    try:
        first = received("1.2.3.1", "1.2.9", "1.2.9.1")
        assert service.placement(first).kind is PlacementKind.NEW
        service.instance_stored(first, replaced=False)
        cases = {
            "duplicate": (received("1.2.3.1", "1.2.9", "1.2.9.1"), PlacementKind.DUPLICATE),
            "patient unknown": (received("1.2.3.1", "1.2.9", "1.2.9.1", None), PlacementKind.DUPLICATE),
            "new in study": (received("1.2.3.2", "1.2.9", "1.2.9.1"), PlacementKind.NEW),
            "sop elsewhere": (received("1.2.3.1", "1.2.8", "1.2.8.1"), PlacementKind.CONFLICT),
            "sop other patient": (received("1.2.3.1", "1.2.9", "1.2.9.1", "P2"), PlacementKind.CONFLICT),
            "study other patient": (received("1.2.3.3", "1.2.9", "1.2.9.1", "P2"), PlacementKind.CONFLICT),
            "series elsewhere": (received("1.2.3.4", "1.2.7", "1.2.9.1"), PlacementKind.CONFLICT),
        }
        for name, (instance, expected) in cases.items():
            assert service.placement(instance).kind is expected, name
        for name in ("sop elsewhere", "study other patient", "series elsewhere"):
            with pytest.raises(InstanceConflict):
                service.instance_stored(cases[name][0], replaced=False)
        with db.session() as session:
            assert [(i.sop_instance_uid, i.study_id) for i in session.scalars(select(Instance))] == [("1.2.3.1", 1)]
            assert [s.study_instance_uid for s in session.scalars(select(Study))] == ["1.2.9"]
    finally:
        db.dispose()
