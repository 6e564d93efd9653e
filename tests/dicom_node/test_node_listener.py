"""The storage SCP against dcmtk's echoscu/storescu: AE policy, durable storage, bad input, TLS."""

from __future__ import annotations

import hashlib
import threading

import pytest
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicom_node.events import Placement, PlacementKind
from dicom_node.params import CallerRule, DuplicatePolicy, PeerParams, TlsParams, UnsupportedSopPolicy
from dicom_node.sender import Failure, send_files
from dicom_node.status import StoreStatus
from tests.dicom_node.dicom_fixtures import dataset_bytes, echoscu, make_certificates, raw_store, storescu

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OP_16BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.2"


def test_echo_from_allowed_caller_is_accepted(start_listener):
    listener, sink = start_listener()
    result = echoscu(listener.port)
    assert result.returncode == 0, result.stderr
    assert not sink.rejected_associations


@pytest.mark.parametrize(
    ("calling", "called", "rules", "reason"),
    [
        ("INTRUDER", "RETINALGPT", None, "not in the allow-list"),
        ("CAMERA1", "WRONGAE", None, "called AE title"),
        ("CAMERA1", "RETINALGPT", (CallerRule("CAMERA1", "10.9.8.7"),), "not allowed from host 127.0.0.1"),
    ],
)
def test_unknown_callers_and_wrong_called_ae_are_rejected_at_association(start_listener, calling, called, rules,
                                                                         reason):
    overrides = {"allowed_callers": rules} if rules else {}
    listener, sink = start_listener(**overrides)
    result = echoscu(listener.port, calling=calling, called=called)
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr
    assert len(sink.rejected_associations) == 1
    assert reason in sink.rejected_associations[0].reason
    assert echoscu(listener.port).returncode == (0 if rules is None else 1)


def test_op_image_is_stored_exactly_as_sent(start_listener, op_file):
    listener, sink = start_listener()
    sent = op_file(study_uid="1.2.826.0.1.3680043.8.498.1", series_uid="1.2.826.0.1.3680043.8.498.2")
    result = storescu(listener.port, [sent])
    assert result.returncode == 0, result.stderr
    assert len(sink.stored) == 1
    instance, replaced = sink.stored[0]
    source = dcmread(sent)
    assert not replaced
    assert instance.path == listener.params.storage_root / "1.2.826.0.1.3680043.8.498.1" / \
        "1.2.826.0.1.3680043.8.498.2" / f"{source.SOPInstanceUID}.dcm"
    assert dataset_bytes(instance.path) == dataset_bytes(sent)
    stored = dcmread(instance.path)
    assert stored.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert stored.file_meta.SourceApplicationEntityTitle == "CAMERA1"
    assert instance.transfer_syntax_uid == JPEGBaseline8Bit
    assert instance.sha256 == hashlib.sha256(instance.path.read_bytes()).hexdigest()
    assert instance.size == instance.path.stat().st_size
    assert (instance.sop_class_uid, instance.analysable, instance.laterality) == (OP_8BIT, True, "R")
    assert (instance.patient_id, instance.accession_number, instance.calling_ae_title, instance.peer_host) == (
        "PAT001", "ACC001", "CAMERA1", "127.0.0.1")
    assert not list((listener.params.storage_root / ".incoming").iterdir())
    assert sink.ended[-1].stored == 1 and sink.ended[-1].studies == ("1.2.826.0.1.3680043.8.498.1",)


def test_concurrent_associations_all_stored(start_listener, op_file):
    listener, sink = start_listener()
    batches = [[op_file(f"c{b}_{i}.dcm") for i in range(3)] for b in range(4)]
    results = [None] * len(batches)

    def send(index):
        results[index] = storescu(listener.port, batches[index])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len(sink.stored) == 12
    assert len({i.path for i, _ in sink.stored}) == 12
    assert all(i.path.is_file() for i, _ in sink.stored)


def test_malformed_input_gets_failure_status_and_node_carries_on(start_listener, op_file, tmp_path):
    listener, sink = start_listener()
    good = op_file("good.dcm")
    ds = dcmread(good)

    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-5000])

    no_uid = ds.copy()
    del no_uid.StudyInstanceUID
    no_uid_path = tmp_path / "no_study_uid.dcm"
    no_uid.save_as(no_uid_path, enforce_file_format=True)

    raw = good.read_bytes()
    body = 144 + int.from_bytes(raw[140:144], "little")  # data set starts after the File Meta Information
    wrong_class_path = tmp_path / "wrong_class.dcm"  # OP 16 bit in the data set, OP 8 bit in meta and request
    wrong_class_path.write_bytes(raw[:body] + raw[body:].replace(OP_8BIT.encode(), OP_16BIT.encode(), 1))

    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(raw[:body] + b"\x08\x00\x16\x00UI\xff\x7f0123456789")  # value cut short

    statuses = {
        name: raw_store(listener.port, OP_8BIT, JPEGBaseline8Bit, path)
        for name, path in [("truncated", truncated), ("missing study uid", no_uid_path),
                           ("wrong sop class", wrong_class_path), ("garbage", garbage)]
    }
    assert statuses == {
        "truncated": StoreStatus.PIXEL_DATA_TRUNCATED,
        "missing study uid": StoreStatus.MISSING_IDENTIFIER,
        "wrong sop class": StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        "garbage": StoreStatus.CANNOT_UNDERSTAND,
    }
    assert len(sink.rejected) == 4
    assert not sink.stored
    result = storescu(listener.port, [good])
    assert result.returncode == 0, result.stderr
    assert [i.sop_instance_uid for i, _ in sink.stored] == [ds.SOPInstanceUID]
    assert not list((listener.params.storage_root / ".incoming").iterdir())


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_uid_with_a_trailing_newline_is_refused(start_listener, op_file, tmp_path, keyword):
    """``re.match`` with ``$`` let "1.2.3\\n" through: the UID must match whole (issue 19), or the newline ends up
    in database keys and folder names while the SR carries the UID without it."""
    listener, sink = start_listener()
    ds = dcmread(op_file("good.dcm"))
    uid = generate_uid()
    while len(uid) % 2 == 0:  # odd length: the value is padded to even length, the pad byte becomes the newline
        uid = generate_uid()
    setattr(ds, keyword, uid)
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = uid
    hostile = tmp_path / "newline.dcm"
    ds.save_as(hostile, enforce_file_format=True)
    raw = hostile.read_bytes()
    assert uid.encode() + b"\x00" in raw
    hostile.write_bytes(raw.replace(uid.encode() + b"\x00", uid.encode() + b"\n"))
    assert raw_store(listener.port, OP_8BIT, JPEGBaseline8Bit, hostile) == StoreStatus.INVALID_IDENTIFIER
    assert not sink.stored and len(sink.rejected) == 1


def _ct_image(path, tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x00\x01" * 16
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_unsupported_sop_class_stored_not_analysed_or_refused_by_policy(start_listener, tmp_path):
    ct = _ct_image(tmp_path / "ct.dcm", tmp_path)
    storing, sink = start_listener()
    assert storescu(storing.port, [ct]).returncode == 0
    assert sink.stored[0][0].analysable is False

    refusing, refused_sink = start_listener(unsupported_sop_classes=UnsupportedSopPolicy.REJECT,
                                            storage_root=tmp_path / "other")
    result = storescu(refusing.port, [ct])
    assert result.returncode != 0
    assert "no presentation context" in result.stderr.lower()
    assert not refused_sink.stored


@pytest.mark.parametrize("policy", list(DuplicatePolicy))
def test_duplicate_sop_instance_policy(start_listener, op_file, tmp_path, policy):
    listener, sink = start_listener(duplicate_policy=policy)
    first = op_file("first.dcm")
    assert storescu(listener.port, [first]).returncode == 0
    second = dcmread(first)
    second.PatientID = "CHANGED"
    second_path = tmp_path / "second.dcm"
    second.save_as(second_path)
    assert storescu(listener.port, [second_path]).returncode == 0
    stored = dcmread(sink.stored[0][0].path)
    if policy is DuplicatePolicy.KEEP_FIRST:
        assert stored.PatientID == "PAT001"
        assert len(sink.stored) == 1 and len(sink.duplicates) == 1
    else:
        assert stored.PatientID == "CHANGED"
        assert [replaced for _, replaced in sink.stored] == [False, True]


def test_sink_failure_answers_out_of_resources_and_keeps_no_file(start_listener, op_file):
    class FailingSink:
        def __getattr__(self, name):
            return lambda *a, **k: [] if name == "pending_studies" else None

        def placement(self, instance):
            return Placement(PlacementKind.NEW)

        def instance_stored(self, instance, *, replaced):
            raise RuntimeError("database down")

    listener, _ = start_listener(sink=FailingSink())
    result = send_files(PeerParams("RETINALGPT", "127.0.0.1", listener.port, calling_ae_title="CAMERA1"), [op_file()])
    assert [(r.status, r.failure) for r in result.instances] == [(StoreStatus.OUT_OF_RESOURCES_DATABASE,
                                                                  Failure.TRANSIENT)]
    assert not [p for p in listener.params.storage_root.rglob("*.dcm")]


@pytest.mark.parametrize("client_certificate", [False, True])
def test_tls_with_storescu(start_listener, op_file, tmp_path, client_certificate):
    certs = make_certificates(tmp_path)
    tls = TlsParams(certs.server_cert, certs.server_key, certs.ca, require_peer_certificate=client_certificate)
    listener, sink = start_listener(tls=tls)
    if client_certificate:
        extra = ["+tls", str(certs.client_key), str(certs.client_cert), "+cf", str(certs.ca)]
    else:
        extra = ["+tla", "+cf", str(certs.ca)]
    result = storescu(listener.port, [op_file()], extra=extra)
    assert result.returncode == 0, result.stderr
    assert len(sink.stored) == 1
    plain = storescu(listener.port, [op_file("plain.dcm")])
    assert plain.returncode != 0
    assert len(sink.stored) == 1


def test_file_left_without_a_record_is_not_taken_for_a_duplicate(start_listener, op_file):
    """A crash between rename and recording leaves a file nobody recorded: the resend must be recorded."""
    listener, sink = start_listener()
    sent = op_file()
    ds = dcmread(sent)
    orphan = listener.store.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"partial")
    assert storescu(listener.port, [sent]).returncode == 0
    assert [(i.sop_instance_uid, replaced) for i, replaced in sink.stored] == [(ds.SOPInstanceUID, False)]
    assert dataset_bytes(orphan) == dataset_bytes(sent)
    assert not sink.duplicates


@pytest.mark.parametrize(
    ("file_syntax", "storescu_option", "stored_syntax"),
    [
        (ExplicitVRLittleEndian, "-xi", ImplicitVRLittleEndian),
        (ExplicitVRLittleEndian, "-xd", DeflatedExplicitVRLittleEndian),
        (RLELossless, "-xr", RLELossless),
        (JPEGLSLossless, "-xt", JPEGLSLossless),
        (JPEG2000Lossless, "-xv", JPEG2000Lossless),
    ],
)
def test_transfer_syntaxes_accepted_and_kept(start_listener, op_file, tmp_path, file_syntax, storescu_option,
                                             stored_syntax):
    """storescu negotiates the syntax (transcoding uncompressed data itself); the node stores what arrived."""
    source = dcmread(op_file())
    source.decompress(generate_instance_uid=False)
    if file_syntax != ExplicitVRLittleEndian:  # GDCM's RLE encoder aborts the process on this image: name ours
        plugin = {RLELossless: "pydicom", JPEGLSLossless: "pyjpegls", JPEG2000Lossless: "pylibjpeg"}[file_syntax]
        source.compress(file_syntax, generate_instance_uid=False, encoding_plugin=plugin)
    path = tmp_path / "encoded.dcm"
    source.save_as(path, enforce_file_format=True)
    listener, sink = start_listener()
    result = storescu(listener.port, [path], extra=[storescu_option])
    assert result.returncode == 0, result.stderr
    stored = dcmread(sink.stored[0][0].path)
    assert stored.file_meta.TransferSyntaxUID == stored_syntax
    assert sink.stored[0][0].transfer_syntax_uid == stored_syntax
    assert (stored.pixel_array == dcmread(path).pixel_array).all()


def test_start_removes_temp_files_of_interrupted_receptions(start_listener, tmp_path):
    incoming = tmp_path / "studies" / ".incoming"
    incoming.mkdir(parents=True)
    (incoming / "0123.part").write_bytes(b"half an image")
    start_listener()
    assert list(incoming.iterdir()) == []
