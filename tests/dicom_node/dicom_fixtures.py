"""DICOM test tools shared by tests/dicom_node and tests/worker: OP files made with dcmtk's ``img2dcm -oph``
from a real fundus photograph, dcmtk by absolute path with TCP_NODELAY=1, TLS certificates from openssl,
and raw C-STORE requests for malformed input."""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import generate_uid

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
IMG2DCM = "/usr/bin/img2dcm"
OPENSSL = "/usr/bin/openssl"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

_OP_KEYS = [
    "AcquisitionDeviceTypeCodeSequence[0].CodeValue=409899009",
    "AcquisitionDeviceTypeCodeSequence[0].CodingSchemeDesignator=SCT",
    "AcquisitionDeviceTypeCodeSequence[0].CodeMeaning=Fundus camera",
]


def write_jpeg(rgb, path: Path, quality: int = 90) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path, quality=quality)
    return path


def make_op(
    jpeg: Path,
    out: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    laterality: str = "R",
    patient_id: str = "PAT001",
    accession: str = "ACC001",
) -> Path:
    """An Ophthalmic Photography 8 Bit image (JPEG Baseline) made by ``img2dcm -oph``."""
    keys = [
        f"ImageLaterality={laterality}", f"PatientID={patient_id}", "PatientName=Doe^Jane",
        f"AccessionNumber={accession}", "StudyDate=20260101",
        f"StudyInstanceUID={study_uid or generate_uid()}", f"SeriesInstanceUID={series_uid or generate_uid()}",
        *_OP_KEYS,
    ]
    args = [IMG2DCM, "-oph"]
    for key in keys:
        args += ["-k", key]
    subprocess.run([*args, str(jpeg), str(out)], check=True, capture_output=True)
    return out


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file, without preamble and File Meta Information."""
    raw = path.read_bytes()
    meta_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) value after preamble, DICM, tag, VR, length
    return raw[144 + meta_length :]


def storescu(port: int, files: list[Path], *, calling: str = "CAMERA1", called: str = "RETINALGPT",
             extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """Send files with dcmtk, proposing JPEG Baseline (``-xy``) for compressed files."""
    args = [STORESCU, "-xy", "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port)]
    return subprocess.run([*args, *map(str, files)], env=DCMTK_ENV, capture_output=True, text=True, timeout=120,
                          check=False)


def echoscu(port: int, *, calling: str = "CAMERA1", called: str = "RETINALGPT",
            extra: list[str] | None = None) -> subprocess.CompletedProcess:
    args = [ECHOSCU, "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port)]
    return subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=60, check=False)


@dataclass
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(folder: Path) -> Certificates:
    """A CA and a server (SAN IP 127.0.0.1, localhost) and client certificate signed by it."""

    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=Test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key",
                        folder / "client.pem", folder / "client.key")


def raw_store(port: int, sop_class_uid: str, transfer_syntax: str, file_path: Path,
              calling: str = "CAMERA1") -> int | None:
    """Send a file's bytes unchanged (no decoding, so malformed content reaches the SCP) and return the status.

    Uses pynetdicom's chunked send, which takes the SOP class/instance from the File Meta Information and
    the data set bytes as they are in the file."""
    from pynetdicom import AE, _config

    ae = AE(ae_title=calling)
    ae.add_requested_context(sop_class_uid, [transfer_syntax])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="RETINALGPT")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(file_path)
            return int(status.Status) if "Status" in status else None
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


@dataclass
class MemorySink:
    """An :class:`dicom_node.events.IngestSink` that remembers what it was told."""

    stored: list = field(default_factory=list)
    duplicates: list = field(default_factory=list)
    conflicts: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    rejected_associations: list = field(default_factory=list)
    ended: list = field(default_factory=list)
    stable: list = field(default_factory=list)
    pending: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def instance_stored(self, instance, *, replaced):
        with self.lock:
            self.stored.append((instance, replaced))

    def placement(self, instance):
        from dicom_node.events import Placement, PlacementKind

        with self.lock:
            for stored, _ in self.stored:
                if stored.sop_instance_uid == instance.sop_instance_uid:
                    same = (stored.study_instance_uid, stored.series_instance_uid) == (
                        instance.study_instance_uid, instance.series_instance_uid)
                    return Placement(PlacementKind.DUPLICATE if same else PlacementKind.CONFLICT, "elsewhere")
            return Placement(PlacementKind.NEW)

    def duplicate_ignored(self, instance):
        with self.lock:
            self.duplicates.append(instance)

    def uid_conflict(self, instance, reason):
        with self.lock:
            self.conflicts.append((instance, reason))

    def instance_rejected(self, rejection):
        with self.lock:
            self.rejected.append(rejection)

    def association_rejected(self, rejection):
        with self.lock:
            self.rejected_associations.append(rejection)

    def association_ended(self, summary):
        with self.lock:
            self.ended.append(summary)

    def pending_studies(self):
        return list(self.pending)

    def study_stable(self, study_uid):
        with self.lock:
            self.stable.append(study_uid)


def deflate_bomb(path: Path, inflated_bytes: int) -> Path:
    """A valid Deflated Explicit VR Little Endian OP instance (PS3.5 A.5) whose Pixel Data is
    ``inflated_bytes`` zeros: about a thousandth of that on the wire, all of it once inflated."""
    import struct
    import zlib
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    side = int((inflated_bytes // 3) ** 0.5)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BOMB"
    ds.Modality = "OP"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    head = DicomBytesIO()
    head.is_implicit_VR, head.is_little_endian = False, True
    write_dataset(head, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [deflater.compress(head.getvalue() + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", inflated_bytes))]
    zeros = bytes(1 << 24)
    left = inflated_bytes
    while left:
        step = min(left, len(zeros))
        body.append(deflater.compress(zeros[:step]))
        left -= step
    body.append(deflater.flush())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with open(path, "wb") as out:
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, meta)
        out.writelines(body)
    return path
