"""Disk safety (issue 15 item 3) on a real, small file system (tmpfs, else a loop device): dcmtk's storescu
sends to the node while the storage folder is short of space.

- free space under the minimum: the C-STORE is answered 0xA700 before anything is written (no spool file is
  ever created, so even an instance that would fit is refused), the association carries on, and once space is
  freed the same instance is stored;
- no minimum configured and the disk fills up in the middle of a data set: the write fails with ENOSPC, the
  partial file is removed, the C-STORE is answered 0xA700 and the next instance of the same association is
  stored.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from dicom_node.status import StoreStatus
from tests.dicom_node.dicom_fixtures import storescu
from tests.support.small_fs import fill_until_free, free_bytes, small_filesystem
from worker.pipeline.sources import ophthalmic_photograph

MIB = 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    with small_filesystem(tmp_path / "small", 8) as mounted:
        yield mounted


def files_below(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def statuses(result) -> list[int]:
    """The C-STORE response statuses that storescu logged (``-v``: "Received Store Response (…)" lines are
    followed by the status in the debug dump; with ``-v`` dcmtk prints the DIMSE status name)."""
    return [int(code, 16) for code in re.findall(r"Status\s*:\s*0x([0-9A-Fa-f]{4})", result.stdout + result.stderr)]


def uncompressed_op(path: Path, side: int) -> Path:
    rgb = np.random.default_rng(1).integers(0, 255, (side, side, 3), dtype=np.uint8)
    ds = ophthalmic_photograph(rgb, study_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
                               patient_id="FULL", patient_name="Disk^Full")
    ds.save_as(path, enforce_file_format=True)
    return path


def test_under_min_free_the_store_is_refused_before_writing_and_accepted_when_space_returns(
        start_listener, op_file, small_fs):
    root = small_fs / "studies"
    listener, sink = start_listener(storage_root=root, min_free_bytes=4 * MIB)
    image = op_file("eye.dcm")
    assert image.stat().st_size < 1 * MIB
    filler = fill_until_free(small_fs, 2 * MIB)  # room for the image, but under the 4 MiB minimum
    refused = storescu(listener.port, [image], extra=["-d"])
    assert statuses(refused) == [StoreStatus.OUT_OF_RESOURCES_STORAGE], refused.stdout[-2000:]
    assert [r.no_space for r in sink.rejected] == [True] and "storage low" in sink.rejected[0].reason
    assert not sink.stored
    assert files_below(root) == []  # not even a spool file in .incoming
    assert free_bytes(small_fs) >= 2 * MIB - 64 * 1024

    filler.unlink()
    stored = storescu(listener.port, [image], extra=["-d"])
    assert statuses(stored) == [StoreStatus.SUCCESS], stored.stdout[-2000:]
    assert [p.name for p in files_below(root)] == [f"{sink.stored[0][0].sop_instance_uid}.dcm"]


def test_disk_filling_mid_write_leaves_no_partial_file_and_the_association_carries_on(
        start_listener, op_file, small_fs, tmp_path):
    root = small_fs / "studies"
    listener, sink = start_listener(storage_root=root, min_free_bytes=0)  # no minimum: the write itself fails
    big = uncompressed_op(tmp_path / "big.dcm", 1200)  # 4.1 MiB of pixels
    small = op_file("small.dcm")
    fill_until_free(small_fs, 2 * MIB)
    before = free_bytes(small_fs)
    result = storescu(listener.port, [big, small], extra=["-d", "--no-halt"])  # carry on after a failure
    assert statuses(result) == [StoreStatus.OUT_OF_RESOURCES_STORAGE, StoreStatus.SUCCESS], result.stdout[-2000:]
    assert sink.rejected[0].no_space and "No space left on device" in sink.rejected[0].reason
    assert [p.name for p in files_below(root)] == [f"{sink.stored[0][0].sop_instance_uid}.dcm"]
    assert not list((root / ".incoming").iterdir())
    assert free_bytes(small_fs) >= before - small.stat().st_size - 64 * 1024  # the partial file's space is back
