"""DICOM Segmentation of a fundus image (PS3.3 A.51 Segmentation IOD, BINARY): the vessel mask and the
lesion, optic disc and optic cup regions on the source photograph, built with highdicom.

highdicom reads the pixel measures of a source that has Number of Frames (OP is a multi-frame IOD) from a
SharedFunctionalGroupsSequence, which OP and VL Photographic instances do not have; the Segmentation is
therefore built from a metadata copy of the source. When the source has Pixel Spacing the copy gets a Pixel
Measures Sequence carrying exactly that spacing (and Slice Thickness only if the source has one); when it has
none the copy is single-frame without any, so the Segmentation has no Pixel Measures either and its geometry
stays in pixels (PS3.3 C.7.6.16.2.1: Pixel Spacing is conditional; a SEG must not claim a calibration the
photograph lacks). The copy has the same UIDs, so every reference points at the real source.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from model.schema import ImageAnalysis, LandmarkType, StudyAnalysis
from reporting import codes
from reporting.options import ReportOptions
from reporting.sources import algorithms, metadata, result_key, uid
from reporting.verification import Verification, series_description

VESSELS_LABEL = "Retinal vessels"


def _with_shared_groups(source: Dataset) -> Dataset:
    """The metadata copy highdicom builds from. Its Pixel Measures are the source's Pixel Spacing, or a
    placeholder when the source has none; :func:`_source_geometry` then puts the SEG's own measures right."""
    copy = metadata(source)
    measures = Dataset()
    measures.PixelSpacing = [float(v) for v in source.get("PixelSpacing") or (1.0, 1.0)]
    measures.SliceThickness = float(source.get("SliceThickness") or 1.0)
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    copy.SharedFunctionalGroupsSequence = [shared]
    copy.NumberOfFrames = 1
    copy.PixelData = b""  # highdicom only checks presence; the real pixels are never read
    return copy


def _source_geometry(seg: hd.seg.Segmentation, source: Dataset) -> None:
    """Keep of the Pixel Measures only what the source itself states (PS3.3 C.7.6.16.2.1, both conditional):
    its Pixel Spacing, with its Slice Thickness if it has one. A SEG in a Frame of Reference needs a Slice
    Thickness; when the source has none, or no Pixel Spacing at all, the SEG gets no Pixel Measures Sequence
    and stays in pixel coordinates rather than claim a calibration the photograph lacks."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing, thickness = source.get("PixelSpacing"), source.get("SliceThickness")
    if not spacing or (thickness is None and "FrameOfReferenceUID" in seg):
        if "PixelMeasuresSequence" in shared:
            del shared.PixelMeasuresSequence
        return
    measures = shared.PixelMeasuresSequence[0]
    if thickness is None and "SliceThickness" in measures:
        del measures.SliceThickness


def _polygon_mask(shape: tuple[int, int], points: list[tuple[float, float]]) -> np.ndarray:
    rows, cols = shape
    canvas = Image.new("1", (cols, rows), 0)
    ImageDraw.Draw(canvas).polygon([(x * cols, y * rows) for x, y in points], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def _box(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def segments(
    img: ImageAnalysis, shape: tuple[int, int], vessel_mask: np.ndarray | None
) -> list[tuple[str, Code, Code, np.ndarray]]:
    """(label, category, type, mask) of every non-empty segment of ``img``."""
    out: list[tuple[str, Code, Code, np.ndarray]] = []
    if vessel_mask is not None:
        if vessel_mask.shape[:2] != shape:
            raise ValueError(f"vessel mask {vessel_mask.shape[:2]} does not match the source image {shape}")
        out.append(
            (
                VESSELS_LABEL,
                codes.FINDING_CATEGORY_ANATOMY,
                codes.VESSELS[codes.VesselType.ALL],
                vessel_mask > 0,
            )
        )
    for lesion_type in dict.fromkeys(lesion.type for lesion in img.lesions):
        mask = np.zeros(shape, dtype=bool)
        for lesion in img.lesions:
            if lesion.type == lesion_type:
                mask |= _polygon_mask(shape, _box(lesion.box))
        out.append(
            (
                codes.LESIONS[lesion_type].meaning,
                codes.FINDING_CATEGORY_MORPHOLOGY,
                codes.LESIONS[lesion_type],
                mask,
            )
        )
    for landmark in img.landmarks:
        if landmark.type == LandmarkType.FOVEA or not (landmark.contour or landmark.box):
            continue
        points = list(landmark.contour) if landmark.contour else _box(landmark.box)  # type: ignore[arg-type]
        code = codes.LANDMARKS[landmark.type]
        out.append((code.meaning, codes.FINDING_CATEGORY_ANATOMY, code, _polygon_mask(shape, points)))
    return [s for s in out if s[3].any()]


def build_segmentation(
    analysis: StudyAnalysis,
    img: ImageAnalysis,
    source: Dataset,
    options: ReportOptions,
    vessel_mask: np.ndarray | None,
    instance_number: int,
    verification: Verification | None = None,
) -> hd.seg.Segmentation | None:
    """The Segmentation of one source image, or None when it has no segment; its Series and Content Description
    say whether a clinician verified the result (:mod:`reporting.verification`)."""
    shape = (int(source.Rows), int(source.Columns))
    found = segments(img, shape, vessel_mask)
    if not found:
        return None
    identity = algorithms(analysis)[0]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=identity.name, family=codes.ALGORITHM_FAMILY, version=identity.version
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for n, (label, category, kind, _) in enumerate(found, 1)
    ]
    pixels = np.stack([mask for *_, mask in found], axis=-1)[np.newaxis].astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=[_with_shared_groups(source)],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uid(result_key(analysis), "seg-series"),
        series_number=options.seg_series_number,
        sop_instance_uid=uid(result_key(analysis), "seg", source.SOPInstanceUID),
        instance_number=instance_number,
        manufacturer=options.manufacturer,
        manufacturer_model_name=identity.name,
        software_versions=identity.version,
        device_serial_number=identity.device_uid[-16:],
        content_label="FUNDUS",
        content_description=series_description("Vessels, lesions and optic disc", verification),
        series_description=series_description("RetinalGPT segmentation", verification),
    )
    _source_geometry(seg, source)
    seg.CodingSchemeIdentificationSequence = [codes.coding_scheme_identification()]
    if not seg.get("PatientOrientation"):
        seg.PatientOrientation = source.get("PatientOrientation") or ["L", "F"]
    if options.institution_name:
        seg.InstitutionName = options.institution_name
    return seg
