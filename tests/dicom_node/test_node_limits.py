"""Bounded reception (issue 18 item 12): data sets larger than the instance limit, received or inflated, are
refused with 0xA700 and an Error Comment, nothing is kept, and the association carries on. Bounded sending
(item 13): the sender streams files instead of reading a whole study into memory."""

from __future__ import annotations

import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.params import PeerParams
from dicom_node.sender import Failure, send_files
from dicom_node.status import StoreStatus
from tests.support.roles import wait_for
from tests.dicom_node.dicom_fixtures import deflate_bomb, raw_store
from worker.pipeline.sources import ophthalmic_photograph

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
MIB = 1 << 20


@pytest.fixture(scope="session")
def gib_bomb(tmp_path_factory) -> Path:
    """A 1 MB Deflated Explicit VR Little Endian C-STORE that inflates to 1 GiB."""
    return deflate_bomb(tmp_path_factory.mktemp("bomb") / "bomb.dcm", 1 << 30)


def uncompressed_op(path: Path, side: int) -> Path:
    rgb = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    ds = ophthalmic_photograph(rgb, study_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
                               patient_id="BIG", patient_name="Big^Image")
    ds.save_as(path, enforce_file_format=True)
    return path


def kept_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_instance_larger_than_the_limit_is_refused_and_the_association_carries_on(start_listener, op_file, tmp_path):
    listener, sink = start_listener(max_instance_bytes=8 * MIB)
    big = uncompressed_op(tmp_path / "big.dcm", 2048)  # 12 MiB of pixels
    small = op_file()
    result = send_files(PeerParams("RETINALGPT", "127.0.0.1", listener.port, calling_ae_title="CAMERA1"), [big, small])
    refused, stored = result.instances
    assert (refused.status, refused.failure) == (StoreStatus.OUT_OF_RESOURCES_STORAGE, Failure.TRANSIENT)
    assert refused.message.endswith("exceeds the 8 MiB instance limit")
    assert stored.ok
    assert len(sink.stored) == 1 and "exceeds the 8 MiB instance limit" in sink.rejected[0].reason
    assert kept_files(listener.params.storage_root) == [sink.stored[0][0].path]


def test_deflate_bomb_is_refused_and_nothing_is_kept(start_listener, gib_bomb):
    listener, sink = start_listener(max_instance_bytes=16 * MIB)
    assert raw_store(listener.port, OP_8BIT, DeflatedExplicitVRLittleEndian, gib_bomb) == StoreStatus.OUT_OF_RESOURCES_STORAGE
    assert "inflates past the 16 MiB instance limit" in sink.rejected[0].reason
    assert not sink.stored
    assert kept_files(listener.params.storage_root) == []


def test_reception_aborted_midway_leaves_no_spool_file(start_listener, tmp_path):
    """The data set is spooled to .incoming while it arrives; an abort before its last fragment removes it."""
    listener, sink = start_listener()
    ae = AE(ae_title="CAMERA1")
    ae.add_requested_context(OP_8BIT, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="RETINALGPT", max_pdu=16384)
    assert assoc.is_established
    request = C_STORE()
    request.MessageID, request.Priority = 1, 0
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = OP_8BIT, generate_uid()
    request.DataSet = BytesIO(bytes(4 * MIB))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = message.encode_msg(assoc.accepted_contexts[0].context_id, 16384)
    for _ in range(20):
        assoc.dul.send_pdu(next(fragments))
    incoming = listener.params.storage_root / ".incoming"
    wait_for(lambda: list(incoming.glob("*.part")), 10, "the spool file of the reception in progress", interval=0.05)
    assoc.abort()
    wait_for(lambda: not list(incoming.glob("*.part")), 10, "the spool file to be removed", interval=0.05)
    assert not sink.stored and not sink.rejected


SEND_AND_MEASURE = """
import json, sys
from pathlib import Path
from dicom_node.params import PeerParams
from dicom_node.sender import send_files

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1])

Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
before = status("VmRSS:")
result = send_files(PeerParams("RETINALGPT", "127.0.0.1", int(sys.argv[1]), calling_ae_title="CAMERA1"), sys.argv[2:])
print(json.dumps({"ok": result.ok, "growth_kib": status("VmHWM:") - before}))
"""


def test_sender_streams_files_instead_of_reading_the_study_into_memory(start_listener, tmp_path: Path) -> None:
    listener, sink = start_listener()
    files = []
    for n in range(3):  # 3 × 32 MiB of uncompressed pixels
        rgb = np.full((3344, 3344, 3), 40 * n, dtype=np.uint8)
        ds = ophthalmic_photograph(rgb, study_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
                                   patient_id="P1", patient_name="Big^Study")
        files.append(tmp_path / f"{n}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
        del rgb, ds
    run = subprocess.run([sys.executable, "-c", SEND_AND_MEASURE, str(listener.port), *map(str, files)],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["ok"] and len(sink.stored) == 3
    # pynetdicom queues one instance's PDUs at a time: one 32 MiB file in memory, never the three of them
    assert outcome["growth_kib"] * 1024 < 48 * MIB, f"the sender grew by {outcome['growth_kib'] // 1024} MiB"
