"""Where STOW-RS spools: below ``.incoming/stow``, which the node's start (it clears ``.incoming/*.part`` of
receptions that never completed) leaves alone, since an API process may be receiving into it; the API removes
only spool files a day old (other API replicas share the folder)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.support.net import free_port
from worker.api.context import ApiContext
from worker.api.stow import STALE_SPOOL_SECONDS, StowService
from worker.config import load_settings
from worker.db import Database
from worker.db.migrate import upgrade
from worker.ingest import start_node


def test_node_start_keeps_api_spools_and_the_api_removes_only_stale_ones(tmp_path: Path) -> None:
    settings = load_settings(None, home=tmp_path / "home",
                             dicom={"port": free_port(), "bind_address": "127.0.0.1"})
    upgrade(settings.database.url)
    stow = settings.storage.path / ".incoming" / "stow"
    stow.mkdir(parents=True)
    in_flight, stale = stow / "in-flight.part", stow / "stale.part"
    node_leftover = settings.storage.path / ".incoming" / "node.part"
    for path in (in_flight, stale, node_leftover):
        path.write_bytes(b"x")
    old = time.time() - STALE_SPOOL_SECONDS - 60
    os.utime(stale, (old, old))

    node = start_node(settings)
    node.stop()
    assert not node_leftover.exists() and in_flight.exists() and stale.exists()

    db = Database(settings.database.url)
    try:
        StowService(ApiContext(settings=settings, db=db, celery=None))  # type: ignore[arg-type]
    finally:
        db.dispose()
    assert in_flight.exists() and not stale.exists()


def test_stow_under_the_free_space_minimum_is_refused_before_writing(tmp_path: Path, op_file) -> None:
    """``storage.min_free_gb`` holds for STOW-RS as for C-STORE: 0xA700 once the part's File Meta Information
    has arrived, no spool file, audited ``instance.no_space``."""
    import uuid

    import pydicom
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from tests.api.conftest import sha
    from worker.api import create_app
    from worker.db import AuditEvent

    settings = load_settings(None, home=tmp_path / "home", storage={"min_free_gb": 1e9},
                             api={"tokens": [{"name": "router", "sha256": sha("s3nder-token"), "role": "sender"}]})
    upgrade(settings.database.url)
    data = op_file("eye.dcm").read_bytes()
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode())
    db = Database(settings.database.url)
    try:
        with TestClient(create_app(settings, db=db)) as client:
            response = client.post("/dicomweb/studies", content=body, headers={
                "Authorization": "Bearer s3nder-token",
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        assert response.status_code == 409, response.text
        (failed,) = pydicom.Dataset.from_json(response.json()).FailedSOPSequence
        assert failed.FailureReason == 0xA700 and "storage low" in response.headers["warning"]
        assert not [p for p in (settings.storage.path / ".incoming").rglob("*") if p.is_file()]
        with db.reading() as session:
            actions = session.scalars(select(AuditEvent.action)).all()
        assert "instance.no_space" in actions and "study.receiving" not in actions
    finally:
        db.dispose()
