"""The node recording into the database: rows, audit events, completion, restart, late-instance revisions."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from sqlalchemy import select

from dicom_node.events import ReceivedInstance
from tests.dicom_node.dicom_fixtures import echoscu, raw_store, storescu
from worker.db import AuditEvent, Database, Instance, Series, Study, StudyState, utcnow
from worker.db.migrate import upgrade
from worker.ingest import IngestService, RunningNode, start_node

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


class Completions:
    """Collects ``(study_uid, revision)`` callbacks and lets a test wait for them."""

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
def node_factory(settings_for, free_tcp_port) -> Callable[..., tuple[RunningNode, Completions]]:
    running: list[RunningNode] = []

    def start(port: int = free_tcp_port, stable_seconds: float = 1.0) -> tuple[RunningNode, Completions]:
        settings = settings_for(port=port, stable_seconds=stable_seconds)
        upgrade(settings.database.url)
        completions = Completions()
        node = start_node(settings, completions)
        running.append(node)
        return node, completions

    yield start
    for node in running:
        node.stop()


def _db(node: RunningNode) -> Database:
    return node.db


def test_stored_instance_rows_and_completion(node_factory, op_file):
    node, completions = node_factory()
    study_uid, series_uid = generate_uid(), generate_uid()
    files = [op_file(f"{eye}.dcm", study_uid=study_uid, series_uid=series_uid, laterality=eye) for eye in "RL"]
    started = time.monotonic()
    result = storescu(node.listener.port, files)
    assert result.returncode == 0, result.stderr
    assert completions.wait_for(1) == [(study_uid, 1)]
    assert time.monotonic() - started >= 1.0  # stable_seconds after the last instance
    with _db(node).session() as session:
        study = session.scalars(select(Study)).one()
        assert (study.study_instance_uid, study.state, study.revision) == (study_uid, StudyState.COMPLETE, 1)
        assert (study.patient_id, study.patient_name, study.accession_number, study.study_date) == (
            "PAT001", "Doe^Jane", "ACC001", "20260101")
        assert study.completed_at is not None and study.completed_at >= study.last_instance_at
        series = session.scalars(select(Series)).one()
        assert (series.series_instance_uid, series.modality, series.study_id) == (series_uid, "OP", study.id)
        rows = session.scalars(select(Instance).order_by(Instance.laterality)).all()
        assert [r.laterality for r in rows] == ["L", "R"]
        for row in rows:
            source = dcmread(files[0] if row.laterality == "R" else files[1], stop_before_pixels=True)
            assert row.sop_instance_uid == source.SOPInstanceUID
            assert (row.sop_class_uid, row.transfer_syntax_uid) == (OP_8BIT, JPEGBaseline8Bit)
            assert (row.calling_ae_title, row.peer_host, row.revision, row.analysable) == ("CAMERA1", "127.0.0.1", 1,
                                                                                            True)
            data = Path(row.path).read_bytes()
            assert (row.size_bytes, row.sha256) == (len(data), hashlib.sha256(data).hexdigest())
            assert row.received_at.tzinfo is not None
        actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
        assert actions == ["study.receiving", "association.ended", "study.complete"]


def test_restart_rearms_receiving_studies_and_late_instance_opens_revision_2(node_factory, op_file, free_tcp_port):
    study_uid, series_uid = generate_uid(), generate_uid()
    first, completions = node_factory(port=free_tcp_port, stable_seconds=3.0)
    assert storescu(first.listener.port, [op_file("a.dcm", study_uid=study_uid, series_uid=series_uid)]).returncode == 0
    first.stop()  # before stable_seconds passed: the study is still receiving in the database
    assert completions.calls == []

    second, completions = node_factory(port=free_tcp_port, stable_seconds=3.0)
    with second.db.session() as session:
        assert session.scalars(select(Study.state)).one() is StudyState.RECEIVING
    assert completions.wait_for(1) == [(study_uid, 1)]

    late = op_file("late.dcm", study_uid=study_uid, series_uid=series_uid, laterality="L")
    assert storescu(second.listener.port, [late]).returncode == 0
    with second.db.session() as session:
        study = session.scalars(select(Study)).one()
        assert (study.state, study.revision) == (StudyState.RECEIVING, 2)
    assert completions.wait_for(2) == [(study_uid, 1), (study_uid, 2)]
    with second.db.session() as session:
        revisions = dict(session.execute(select(Instance.laterality, Instance.revision)).all())
        assert revisions == {"R": 1, "L": 2}
        study = session.scalars(select(Study)).one()
        assert (study.state, study.revision) == (StudyState.COMPLETE, 2)
        assert "study.revision_opened" in session.scalars(select(AuditEvent.action)).all()


def test_rejections_are_audited(node_factory, op_file, tmp_path):
    node, _ = node_factory()
    assert echoscu(node.listener.port, calling="INTRUDER").returncode != 0
    good = op_file()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-4000])
    assert raw_store(node.listener.port, OP_8BIT, JPEGBaseline8Bit, truncated) == 0xC003
    assert storescu(node.listener.port, [good]).returncode == 0
    assert storescu(node.listener.port, [good]).returncode == 0  # duplicate, kept first
    with node.db.session() as session:
        events = {e.action: e for e in session.scalars(select(AuditEvent))}
        assert events["association.rejected"].actor == "INTRUDER@127.0.0.1"
        assert "allow-list" in events["association.rejected"].detail["reason"]
        assert events["instance.rejected"].detail["status"] == "0xC003"
        assert events["instance.duplicate_ignored"].detail["sop_instance_uid"] == dcmread(good).SOPInstanceUID
        assert len(session.scalars(select(Instance)).all()) == 1


def _received(study_uid: str, series_uid: str, sop_uid: str, **overrides) -> ReceivedInstance:
    values = {
        "sop_class_uid": OP_8BIT, "sop_instance_uid": sop_uid, "study_instance_uid": study_uid,
        "series_instance_uid": series_uid, "transfer_syntax_uid": JPEGBaseline8Bit,
        "path": Path(f"/studies/{sop_uid}.dcm"), "size": 1000, "sha256": "0" * 64, "calling_ae_title": "CAMERA1",
        "peer_host": "127.0.0.1", "received_at": utcnow(), "analysable": True, "patient_id": "PAT001",
    }
    return ReceivedInstance(**(values | overrides))


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_ingest_service_revisions_and_replacement(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    db = Database(url)
    completions = Completions()
    service = IngestService(db, completions)
    also = Completions()
    service.add_completion_callback(also)
    try:
        study, series = generate_uid(), generate_uid()
        service.instance_stored(_received(study, series, "1.2.3.1", patient_id=None), replaced=False)
        service.instance_stored(_received(study, series, "1.2.3.2"), replaced=False)
        service.instance_stored(_received(study, series, "1.2.3.2", sha256="f" * 64), replaced=True)
        assert [p.study_instance_uid for p in service.pending_studies()] == [study]
        service.study_stable(study)
        service.study_stable(study)  # a second report of the same revision changes nothing
        assert completions.calls == [(study, 1)]
        service.instance_stored(_received(study, series, "1.2.3.3"), replaced=False)
        with db.session() as session:
            row = session.scalars(select(Study)).one()
            assert (row.state, row.revision, row.patient_id) == (StudyState.RECEIVING, 2, "PAT001")
            instances = {i.sop_instance_uid: (i.revision, i.sha256[0]) for i in session.scalars(select(Instance))}
            assert instances == {"1.2.3.1": (1, "0"), "1.2.3.2": (1, "f"), "1.2.3.3": (2, "0")}
            actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
            assert actions == ["study.receiving", "instance.replaced", "study.complete", "study.revision_opened"]
        service.study_stable(study)
        assert completions.calls == also.calls == [(study, 1), (study, 2)]
    finally:
        db.dispose()


@pytest.mark.parametrize("phi", [False, True])
def test_completion_log_names_the_patient_only_with_logging_phi(tmp_path, caplog, phi):
    """``logging.phi`` (default false): log lines identify a study by UID; only when it is on do they name the
    patient (issue 19)."""
    from worker import logsetup

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    db = Database(url)
    service = IngestService(db)
    logsetup.apply("INFO", phi=phi)
    try:
        study = generate_uid()
        service.instance_stored(_received(study, generate_uid(), "1.2.3.1", patient_id="PAT-LOG-77"), replaced=False)
        with caplog.at_level("INFO", logger="worker.ingest"):
            service.study_stable(study)
    finally:
        logsetup.apply("INFO", phi=False)
        db.dispose()
    lines = [r.getMessage() for r in caplog.records if r.name == "worker.ingest"]
    assert any(study in line and "complete" in line for line in lines), lines
    assert any("PAT-LOG-77" in line for line in lines) is phi


def test_instances_filed_by_another_process_complete_through_the_node(node_factory, op_file):
    """What the API's STOW-RS does: its own IngestService and database connection file the instances with the
    node's intake code; the running node notices them (ReceivingWatcher) and completes the study once, after
    stable_seconds, with the sender recorded as given."""
    from dicom_node.intake import InstanceIntake, Source
    from dicom_node.part10 import Part10Receiver
    from dicom_node.storage import InstanceStore

    node, completions = node_factory()
    params = node.listener.params
    other_db = Database(node.db.engine.url.render_as_string(hide_password=False))
    store = InstanceStore(params.storage_root, fsync=params.fsync)
    intake = InstanceIntake(params, store, IngestService(other_db))
    study_uid, series_uid = generate_uid(), generate_uid()
    source = Source("router-7", "192.0.2.7", "STOW-RS")
    try:
        for eye in "RL":
            data = op_file(f"{eye}.dcm", study_uid=study_uid, series_uid=series_uid, laterality=eye).read_bytes()
            receiver = Part10Receiver(store.incoming, max_bytes=params.max_instance_bytes, source_ae_title="router-7",
                                      accept=lambda meta: None, fsync=params.fsync)
            for start in range(0, len(data), 4096):
                receiver.write(data[start : start + 4096])
            receiver.close()
            assert receiver.refusal is None and receiver.meta is not None
            outcome = intake.file(receiver.spool, transfer_syntax=receiver.meta.transfer_syntax,
                                  sop_class_uid=receiver.meta.sop_class_uid,
                                  sop_instance_uid=receiver.meta.sop_instance_uid, source=source)
            assert outcome.ok, outcome
        started = time.monotonic()
        assert completions.wait_for(1) == [(study_uid, 1)]
        assert time.monotonic() - started >= 0.9  # the stable window ran after the node saw the instances
        time.sleep(1.5)
        assert completions.calls == [(study_uid, 1)]  # completed once
        with node.db.reading() as session:
            rows = session.scalars(select(Instance)).all()
            assert {(r.calling_ae_title, r.peer_host, r.analysable) for r in rows} == {("router-7", "192.0.2.7", True)}
            assert len(rows) == 2 and not list(store.incoming.iterdir())
            stored = dcmread(rows[0].path)
            assert stored.file_meta.SourceApplicationEntityTitle == "router-7" and stored.StudyInstanceUID == study_uid
    finally:
        other_db.dispose()
