"""Bounded reception (issue 18 item 12): data sets larger than the instance limit, received or inflated, are
refused with 0xA700 and an Error Comment, nothing is kept, and the association carries on."""

from __future__ import annotations

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
