"""Embedded SQLite under concurrent readers (issue 18 item 14): reads use deferred transactions, so API readers
never hold the write lock the C-STORE path needs."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import httpx
import numpy as np
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from tests.api.conftest import READ_TOKEN, sha
from tests.dicom_node.dicom_fixtures import echoscu, storescu
from tests.support.net import free_port
from tests.support.roles import Roles, wait_for
from worker.config import load_settings
from worker.db import AuditEvent, Database, Instance, Study
from worker.db.migrate import upgrade
from worker.pipeline.sources import ophthalmic_photograph


def _writer(path: str) -> sqlite3.Connection:
    """A second writer that does not wait for the lock at all (busy timeout 0)."""
    return sqlite3.connect(path, timeout=0, isolation_level=None)


def test_reading_session_leaves_the_write_lock_free(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    db = Database(url)
    writer = _writer(str(tmp_path / "db.sqlite"))
    try:
        with db.reading() as session:
            assert session.scalar(select(func.count()).select_from(Study)) == 0  # the read transaction is open
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("INSERT INTO studies (study_instance_uid, state, revision, created_at, updated_at, "
                           "receiving_since, last_instance_at) VALUES ('1.2.3', 'receiving', 1, datetime('now'), "
                           "datetime('now'), datetime('now'), datetime('now'))")
            writer.execute("COMMIT")
            assert session.scalar(select(func.count()).select_from(Study)) == 0  # its snapshot, unchanged
        with db.reading() as session:
            assert session.scalar(select(func.count()).select_from(Study)) == 1
        with db.session() as session:  # a writing session still takes the write lock at its start
            session.scalar(select(func.count()).select_from(Study))
            try:
                writer.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                assert "locked" in str(exc)
            else:
                raise AssertionError("a writing session must hold the write lock")
    finally:
        writer.close()
        db.dispose()


def test_fifty_c_stores_while_api_clients_read_continuously(tmp_path: Path, config_file) -> None:
    """Real node and real API: 50 C-STOREs while four clients read the worklist, FHIR search, metrics and
    readiness without pause. Every C-STORE and every read succeeds."""
    node_port, api_port = free_port(), free_port()
    config = config_file(port=node_port, extra=(
        f"[api]\nport = {api_port}\ntokens = [{{ name = \"ehr\", sha256 = \"{sha(READ_TOKEN)}\", role = \"read\" }}]\n"))
    roles = Roles(config, tmp_path / "logs")
    roles.start("node", "node")
    roles.start("api", "api")
    base = f"http://127.0.0.1:{api_port}"
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    files = []
    for study in range(5):
        study_uid, series_uid = generate_uid(), generate_uid()
        for number in range(10):
            rgb = np.full((64, 64, 3), 10 * number, dtype=np.uint8)
            ds = ophthalmic_photograph(rgb, study_instance_uid=study_uid, series_instance_uid=series_uid,
                                       patient_id=f"P{study}", patient_name="Read^Write", instance_number=number)
            path = tmp_path / f"{study}-{number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)

    def api_up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    logs = lambda: roles.log("node") + roles.log("api")  # noqa: E731
    try:
        wait_for(lambda: echoscu(node_port).returncode == 0, 60, "the node", diagnostics=logs)
        wait_for(api_up, 60, "the API", diagnostics=logs)
        stop, storing = threading.Event(), threading.Event()
        reads: list[int] = []
        during: list[int] = []
        failures: list[str] = []

        def read(path: str) -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
                while not stop.is_set():
                    try:
                        status = client.get(path).status_code
                    except httpx.HTTPError as exc:
                        failures.append(f"{path}: {exc!r}")
                        continue
                    reads.append(status)
                    if storing.is_set():
                        during.append(status)
                    if status != 200:
                        failures.append(f"{path}: HTTP {status}")

        readers = [threading.Thread(target=read, args=(path,), daemon=True) for path in
                   ("/api/worklist?limit=100", "/fhir/r4/ImagingStudy?_count=50", "/metrics", "/readyz?scope=api")]
        for reader in readers:
            reader.start()
        try:
            wait_for(lambda: len(reads) >= 8, 60, "the readers to get going")
            storing.set()
            results = [storescu(node_port, files[n : n + 10]) for n in range(0, 50, 10)]  # five associations
            storing.clear()
        finally:
            stop.set()
            for reader in readers:
                reader.join(30)
        assert [r.returncode for r in results] == [0] * 5, [r.stderr for r in results]
        assert not failures, failures[:5]
        assert during, "no read overlapped the C-STOREs"
    finally:
        roles.stop_all()
    db = Database(load_settings(config).database.url)
    try:
        with db.reading() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == 50
            assert not session.scalars(select(AuditEvent).where(AuditEvent.action == "instance.rejected")).all()
    finally:
        db.dispose()
