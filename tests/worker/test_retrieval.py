"""Retrieval for re-runs (issue 15 item 4) with real peers: Orthanc as the query/retrieve archive (C-FIND and
C-MOVE SCP, our AE title in its DicomModalities), the node role (listener + bookkeeper) receiving what Orthanc
moves, and the ``retinalgpt`` CLI as a separate process.

- a study whose originals retention purged is re-run: ``studies rerun`` finds it in Orthanc, moves it to our AE
  title, the instances come back byte-equal under the same UIDs and path and are un-purged, and they open
  revision 2 (revision 1's analysis superseded, the revision-2 analysis job queued);
- the archive holding the study under another Patient ID: refused, nothing moved, the study stays purged; the
  archive down: the re-run fails with one line and the study is unchanged;
- ``studies fetch --patient ID --since DATE`` pulls only that patient's studies from that date on;
- the archive down: one clear line, exit 1, nothing recorded.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from tests.dicom_node.dicom_fixtures import dataset_bytes, storescu
from tests.support.net import free_port
from tests.support.orthanc import Orthanc
from tests.support.roles import retinalgpt, wait_for
from worker.config import ConfigError, load_settings
from worker.db import Analysis, AuditEvent, Database, Instance, Job, Study, StudyState, utcnow
from worker.db.migrate import upgrade
from worker.roles import start_node_role

pytestmark = pytest.mark.timeout(180)


def write_config(tmp_path: Path, node_port: int, archive_port: int, archive_ae: str = "ORTHANC",
                 retrieve: str = "get") -> Path:
    config = tmp_path / "node.toml"
    config.write_text(
        f'home = "{tmp_path / "home"}"\n'
        "[dicom]\n"
        'ae_title = "RETINALGPT"\n'
        'bind_address = "127.0.0.1"\n'
        f"port = {node_port}\n"
        "stable_seconds = 0.5\n"
        f'allowed_callers = [{{ ae_title = "CAMERA1" }}, {{ ae_title = "{archive_ae}", host = "127.0.0.1" }}]\n'
        "[storage]\n"
        "retain_days = 1\n"
        "retention_sweep_seconds = 0.5\n"
        "[[archives]]\n"
        f'name = "pacs"\nae_title = "{archive_ae}"\nhost = "127.0.0.1"\nport = {archive_port}\ntimeout = 10\n'
        f'record_timeout = 20\nretrieve = "{retrieve}"\n'
    )
    upgrade(load_settings(config).database.url)
    return config


@pytest.fixture(params=["get", "move"])
def world(tmp_path, request):
    """Orthanc as the archive, the node role running; each test runs with C-GET and with C-MOVE."""
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", modalities={"retinalgpt": ["RETINALGPT", "127.0.0.1", node_port]})
    config = write_config(tmp_path, node_port, pacs.dicom_port, retrieve=request.param)
    settings = load_settings(config)
    with pacs:
        role = start_node_role(settings)
        try:
            yield pacs, config, role
        finally:
            role.stop()


def dataset_bytes_of(raw: bytes) -> bytes:
    meta_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + meta_length:]


def audit(db: Database, action: str) -> list[AuditEvent]:
    with db.reading() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def study_row(db: Database, uid: str) -> Study | None:
    with db.reading() as session:
        return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()


def received_and_purged(role, op_file, name: str, patient: str) -> tuple[str, Path, bytes]:
    """A study the node received, analysed (revision 1 analysis), delivered and purged by retention."""
    db = role.running.db
    path = op_file(f"{name}.dcm", patient_id=patient)
    uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    assert storescu(role.port, [path], calling="CAMERA1").returncode == 0
    wait_for(lambda: (s := study_row(db, uid)) and s.state == StudyState.QUEUED, 30, "the study queued")
    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        session.add(Analysis(study_id=study.id, revision=1, model_name="m", model_version="1",
                             result={"stub": "revision 1 result"}))
        session.execute(update(Study).where(Study.id == study.id).values(
            state=StudyState.DELIVERED, last_instance_at=utcnow().replace(year=utcnow().year - 1)))
        stored = session.scalars(select(Instance).where(Instance.study_id == study.id)).one()
        stored_path, stored_bytes = Path(stored.path), Path(stored.path).read_bytes()
    wait_for(lambda: (s := study_row(db, uid)) and s.purged_at is not None, 20, "the retention sweep")
    assert not stored_path.exists()
    return uid, stored_path, stored_bytes


def test_purged_study_is_rerun_from_orthanc(world, op_file):
    pacs, config, role = world
    db = role.running.db
    uid, stored_path, stored_bytes = received_and_purged(role, op_file, "eye", "PAT-R")
    pacs.post("/instances", stored_bytes)  # the PACS holds the original (as the camera sent it)

    out = retinalgpt("studies", "rerun", uid, config=config, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(rf"study {uid}: 1 instance\(s\) retrieved from pacs; revision 2 opened", out.stdout)

    # same path, same data set bytes (UIDs, pixel data, transfer syntax kept); the File Meta Information names
    # the AE title that sent it (Source Application Entity Title): now the archive
    assert dataset_bytes(stored_path) == dataset_bytes_of(stored_bytes)
    with db.reading() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        instance = session.scalars(select(Instance).where(Instance.study_id == study.id)).one()
        assert (instance.purged_at, study.purged_at, study.revision) == (None, None, 2)
        assert instance.calling_ae_title == "ORTHANC"  # C-GET: the peer of our association; C-MOVE: the caller
        analyses = session.scalars(select(Analysis).where(Analysis.study_id == study.id)).all()
        assert [(a.revision, a.superseded) for a in analyses] == [(1, True)]
    events = audit(db, "study.retrieved")
    assert [(e.study_instance_uid, e.detail["archive"], e.detail["instances"]) for e in events] == [(uid, "pacs", 1)]

    def job_queued() -> bool:
        with db.reading() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
            return study.state == StudyState.QUEUED and session.scalars(select(Job).where(
                Job.study_id == study.id, Job.revision == 2)).first() is not None

    wait_for(job_queued, 20, "the revision-2 analysis queued at completion")


@pytest.mark.parametrize("world", ["get"], indirect=True)  # the retrieve method plays no part
def test_archive_holding_the_study_for_another_patient_is_refused(world, op_file):
    pacs, config, role = world
    db = role.running.db
    uid, stored_path, stored_bytes = received_and_purged(role, op_file, "eye", "PAT-A")
    pacs.upload(op_file("other.dcm", patient_id="PAT-B", study_uid=uid))

    out = retinalgpt("studies", "rerun", uid, config=config, check=False)
    assert out.returncode == 1
    assert "holds study" in out.stderr + out.stdout and "'PAT-B'" in out.stderr + out.stdout
    assert "not retrieved" in out.stderr + out.stdout
    assert not stored_path.exists()
    study = study_row(db, uid)
    assert study.purged_at is not None and study.revision == 1
    assert [e.detail["archive"] for e in audit(db, "study.retrieve_failed")] == ["pacs"]
    assert not audit(db, "instance.uid_conflict")  # refused before anything was moved

    pacs.stop()  # the archive down: the re-run says so, the study stays as it was
    down = retinalgpt("studies", "rerun", uid, config=config, check=False)
    assert down.returncode == 1
    assert re.search(r"error: archive pacs: cannot connect to ORTHANC@127\.0\.0\.1:\d+", down.stderr), down.stderr
    study = study_row(db, uid)
    assert study.purged_at is not None and study.revision == 1 and study.state == StudyState.DELIVERED


@pytest.mark.parametrize("world", ["get"], indirect=True)  # C-MOVE: the same path as the re-run
def test_fetch_by_patient_since_pulls_only_the_matching_studies(world, op_file, tmp_path):
    pacs, config, role = world
    db = role.running.db
    wanted = {}
    for name, patient, date in (("new", "PAT-F", "20260310"), ("newer", "PAT-F", "20260402"),
                                ("old", "PAT-F", "20251231"), ("someone", "PAT-G", "20260310")):
        path = op_file(f"{name}.dcm", patient_id=patient)
        ds = dcmread(path)
        ds.StudyDate = date
        ds.save_as(path)
        pacs.upload(path)
        if name in ("new", "newer"):
            wanted[str(ds.StudyInstanceUID)] = ds.SOPInstanceUID

    out = retinalgpt("studies", "fetch", "--from", "pacs", "--patient", "PAT-F", "--since", "2026-01-01",
                     config=config, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    for uid in wanted:
        assert f"study {uid} (patient PAT-F): 1 instance(s) fetched from pacs" in out.stdout
    with db.reading() as session:
        rows = session.execute(select(Study.study_instance_uid, Instance.sop_instance_uid)
                               .join(Instance, Instance.study_id == Study.id)).all()
    assert {row.study_instance_uid: row.sop_instance_uid for row in rows} == wanted

    again = retinalgpt("studies", "fetch", "--patient", "PAT-F", "--since", "2026-01-01", config=config, check=False)
    assert again.returncode == 0 and again.stdout.count("already stored here, not fetched") == 2

    none = retinalgpt("studies", "fetch", "--patient", "NOBODY", config=config, check=False)
    assert none.returncode == 1 and "archive pacs has no study of patient NOBODY" in none.stderr + none.stdout


def test_archive_down_is_one_clear_error_and_records_nothing(tmp_path):
    config = write_config(tmp_path, free_port(), free_port())  # nothing listens on the archive's port
    out = retinalgpt("studies", "fetch", "--study", generate_uid(), config=config, check=False)
    assert out.returncode == 1
    assert re.search(r"archive pacs: cannot (connect|associate) .*ORTHANC@127\.0\.0\.1", out.stderr + out.stdout)
    assert "Traceback" not in out.stderr
    db = Database(load_settings(config).database.url)
    try:
        with db.reading() as session:
            assert session.scalars(select(Study)).first() is None
    finally:
        db.dispose()


def test_association_rejected_by_the_archive_is_one_clear_error(tmp_path):
    with Orthanc(tmp_path / "orthanc") as pacs:  # checks the called AE title: ours calls it by a wrong one
        config = write_config(tmp_path, free_port(), pacs.dicom_port, archive_ae="NOTORTHANC", retrieve="move")
        out = retinalgpt("studies", "fetch", "--study", generate_uid(), config=config, check=False)
    assert out.returncode == 1
    assert re.search(r"error: archive pacs: association rejected by NOTORTHANC@127\.0\.0\.1:\d+ \(.*Called AE",
                     out.stderr, re.I), out.stderr


def test_instances_the_node_refuses_make_a_partial_retrieve_and_are_never_filed_elsewhere(world, op_file):
    """The archive's study reuses the SOP Instance UID of an instance recorded here for another patient and
    study: the node refuses that instance (0xC004), stores the other one, and the fetch says partial, exit 1."""
    pacs, config, role = world
    db = role.running.db
    ours = op_file("ours.dcm", patient_id="PAT-1")
    assert storescu(role.port, [ours], calling="CAMERA1").returncode == 0
    reused_uid = str(dcmread(ours, stop_before_pixels=True).SOPInstanceUID)
    study_uid, series_uid = generate_uid(), generate_uid()
    clash = dcmread(op_file("clash.dcm", patient_id="PAT-2", study_uid=study_uid, series_uid=series_uid))
    clash.SOPInstanceUID = clash.file_meta.MediaStorageSOPInstanceUID = reused_uid
    clash.save_as(Path(ours).with_name("clash.dcm"))
    pacs.upload(Path(ours).with_name("clash.dcm"))
    good = pacs.upload(op_file("good.dcm", patient_id="PAT-2", study_uid=study_uid, series_uid=series_uid))
    assert good

    out = retinalgpt("studies", "fetch", "--study", study_uid, config=config, check=False)
    assert out.returncode == 1, out.stdout
    # C-GET: 0xB000, one sent and one failed; C-MOVE: Orthanc stops at the refused instance with 0xC000 (its
    # order decides whether "good" went first)
    assert re.search(rf"study {study_uid}: FAILED: incomplete retrieve of study {study_uid} from archive pacs "
                     r"\(C-(GET|MOVE) status 0x[ABC]\w{3}.*\): \d instance\(s\) sent, [01] failed", out.stdout), out.stdout
    with db.reading() as session:
        placed = dict(session.execute(select(Instance.sop_instance_uid, Study.study_instance_uid)
                                      .join(Study, Study.id == Instance.study_id)).all())
    assert placed[reused_uid] == str(dcmread(ours, stop_before_pixels=True).StudyInstanceUID)
    assert sum(1 for study in placed.values() if study == study_uid) <= 1  # at most "good"
    assert [e.detail["sop_instance_uid"] for e in audit(db, "instance.uid_conflict")] == [reused_uid]
    assert [e.study_instance_uid for e in audit(db, "study.retrieve_failed")] == [study_uid]


def test_archives_are_validated(tmp_path):
    config = tmp_path / "bad.toml"
    archive = '[[archives]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
    config.write_text(archive + 'retrieve = "move"\n')
    with pytest.raises(ConfigError, match="archive 'pacs': its AE title 'PACS' must be in dicom.allowed_callers"):
        load_settings(config)
    config.write_text(archive)  # C-GET (the default): the archive never calls us
    assert load_settings(config).archives[0].retrieve == "get"
    config.write_text(archive + 'retrieve = "fetch"\n')
    with pytest.raises(ConfigError, match="archives.0.retrieve: Input should be 'get' or 'move'"):
        load_settings(config)
    config.write_text('[dicom]\nallowed_callers = [{ ae_title = "PACS" }]\n'
                      '[[archives]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n')
    with pytest.raises(ConfigError, match="archives.0.port: Field required"):
        load_settings(config)
    config.write_text('[dicom]\nallowed_callers = [{ ae_title = "PACS" }]\n'
                      '[[archives]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\n')
    settings = load_settings(config)
    assert settings.archive(None).name == "pacs"
    with pytest.raises(ConfigError, match=r"unknown archive 'x' \(configured \[\[archives\]\]: pacs\)"):
        settings.archive("x")
