"""Retention and disk safety (issue 15 item 3) with the real node: dcmtk's storescu sends, the node role's
bookkeeper runs the retention sweep, the API answers /readyz and /metrics.

- storage on a small real file system (tmpfs, else a loop device) filled under ``storage.min_free_gb``: the
  C-STORE is refused with 0xA700, audited as ``instance.no_space``, ``/readyz`` names the storage as low and
  the metrics say so; once space is freed the same instance is stored and ``/readyz`` says ``ok`` again;
- retention: of four studies, only the one that is ``delivered`` and older than ``retain_days`` loses its
  originals (files and emptied folders); its rows stay, marked purged, its results stay, the purge is audited;
  a re-run is refused with a clear reason; the same instance sent again is stored again.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from tests.dicom_node.dicom_fixtures import storescu
from tests.support.roles import wait_for
from tests.support.small_fs import fill_until_free, small_filesystem
from worker.api.app import create_app
from worker.config import ConfigError, Settings, load_settings
from worker.db import AuditEvent, Database, Instance, Study, StudyState, utcnow
from worker.db.migrate import upgrade
from worker.ingest import start_node
from worker.pipeline.delivery import results_folder
from worker.pipeline.jobs import PipelineError
from worker.pipeline.operations import pipeline_for
from worker.roles import start_node_role

MIB = 1 << 20


def write_config(tmp_path: Path, port: int, storage: str) -> Settings:
    config = tmp_path / "node.toml"
    config.write_text(
        f'home = "{tmp_path / "home"}"\n'
        "[dicom]\n"
        'bind_address = "127.0.0.1"\n'
        f"port = {port}\n"
        "stable_seconds = 0.5\n"
        'allowed_callers = [{ ae_title = "CAMERA1" }]\n'
        "[storage]\n" + storage
    )
    settings = load_settings(config)
    upgrade(settings.database.url)
    return settings


def audit(db: Database, action: str) -> list[AuditEvent]:
    with db.reading() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def test_low_disk_is_refused_audited_and_shown_by_readyz_and_metrics(tmp_path, free_tcp_port, op_file):
    with small_filesystem(tmp_path / "small", 16) as small:
        settings = write_config(tmp_path, free_tcp_port, f'path = "{small / "studies"}"\nmin_free_gb = 0.006\n')
        assert settings.storage.min_free_bytes == 6_000_000
        node = start_node(settings)
        try:
            with TestClient(create_app(settings)) as http:
                assert http.get("/readyz").json()["storage"] == "ok"
                filler = fill_until_free(small, 4 * MIB)
                image = op_file("eye.dcm")
                refused = storescu(node.listener.port, [image], extra=["-d"])
                assert re.findall(r"Status\s*:\s*0x([0-9A-F]{4})", refused.stdout + refused.stderr, re.I) == ["a700"]
                events = audit(node.db, "instance.no_space")
                assert len(events) == 1 and events[0].detail["status"] == "0xA700"
                assert "storage low" in events[0].detail["reason"]
                ready = http.get("/readyz")
                assert ready.status_code == 503 and ready.json()["storage"].startswith("low: ")
                assert "0xA700" in ready.json()["storage"]
                metrics = http.get("/metrics").text
                assert "retinalgpt_storage_low 1.0" in metrics
                assert "retinalgpt_storage_min_free_bytes 6e+06" in metrics
                assert 'retinalgpt_instances_refused_total{reason="no_space"} 1.0' in metrics
                free = float(re.search(r"^retinalgpt_storage_free_bytes (\S+)$", metrics, re.M).group(1))
                assert free < 6_000_000

                filler.unlink()
                stored = storescu(node.listener.port, [image])
                assert stored.returncode == 0, stored.stderr
                assert http.get("/readyz").json()["storage"] == "ok"
                assert "retinalgpt_storage_low 0.0" in http.get("/metrics").text
            with node.db.reading() as session:
                assert len(session.scalars(select(Instance)).all()) == 1
        finally:
            node.stop()


@pytest.fixture
def node_role(tmp_path, free_tcp_port):
    settings = write_config(tmp_path, free_tcp_port, "retain_days = 1\nretention_sweep_seconds = 0.5\n")
    role = start_node_role(settings)
    yield role, settings
    role.stop()


def test_retention_purges_only_delivered_studies_older_than_retain_days(node_role, op_file):
    role, settings = node_role
    db = role.running.db
    names = ("old_delivered", "new_delivered", "old_failed", "old_analysed")
    files = {name: op_file(f"{name}.dcm", patient_id=name.upper()) for name in names}
    for path in files.values():
        assert storescu(role.port, [path]).returncode == 0

    def study_of(session, name):
        return session.scalars(select(Study).where(Study.patient_id == name.upper())).one()

    def settled() -> bool:
        with db.reading() as session:
            states = [study_of(session, name).state for name in names]
        return all(state not in (StudyState.RECEIVING, StudyState.COMPLETE) for state in states)

    wait_for(settled, 30, "the four studies to be complete and queued")
    old = utcnow() - dt.timedelta(days=2)
    stored = {}
    with db.session() as session:
        for name, state, when in (("old_delivered", StudyState.DELIVERED, old),
                                  ("new_delivered", StudyState.DELIVERED, None),
                                  ("old_failed", StudyState.FAILED, old),
                                  ("old_analysed", StudyState.ANALYSED, old)):
            study = study_of(session, name)
            values = {"state": state} | ({"last_instance_at": when} if when else {})
            session.execute(update(Study).where(Study.id == study.id).values(**values))
            stored[name] = Path(session.scalars(select(Instance.path).where(Instance.study_id == study.id)).one())
    with db.reading() as session:
        target_uid = study_of(session, "old_delivered").study_instance_uid
    results = results_folder(settings, target_uid, 1)
    results.mkdir(parents=True)
    (results / "sr.dcm").write_bytes(b"our result")

    size = stored["old_delivered"].stat().st_size
    wait_for(lambda: audit(db, "study.purged"), 20, "the retention sweep of the bookkeeper")
    time.sleep(2.5)  # more sweeps (bookkeeper every 2 s, retention every 0.5 s): nothing else may go
    events = audit(db, "study.purged")
    assert [e.study_instance_uid for e in events] == [target_uid]
    assert (events[0].actor, events[0].detail["files"], events[0].detail["bytes"]) == ("retention", 1, size)
    assert not stored["old_delivered"].exists()
    assert not stored["old_delivered"].parent.parent.exists()  # emptied study folder removed
    assert all(stored[name].exists() for name in names[1:])
    assert (results / "sr.dcm").read_bytes() == b"our result"
    with db.reading() as session:
        for name in names:
            study = study_of(session, name)
            instance = session.scalars(select(Instance).where(Instance.study_id == study.id)).one()
            purged = name == "old_delivered"
            assert (study.purged_at is not None, instance.purged_at is not None) == (purged, purged), name
        assert study_of(session, "old_delivered").state == StudyState.DELIVERED

    pipeline = pipeline_for(settings)
    try:
        with pytest.raises(PipelineError, match="originals of study .* were deleted on .*retain_days"):
            pipeline.rerun(target_uid, actor="test")
    finally:
        pipeline.db.dispose()

    again = storescu(role.port, [files["old_delivered"]], extra=["-d"])  # the folder the node made is gone
    statuses = re.findall(r"Status\s*:\s*0x([0-9A-F]{4})", again.stdout + again.stderr, re.I)
    assert statuses == ["0000"], again.stdout[-2000:]
    assert stored["old_delivered"].exists()
    with db.reading() as session:
        instance = session.scalars(select(Instance).where(Instance.path == str(stored["old_delivered"]))).one()
        assert instance.purged_at is None


@pytest.mark.parametrize(("line", "message"), [
    ("retain_days = 0", "storage.retain_days: Input should be greater than 0"),
    ("min_free_gb = -1", "storage.min_free_gb: Input should be greater than or equal to 0"),
    ('min_free_gb = "lots"', "storage.min_free_gb: Input should be a valid number"),
    ("retention_sweep_seconds = 0", "storage.retention_sweep_seconds: Input should be greater than 0"),
])
def test_storage_keys_are_validated(tmp_path, line, message):
    config = tmp_path / "bad.toml"
    config.write_text(f"[storage]\n{line}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(config)


def test_storage_defaults_keep_originals_and_a_gigabyte_free(tmp_path):
    settings = load_settings(None, home=tmp_path)
    assert (settings.storage.retain_days, settings.storage.min_free_bytes) == (None, 1_000_000_000)
