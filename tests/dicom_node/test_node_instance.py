"""Identifying received data sets in every accepted uncompressed encoding, without decoding pixel data."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dicom_node.instance import InvalidInstance, identify, is_valid_uid
from dicom_node.status import StoreStatus

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def _encoded(transfer_syntax: str, pixel_bytes: bytes = b"\x01\x02" * 8) -> tuple[Dataset, bytes]:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = OP_8BIT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "P9"
    ds.SeriesNumber = 3
    ds.ImageLaterality = "L"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 8
    ds.PixelData = pixel_bytes
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    return ds, raw[144 + int.from_bytes(raw[140:144], "little"):]


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                                    ExplicitVRBigEndian])
def test_identify_in_each_encoding(syntax):
    ds, body = _encoded(syntax)
    found = identify(body, syntax, sop_class_uid=OP_8BIT, sop_instance_uid=ds.SOPInstanceUID)
    assert (found.study_instance_uid, found.series_instance_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert (found.patient_name, found.patient_id, found.series_number, found.laterality) == (
        "Müller^Jürgen", "P9", 3, "L")


def test_truncated_native_pixel_data_is_refused():
    ds, body = _encoded(ExplicitVRLittleEndian, b"\x00" * 4000)
    with pytest.raises(InvalidInstance) as caught:
        identify(body[:-100], ExplicitVRLittleEndian, sop_class_uid=OP_8BIT, sop_instance_uid=ds.SOPInstanceUID)
    assert caught.value.status == StoreStatus.PIXEL_DATA_TRUNCATED


def test_image_without_pixel_data_does_not_match_its_sop_class():
    ds, body = _encoded(ExplicitVRLittleEndian)
    cut = body[: body.index(b"\xe0\x7f\x10\x00")]
    with pytest.raises(InvalidInstance) as caught:
        identify(cut, ExplicitVRLittleEndian, sop_class_uid=OP_8BIT, sop_instance_uid=ds.SOPInstanceUID)
    assert caught.value.status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS


@pytest.mark.parametrize(("uid", "valid"), [("1.2.840.10008.1.2", True), ("1.02.3", False), ("../etc", False),
                                            ("1." + "2" * 63, False), ("", False), ("0.1", True),
                                            ("1.2.3\n", False), ("\n1.2.3", False), ("1.2.3 ", False)])
def test_uid_syntax(uid, valid):
    assert is_valid_uid(uid) is valid
