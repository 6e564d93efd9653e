"""Deflate-bomb drill against a real ``retinalgpt node`` process (issue 18 item 12): a 1 MB Deflated Explicit
VR Little Endian C-STORE that inflates to 1 GiB is refused with 0xA700, nothing is stored or recorded, and
the node's peak resident memory (VmHWM) grows by a few MiB, not by the gigabyte it used to."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.status import StoreStatus
from tests.dicom_node.dicom_fixtures import deflate_bomb, echoscu, raw_store, storescu
from tests.support.net import free_port
from tests.support.roles import Roles, wait_for
from worker.config import load_settings
from worker.db import AuditEvent, Database, Instance

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
MIB = 1 << 20


def peak_rss(pid: int) -> int:
    """VmHWM of a process (peak resident set size), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.fixture(scope="module")
def gib_bomb(tmp_path_factory) -> Path:
    return deflate_bomb(tmp_path_factory.mktemp("bomb") / "bomb.dcm", 1 << 30)


def test_deflate_bomb_refused_with_node_memory_bounded(tmp_path, config_file, op_file, gib_bomb):
    port = free_port()
    config = config_file(port=port, extra="max_instance_mb = 64\n")
    roles = Roles(config, tmp_path / "logs")
    node = roles.start("node", "node")
    try:
        wait_for(lambda: echoscu(port).returncode == 0, 60, "the node to answer C-ECHO",
                 diagnostics=lambda: roles.log("node"))
        assert storescu(port, [op_file()]).returncode == 0  # the normal receive path is warm
        before = peak_rss(node.pid)
        status = raw_store(port, OP_8BIT, DeflatedExplicitVRLittleEndian, gib_bomb)
        growth = peak_rss(node.pid) - before
        print(f"node peak RSS {before / MIB:.0f} MiB before the bomb, +{growth / MIB:.1f} MiB after")
        assert growth < 32 * MIB, f"the node's peak RSS grew by {growth / MIB:.0f} MiB"
        assert status == StoreStatus.OUT_OF_RESOURCES_STORAGE, roles.log("node")
        assert storescu(port, [op_file("after.dcm")]).returncode == 0  # and it keeps receiving
    finally:
        roles.stop_all()
    bomb_uid = str(dcmread(gib_bomb, stop_before_pixels=True).SOPInstanceUID)
    settings = load_settings(config)
    stored = [p for p in settings.storage.path.rglob("*") if p.is_file()]
    assert len(stored) == 2 and not any(bomb_uid in p.name for p in stored)
    db = Database(settings.database.url)
    try:
        with db.session() as session:
            assert session.scalars(select(Instance).where(Instance.sop_instance_uid == bomb_uid)).first() is None
            rejected = session.scalars(select(AuditEvent).where(AuditEvent.action == "instance.rejected")).all()
            assert ["inflates past the 64 MiB instance limit" in str(e.detail) for e in rejected] == [True]
    finally:
        db.dispose()
