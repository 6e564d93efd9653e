"""Inspect a received C-STORE data set without decoding its pixel data.

Reads the identifying attributes (PS3.3 C.12.1 SOP Common, C.7.2.1 General Study, C.7.3.1 General Series)
from the encoded bytes and checks that the data set can be read, carries the UIDs we file it under, matches
the SOP class and instance of the request (PS3.7 §9.1.1), and that an image's Pixel Data is complete.
"""

from __future__ import annotations

import mmap
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.charset import python_encoding
from pydicom.filereader import data_element_generator
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom_node.sop import SR_SOP_CLASSES
from dicom_node.status import StoreStatus
from dicom_node.uids import is_valid_uid

_PIXEL_DATA_LE = b"\xe0\x7f\x10\x00"
_SEQUENCE_DELIMITER_LE = b"\xfe\xff\xdd\xe0"
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"UC", b"UR", b"SQ", b"SV", b"UV"}
_PIXEL_DATA_TAG = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF
_IDENTIFYING = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName",
    "AccessionNumber", "StudyDate", "StudyDescription", "Modality", "SeriesNumber", "SeriesDescription",
    "InstanceNumber", "ImageLaterality", "Laterality", "SpecificCharacterSet", "ImageType", "BurnedInAnnotation",
    "Manufacturer",
)
_TAG_OF = {keyword: int(Tag(keyword)) for keyword in _IDENTIFYING}
_IDENTIFYING_TAGS = frozenset(_TAG_OF.values())
_DEFER_BYTES = 64 * 1024  # larger values are not read: none of the identifying attributes is that long
_INFLATE_STEP = 1 << 20

Buffer = bytes | bytearray | mmap.mmap


class InvalidInstance(Exception):
    """The data set cannot be accepted; ``status`` is the C-STORE failure status to answer."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identified:
    """The attributes of a received instance that the node files and records it by."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_number: int | None
    laterality: str | None
    image_type: tuple[str, ...] = ()
    burned_in_annotation: str | None = None
    manufacturer: str | None = None

    @property
    def derived(self) -> bool:
        """A derived image: Image Type value 1 DERIVED (PS3.3 C.7.6.1.1.2) or Burned In Annotation YES
        (C.7.6.3.1.6) — a processed or annotated picture, such as a key image, not a photograph to analyse."""
        return self.image_type[:1] == ("DERIVED",) or self.burned_in_annotation == "YES"


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str) -> bytes:
    """The 128-byte preamble, ``DICM`` prefix and File Meta Information (PS3.10 §7.1), encoded directly in
    Explicit VR Little Endian (this runs once per received instance), naming the sender as Source
    Application Entity Title."""
    elements = b"".join((
        b"\x02\x00\x01\x00OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01",
        _short_element(0x0002, "UI", sop_class_uid.encode(), b"\x00"),
        _short_element(0x0003, "UI", sop_instance_uid.encode(), b"\x00"),
        _short_element(0x0010, "UI", transfer_syntax_uid.encode(), b"\x00"),
        _short_element(0x0012, "UI", PYNETDICOM_IMPLEMENTATION_UID.encode(), b"\x00"),
        _short_element(0x0013, "SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode(), b" "),
        _short_element(0x0016, "AE", source_ae_title.encode("ascii", "replace"), b" "),
    ))
    group_length = b"\x02\x00\x00\x00UL" + struct.pack("<HI", 4, len(elements))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def _short_element(element: int, vr: str, value: bytes, padding: bytes) -> bytes:
    if len(value) % 2:
        value += padding
    return struct.pack("<HH", 0x0002, element) + vr.encode() + struct.pack("<H", len(value)) + value


def identify(
    dataset: Buffer,
    transfer_syntax_uid: str,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    offset: int = 0,
    max_inflated: int | None = None,
    scratch: Path | None = None,
) -> Identified:
    """Read and check the identifying attributes of the data set in ``dataset[offset:]`` (encoded in
    ``transfer_syntax_uid``; bytes or an ``mmap`` of the received file); raise :class:`InvalidInstance` when
    it cannot be accepted.

    Only the top-level element headers up to Pixel Data are walked (pydicom's raw element generator) and
    only the identifying values are read, so the cost does not grow with the image. A Deflated Explicit VR
    Little Endian data set (PS3.5 A.5) is inflated in bounded steps into a temp file in ``scratch``; one that
    inflates past ``max_inflated`` bytes (a deflate bomb) is refused with 0xA700 before it can fill memory."""
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        with _inflated(dataset, offset, max_inflated, scratch) as body:
            return _identify(body, 0, ExplicitVRLittleEndian, sop_class_uid, sop_instance_uid)
    return _identify(dataset, offset, transfer_syntax_uid, sop_class_uid, sop_instance_uid)


@contextmanager
def _inflated(dataset: Buffer, offset: int, limit: int | None, scratch: Path | None) -> Iterator[Buffer]:
    """The raw-deflated bytes of ``dataset[offset:]`` inflated into a temp file, mapped read-only."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    source = memoryview(dataset)
    total = 0
    with tempfile.TemporaryFile(dir=scratch) as out:
        try:
            for start in range(offset, len(source), _INFLATE_STEP):
                pending = source[start : start + _INFLATE_STEP]
                while pending and not inflater.eof:  # bytes after the end of the stream are padding
                    chunk = inflater.decompress(pending, _INFLATE_STEP)
                    pending = inflater.unconsumed_tail
                    total += len(chunk)
                    if limit is not None and total > limit:
                        raise InvalidInstance(
                            StoreStatus.OUT_OF_RESOURCES_STORAGE,
                            f"deflated data set inflates past the {_mib(limit)} instance limit",
                        )
                    out.write(chunk)
            out.write(inflater.flush())
        except zlib.error as exc:
            raise InvalidInstance(StoreStatus.CANNOT_UNDERSTAND, f"unreadable data set: {exc}") from None
        finally:
            source.release()
        out.flush()
        if out.tell() == 0:
            yield b""
            return
        with mmap.mmap(out.fileno(), 0, access=mmap.ACCESS_READ) as body:
            yield body


def _identify(body: Buffer, start: int, transfer_syntax_uid: str, sop_class_uid: str,
              sop_instance_uid: str) -> Identified:
    implicit = transfer_syntax_uid == ImplicitVRLittleEndian
    little = transfer_syntax_uid != ExplicitVRBigEndian
    size = len(body)
    try:
        stream = body if isinstance(body, mmap.mmap) else BytesIO(body)
        stream.seek(start)
        raw: dict[int, bytes] = {}
        for element in data_element_generator(stream, implicit, little, stop_when=_at_pixel_data,
                                              defer_size=_DEFER_BYTES):
            if element.value is None and element.length not in (0, _UNDEFINED_LENGTH):
                if element.value_tell + element.length > size:  # deferred: not read, so check it fits
                    raise ValueError(f"element {element.tag} is cut short: {size - element.value_tell} of "
                                     f"{element.length} bytes")
            elif element.length != _UNDEFINED_LENGTH and len(element.value or b"") != element.length:
                raise ValueError(f"element {element.tag} is cut short: {len(element.value or b'')} of "
                                 f"{element.length} bytes")
            if element.tag in _IDENTIFYING_TAGS:
                raw[int(element.tag)] = element.value or b""
        stop = stream.tell()
        attributes = _decode(raw)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed input
        raise InvalidInstance(StoreStatus.CANNOT_UNDERSTAND, f"unreadable data set: {exc}") from None
    values = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = attributes[keyword]
        if not value:
            raise InvalidInstance(StoreStatus.MISSING_IDENTIFIER, f"data set has no {keyword}")
        if not is_valid_uid(value):
            raise InvalidInstance(StoreStatus.INVALID_IDENTIFIER, f"{keyword} {value!r} is not a valid UID")
        values[keyword] = value
    if values["SOPClassUID"] != sop_class_uid:
        raise InvalidInstance(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"data set SOP Class UID {values['SOPClassUID']} differs from the request's {sop_class_uid}",
        )
    if values["SOPInstanceUID"] != sop_instance_uid:
        raise InvalidInstance(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"data set SOP Instance UID {values['SOPInstanceUID']} differs from the request's {sop_instance_uid}",
        )
    if sop_class_uid not in SR_SOP_CLASSES and little:
        _check_pixel_data(body, stop, implicit=implicit)
    return Identified(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        patient_id=attributes["PatientID"],
        patient_name=attributes["PatientName"],
        accession_number=attributes["AccessionNumber"],
        study_date=attributes["StudyDate"],
        study_description=attributes["StudyDescription"],
        modality=attributes["Modality"],
        series_number=_int(attributes["SeriesNumber"]),
        series_description=attributes["SeriesDescription"],
        instance_number=_int(attributes["InstanceNumber"]),
        laterality=attributes["ImageLaterality"] or attributes["Laterality"],
        image_type=tuple(v.strip().upper() for v in (attributes["ImageType"] or "").split("\\") if v.strip()),
        burned_in_annotation=(attributes["BurnedInAnnotation"] or "").upper() or None,
        manufacturer=attributes["Manufacturer"],
    )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


def _decode(raw: dict[int, bytes]) -> dict[str, str | None]:
    """Decode the identifying values: text in the data set's first Specific Character Set (PS3.5 §6.1.2.3,
    ISO-IR 6 when absent), with padding removed; ``None`` when absent or empty."""
    charset = raw.get(_TAG_OF["SpecificCharacterSet"], b"").decode("ascii", "replace").split("\\")[0].strip()
    encoding = python_encoding.get(charset, "latin-1") if charset else "latin-1"
    decoded: dict[str, str | None] = {}
    for keyword, tag in _TAG_OF.items():
        value = raw.get(tag)
        text = value.decode(encoding, "replace").strip(" \x00") if value else ""
        decoded[keyword] = text or None
    return decoded


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag == _PIXEL_DATA_TAG


def _check_pixel_data(dataset: Buffer, offset: int, *, implicit: bool) -> None:
    """Pixel Data (7FE0,0010) must be present where parsing stopped, and complete: its defined length fits
    in what was received, or its encapsulated fragments end with a Sequence Delimitation Item (PS3.5 A.4)."""
    if dataset[offset : offset + 4] != _PIXEL_DATA_LE:
        raise InvalidInstance(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "image data set has no Pixel Data")
    try:
        if implicit:
            (length,) = struct.unpack_from("<I", dataset, offset + 4)
            start = offset + 8
        elif dataset[offset + 4 : offset + 6] in _LONG_VRS:
            (length,) = struct.unpack_from("<I", dataset, offset + 8)
            start = offset + 12
        else:
            raise InvalidInstance(StoreStatus.CANNOT_UNDERSTAND, "Pixel Data has an impossible value representation")
    except struct.error:
        raise InvalidInstance(StoreStatus.PIXEL_DATA_TRUNCATED, "Pixel Data is truncated in its header") from None
    if length == 0xFFFFFFFF:
        if dataset.rfind(_SEQUENCE_DELIMITER_LE, start) < 0:
            raise InvalidInstance(StoreStatus.PIXEL_DATA_TRUNCATED, "encapsulated Pixel Data is truncated")
    elif start + length > len(dataset):
        raise InvalidInstance(
            StoreStatus.PIXEL_DATA_TRUNCATED,
            f"Pixel Data is truncated: {len(dataset) - start} of {length} bytes received",
        )


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None
