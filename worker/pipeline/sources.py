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
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.pixels import convert_color_space, pixel_array
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    generate_uid,
)

from dicom_node.uids import is_valid_uid
from model.schema import Laterality
from reporting.sources import frame_rgb8, rgb_pixels
from worker.config import Settings
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
_DCT_SCALABLE = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})
_DEFER_SIZE = "256 KB"


class SourceError(ValueError):
    """A source cannot be analysed; the message says which file and why."""


@dataclass
class SourceImage:
    """One analysable image with the DICOM dataset it came from (pixel data included)."""

    dataset: Dataset
    rgb: np.ndarray
    path: Path | None = None
    from_plain_file: bool = False
    original_size: tuple[int, int] | None = None
    """(rows, columns) of the stored image when ``rgb`` was reduced at decode; None when ``rgb`` is full size."""

    @property
    def scale(self) -> float:
        """Decoded size over stored size (1.0 unless the image was reduced at decode)."""
        if self.original_size is None:
            return 1.0
        return max(self.rgb.shape[:2]) / max(self.original_size)

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
        """µm per pixel of ``rgb`` (Pixel Spacing of the stored image, divided by :attr:`scale`)."""
        spacing = self.dataset.get("PixelSpacing")
        if not spacing:
            return None
        row_mm, col_mm = (float(v) for v in spacing)
        return 1000.0 * (row_mm + col_mm) / 2.0 / self.scale if row_mm > 0 and col_mm > 0 else None


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


@dataclass(frozen=True)
class DecodeLimits:
    """How much of an image is decoded: at most ``max_pixels`` (Rows × Columns of the frame) are accepted at all,
    and the decoded frame is reduced at decode to at most ``max_side`` pixels on its longer side."""

    max_pixels: int
    max_side: int


def decode_limits(settings: Settings) -> DecodeLimits:
    """``analysis.max_image_pixels`` and ``analysis.decode_size`` as decode limits."""
    return DecodeLimits(settings.analysis.max_image_pixels, settings.analysis.decode_size)


class ImageTooLarge(SourceError):
    """The image has more pixels than the configured limit; it is not decoded at all."""


def check_size(dataset: Dataset, max_pixels: int) -> tuple[int, int]:
    """(rows, columns) of the image; :class:`ImageTooLarge` when Rows × Columns exceeds ``max_pixels``."""
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    if rows * columns > max_pixels:
        raise ImageTooLarge(
            f"image too large: {columns} × {rows} = {rows * columns / 1e6:.1f} megapixels, more than the "
            f"{max_pixels / 1e6:g} megapixels analysis.max_image_pixels allows; not analysed"
        )
    return rows, columns


def decode_first_frame(path: Path, dataset: Dataset, max_side: int) -> np.ndarray:
    """The first frame of the instance at ``path`` (``dataset``: its metadata, Pixel Data deferred) as RGB
    uint8, reduced at decode to at most ``max_side`` pixels on its longer side.

    Only the first frame is read and decoded (``pydicom.pixels.pixel_array(..., index=0)``). JPEG Baseline
    frames are decoded directly at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (Pillow ``draft``), so a
    large JPEG never exists in memory at full size; other encodings are decoded at full size and reduced by
    an integer box filter."""
    syntax = str(dataset.file_meta.get("TransferSyntaxUID", ""))
    try:
        if syntax in _DCT_SCALABLE and int(dataset.get("BitsAllocated", 8)) == 8:
            rgb = _decode_jpeg_reduced(dataset, max_side)
        else:
            rgb = frame_rgb8(pixel_array(path, index=0), dataset)
    except SourceError:
        raise
    except Exception as exc:  # pydicom and the decoders raise many types for undecodable pixel data
        raise SourceError(f"pixel data cannot be decoded: {exc}") from exc
    factor = -(-max(rgb.shape[:2]) // max_side)
    if factor > 1:
        rgb = np.asarray(Image.fromarray(rgb).reduce(factor))
    return np.ascontiguousarray(rgb)


def _decode_jpeg_reduced(dataset: Dataset, max_side: int) -> np.ndarray:
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    frame = get_frame(dataset.PixelData, 0, number_of_frames=frames)
    samples = int(dataset.get("SamplesPerPixel", 1))
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    with Image.open(BytesIO(frame), formats=("JPEG",)) as image:
        scale = max(image.size) / max_side
        target = (max(1, int(image.size[0] / scale)), max(1, int(image.size[1] / scale))) if scale > 1 else image.size
        if samples == 1:
            image.draft("L", target)
            return frame_rgb8(np.asarray(image), dataset)
        if "adobe_transform" in image.info:  # the JPEG says how its colours are stored: Pillow converts
            image.draft("RGB", target)
            return np.asarray(image.convert("RGB"))
        image.draft("YCbCr", target)  # as pydicom: no colour transformation by the decoder
        pixels = np.asarray(image)
    if photometric.startswith("YBR"):
        pixels = convert_color_space(pixels, "YBR_FULL", "RGB")
    return pixels


def load_dicom(path: Path, limits: DecodeLimits) -> SourceImage:
    """Read one DICOM file and decode its first frame within ``limits``; :class:`SourceError` when it is not an
    analysable photograph, :class:`ImageTooLarge` (before any decoding) when it has too many pixels.

    The data set is read with Pixel Data deferred: it stays on disk unless a report builder asks for it."""
    try:
        dataset = pydicom.dcmread(path, defer_size=_DEFER_SIZE)
    except Exception as exc:
        raise SourceError(f"{path}: not a readable DICOM file ({exc})") from exc
    if not is_analysable(dataset):
        raise SourceError(f"{path}: SOP class {dataset.get('SOPClassUID', '?')} is not a fundus photograph class")
    check_uids(dataset, path)
    remember_dataset(dataset)  # redacted from this process's log lines (worker/logsetup.py)
    try:
        rows, columns = check_size(dataset, limits.max_pixels)
        rgb = decode_first_frame(path, dataset, limits.max_side)
    except SourceError as exc:
        raise type(exc)(f"{path}: {exc}") from exc
    return SourceImage(dataset=dataset, rgb=rgb, path=path, original_size=(rows, columns))


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


def load_plain_image(path: Path, *, study_instance_uid: str, series_instance_uid: str, number: int,
                     max_pixels: int) -> SourceImage:
    """Wrap a plain image file into an OP instance of a synthetic study (laterality unknown); an image with more
    than ``max_pixels`` pixels is refused before it is decoded."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:
                raise ImageTooLarge(f"{path}: image too large: {img.width} × {img.height} = "
                                    f"{img.width * img.height / 1e6:.1f} megapixels, more than the "
                                    f"{max_pixels / 1e6:g} megapixels analysis.max_image_pixels allows")
            rgb = np.asarray(img.convert("RGB"))
    except ImageTooLarge:
        raise
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


def load_sources(paths: list[Path], limits: DecodeLimits) -> list[SourceImage]:
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
                load_plain_image(path, study_instance_uid=study_uid, series_instance_uid=series_uid, number=number,
                                 max_pixels=limits.max_pixels)
            )
        else:
            sources.append(load_dicom(path, limits))
    return sources
