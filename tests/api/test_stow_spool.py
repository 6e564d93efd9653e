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
