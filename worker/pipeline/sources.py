"""Source images of a study: DICOM instances or plain image files, decoded to RGB for analysis.

An instance is analysable when it is a colour or monochrome photograph of the fundus: Ophthalmic Photography
8/16-bit (PS3.3 A.41) and wide-field OP (A.84), VL Photographic (A.33.8), Secondary Capture (A.8) and
Multi-frame True Colour SC (A.8.5.4). Laterality is Image Laterality (0020,0062), else series Laterality
(0020,0060); the pixel scale is Pixel Spacing (0028,0030) when present (mm → µm).

A plain image file (PNG, JPEG, TIFF) is wrapped into an Ophthalmic Photography 8-bit instance of a synthetic
study (:func:`ophthalmic_photograph`) so every result object can reference a real DICOM source.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from dicom_node.uids import is_valid_uid
from model.schema import Laterality
from reporting.sources import rgb_pixels
from worker.logsetup import remember_dataset

log = logging.getLogger(__name__)

OP_8BIT = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")
OP_16BIT = UID("1.2.840.10008.5.1.4.1.1.77.1.5.2")
WIDE_FIELD_OP = UID("1.2.840.10008.5.1.4.1.1.77.1.5.5")
WIDE_FIELD_OP_3D = UID("1.2.840.10008.5.1.4.1.1.77.1.5.6")
VL_PHOTOGRAPHIC = UID("1.2.840.10008.5.1.4.1.1.77.1.4")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_TRUE_COLOUR_SC = UID("1.2.840.10008.5.1.4.1.1.7.4")

ANALYSABLE_SOP_CLASSES = frozenset(
    {OP_8BIT, OP_16BIT, WIDE_FIELD_OP, WIDE_FIELD_OP_3D, VL_PHOTOGRAPHIC, SECONDARY_CAPTURE, MULTIFRAME_TRUE_COLOUR_SC}
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


class SourceError(ValueError):
    """A source cannot be analysed; the message says which file and why."""


@dataclass
class SourceImage:
    """One analysable image with the DICOM dataset it came from (pixel data included)."""

    dataset: Dataset
    rgb: np.ndarray
    path: Path | None = None
    from_plain_file: bool = False

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.dataset.SeriesInstanceUID)

    @property
    def laterality(self) -> Laterality:
        value = str(self.dataset.get("ImageLaterality", "") or self.dataset.get("Laterality", "")).strip().upper()
        return {"R": Laterality.RIGHT, "L": Laterality.LEFT}.get(value, Laterality.UNKNOWN)

    @property
    def pixel_spacing_um(self) -> float | None:
        spacing = self.dataset.get("PixelSpacing")
        if not spacing:
            return None
        row_mm, col_mm = (float(v) for v in spacing)
        return 1000.0 * (row_mm + col_mm) / 2.0 if row_mm > 0 and col_mm > 0 else None


def is_analysable(dataset: Dataset) -> bool:
    return UID(str(dataset.get("SOPClassUID", ""))) in ANALYSABLE_SOP_CLASSES


def to_rgb8(dataset: Dataset) -> np.ndarray:
    """Decode the first frame to RGB uint8 (:func:`reporting.sources.rgb_pixels`: YBR converted, MONOCHROME1
    inverted against 2^BitsStored − 1, more than 8 bits rescaled, grey stacked)."""
    try:
        pixels = rgb_pixels(dataset)
    except Exception as exc:  # pydicom raises many types for undecodable pixel data
        raise SourceError(f"pixel data cannot be decoded: {exc}") from exc
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise SourceError(f"unexpected pixel array shape {pixels.shape}")
    return pixels


def load_dicom(path: Path) -> SourceImage:
    """Read and decode one DICOM file; :class:`SourceError` when it is not an analysable photograph."""
    try:
        dataset = pydicom.dcmread(path)
    except Exception as exc:
        raise SourceError(f"{path}: not a readable DICOM file ({exc})") from exc
    if not is_analysable(dataset):
        raise SourceError(f"{path}: SOP class {dataset.get('SOPClassUID', '?')} is not a fundus photograph class")
    check_uids(dataset, path)
    remember_dataset(dataset)  # redacted from this process's log lines (worker/logsetup.py)
    try:
        return SourceImage(dataset=dataset, rgb=to_rgb8(dataset), path=path)
    except SourceError as exc:
        raise SourceError(f"{path}: {exc}") from exc


IDENTIFYING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def check_uids(dataset: Dataset, path: Path) -> None:
    """:class:`SourceError` unless the file's Study, Series and SOP Instance UIDs are valid UIDs
    (:func:`dicom_node.uids.is_valid_uid`): they become folder and file names and database keys."""
    for keyword in IDENTIFYING_UIDS:
        value = dataset.get(keyword)
        if not is_valid_uid(value):
            raise SourceError(f"{path}: {keyword} {value!r} is not a valid DICOM UID (PS3.5 §9.1)")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def ophthalmic_photograph(
    rgb: np.ndarray,
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    patient_id: str,
    patient_name: str,
    laterality: Laterality = Laterality.UNKNOWN,
    instance_number: int = 1,
    accession_number: str = "",
    study_description: str = "Fundus photography",
    pixel_spacing_um: float | None = None,
    when: dt.datetime | None = None,
) -> Dataset:
    """An Ophthalmic Photography 8 Bit Image instance (PS3.3 A.41) with the modules ``img2dcm -oph`` writes
    (OP Image, Multi-frame, Ocular Region Imaged, OP Acquisition Parameters, OP Parameters), uncompressed RGB.
    Anatomic Region is the eye (SCT 81745001) and the acquisition device a fundus camera (SCT 409898007)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    when = when or dt.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = OP_8BIT
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = OP_8BIT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.AccessionNumber = accession_number
    ds.Modality = "OP"
    ds.Manufacturer = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.AnatomicRegionSequence = [_code("81745001", "SCT", "Eye")]
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.FrameTime = 0
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    ds.DetectorType = "CCD"
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ImageLaterality = {Laterality.RIGHT: "R", Laterality.LEFT: "L"}.get(laterality, "U")
    ds.SynchronizationFrameOfReferenceUID = generate_uid()
    ds.PatientEyeMovementCommanded = ""
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.HorizontalFieldOfView = None
    ds.PupilDilated = ""
    ds.AcquisitionDeviceTypeCodeSequence = [_code("409898007", "SCT", "Fundus camera")]
    ds.IlluminationTypeCodeSequence = []
    ds.LightPathFilterTypeStackCodeSequence = []
    ds.ImagePathFilterTypeStackCodeSequence = []
    ds.LensesCodeSequence = []
    ds.RefractiveStateSequence = []
    if pixel_spacing_um:
        ds.PixelSpacing = [round(pixel_spacing_um / 1000.0, 8)] * 2
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelData = rgb.tobytes()
    return ds


def load_plain_image(path: Path, *, study_instance_uid: str, series_instance_uid: str, number: int) -> SourceImage:
    """Wrap a plain image file into an OP instance of a synthetic study (laterality unknown)."""
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except Exception as exc:
        raise SourceError(f"{path}: not a readable image ({exc})") from exc
    dataset = ophthalmic_photograph(
        rgb,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        patient_id="ANONYMOUS",
        patient_name="Anonymous",
        instance_number=number,
        study_description=f"Offline analysis of {path.name}",
    )
    return SourceImage(dataset=dataset, rgb=rgb, path=path, from_plain_file=True)


def load_sources(paths: list[Path]) -> list[SourceImage]:
    """Load every file (folders are walked): DICOM files and plain images. Plain images become one synthetic
    study; DICOM files keep their own. Raises :class:`SourceError` naming the first bad file."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise SourceError(f"{path}: no such file or folder")
    if not files:
        raise SourceError("no input files")
    study_uid, series_uid = generate_uid(), generate_uid()
    sources: list[SourceImage] = []
    for number, path in enumerate(files, start=1):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            sources.append(
                load_plain_image(path, study_instance_uid=study_uid, series_instance_uid=series_uid, number=number)
            )
        else:
            sources.append(load_dicom(path))
    return sources
