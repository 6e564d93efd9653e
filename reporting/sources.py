"""Source instances, result identities and deterministic UIDs shared by every result object."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from copy import deepcopy

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from model.schema import ImageAnalysis, ModelIdentity, StudyAnalysis

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
WIDE_FIELD_OP = ("1.2.840.10008.5.1.4.1.1.77.1.5.5", "1.2.840.10008.5.1.4.1.1.77.1.5.6")
"""Wide Field Ophthalmic Photography Stereographic Projection / 3D Coordinates Image Storage (PS3.4 B.5)."""
_UID_NAMESPACE = uuid.UUID("5d0b3e1e-2c8a-4c55-9a4e-2f1f5a0b7c11")
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_BULK_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}

FALLBACK_ALGORITHM = ModelIdentity(
    name="RetinalGPT Worker result builder",
    version="1",
    device_uid="2.25.300377012125312040345383592829496014349",
)
"""Identity used when an analysis names neither the model nor the pipeline."""


def uid(*parts: object) -> str:
    """A deterministic UID (2.25 form) from ``parts``: re-building the same result gives the same UIDs, so
    a receiver that already holds an object recognises a re-send instead of filing a duplicate."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(str(p) for p in parts)).int}"


def algorithms(analysis: StudyAnalysis) -> list[ModelIdentity]:
    """Every algorithm that contributed to ``analysis`` (model first), never empty."""
    found = [m for m in (analysis.model, analysis.pipeline) if m is not None]
    return found or [FALLBACK_ALGORITHM]


def result_key(analysis: StudyAnalysis) -> str:
    """What makes a result unique: study, revision and the contributing algorithm versions."""
    return "|".join(
        [analysis.study_instance_uid, str(analysis.revision), *(m.device_uid for m in algorithms(analysis))]
    )


def check_sources(analysis: StudyAnalysis, sources: Sequence[Dataset]) -> None:
    """Refuse sources that belong to another study than the analysis (results must file into it)."""
    if not sources:
        raise ValueError("no source instances given: results must reference the analysed images")
    for ds in sources:
        if ds.get("StudyInstanceUID") != analysis.study_instance_uid:
            raise ValueError(
                f"source {ds.get('SOPInstanceUID')} is in study {ds.get('StudyInstanceUID')}, "
                f"not the analysed study {analysis.study_instance_uid}"
            )


def paired(analysis: StudyAnalysis, sources: Sequence[Dataset]) -> list[tuple[ImageAnalysis, Dataset]]:
    """(image result, source instance) pairs, matched on SOP Instance UID, in analysis order."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    pairs = [(img, by_uid[img.sop_instance_uid]) for img in analysis.images if img.sop_instance_uid in by_uid]
    if not pairs:
        raise ValueError("none of the analysed images is among the source instances")
    return pairs


def unmatched_images(analysis: StudyAnalysis, sources: Sequence[Dataset]) -> list[ImageAnalysis]:
    """Image results without a source instance (analysed from plain files): reported as text only."""
    uids = {str(ds.SOPInstanceUID) for ds in sources}
    return [img for img in analysis.images if img.sop_instance_uid not in uids]


def metadata(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without its bulk pixel data, with absent Type 2 Patient / General Study attributes
    (PS3.3 C.7.1.1, C.7.2.1) present and empty, as every result object must carry them."""
    copy = Dataset()
    for elem in ds:
        if elem.tag not in _BULK_TAGS:
            copy.add(deepcopy(elem))
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in copy:
            setattr(copy, keyword, None)
    copy.file_meta = deepcopy(getattr(ds, "file_meta", Dataset()))
    return copy


def rgb_pixels(ds: Dataset) -> np.ndarray:
    """The first frame of ``ds`` as 8-bit RGB (rows × columns × 3), as analysed and as shown (:func:`frame_rgb8`).
    Only that frame is decoded and the array is not kept on ``ds``, so building objects for a study holds one
    decoded image at a time."""
    return frame_rgb8(pixel_array(ds, index=0), ds)  # only the first frame, and not cached on ``ds``


def frame_rgb8(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """One decoded frame of ``ds`` as 8-bit RGB (rows × columns × 3).

    pydicom and the decoders already return YBR (e.g. JPEG Baseline) colour data as RGB. Grey data is replicated to
    three channels; MONOCHROME1 (minimum is white) is inverted against the largest value the stored bits can hold,
    2^BitsStored − 1 (PS3.3 C.7.6.3.1.2), not against the image's own maximum, so an image's grey levels do not
    depend on its brightest pixel. More than 8 stored bits are scaled by the same 2^BitsStored − 1 (in float32)."""
    samples = int(ds.get("SamplesPerPixel", 1))
    if pixels.ndim == (3 if samples == 1 else 4):
        pixels = pixels[0]  # a decoder that returned every frame
    top = 2 ** int(ds.get("BitsStored", 8 * pixels.dtype.itemsize)) - 1
    if pixels.ndim == 2 and str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = top - pixels.astype(np.int64)
    if pixels.dtype != np.uint8:
        scaled = np.multiply(pixels, np.float32(255.0 / top), dtype=np.float32)
        pixels = np.clip(scaled, 0, 255, out=scaled).round(out=scaled).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels)


def laterality(img: ImageAnalysis, ds: Dataset | None = None) -> str | None:
    """``R`` / ``L`` from the analysis, else from the source's ImageLaterality, else None."""
    if img.laterality.value in {"R", "L"}:
        return img.laterality.value
    if ds is not None and str(ds.get("ImageLaterality", "")) in {"R", "L"}:
        return str(ds.ImageLaterality)
    return None
