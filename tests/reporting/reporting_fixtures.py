"""Source instances made from skimage's retina photograph and realistic analyses of them (helpers)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from skimage.transform import resize

from model.schema import (
    Condition,
    Disagreement,
    Finding,
    ImageAnalysis,
    Landmark,
    LandmarkType,
    Laterality,
    Lesion,
    LesionType,
    Measurement,
    ModelIdentity,
    Quality,
    QualityGrade,
    Referral,
    Source,
    StudyAnalysis,
    VesselType,
    Zone,
)
from reporting import ReportObjects, ReportOptions

SOURCE_KINDS = {
    "op8": "1.2.840.10008.5.1.4.1.1.77.1.5.1",
    "op16": "1.2.840.10008.5.1.4.1.1.77.1.5.2",
    "widefield": "1.2.840.10008.5.1.4.1.1.77.1.5.5",
    "vl": "1.2.840.10008.5.1.4.1.1.77.1.4",
}
SIZE = 384

MODEL = ModelIdentity(
    name="RetinalGPT",
    version="7b-v1.2",
    device_uid="2.25.113059749145936325402354257176981405696",
    checkpoint_sha256="ab" * 32,
)
PIPELINE = ModelIdentity(
    name="RetinalGPT measurement pipeline",
    version="0.1.0",
    device_uid="2.25.221427412357096830426839766380393856431",
)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def make_source(
    kind: str, retina: np.ndarray, study_uid: str, series_uid: str, laterality: str = "R", instance: int = 1
) -> Dataset:
    """A plausible source instance of ``kind`` (OP 8/16-bit, wide-field OP, VL Photographic)."""
    rgb = (resize(retina, (SIZE, SIZE), anti_aliasing=True) * 255).astype(np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SOURCE_KINDS[kind]
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "Fundus^Test"
    ds.PatientID = "RGPT-0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.ContentDate = ds.AcquisitionDateTime = "20260101"
    ds.AcquisitionDateTime = "20260101093000"
    ds.StudyTime = ds.ContentTime = "093000"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC42"
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.Modality = "XC" if kind == "vl" else "OP"
    ds.Manufacturer = "Camera Co"
    ds.ImageLaterality = laterality
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = SIZE, SIZE
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelRepresentation = 0
    if kind == "op16":
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelData = (rgb.astype(np.uint16) * 257).tobytes()
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = rgb.tobytes()
    if kind == "widefield":
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame-of-reference"])
    if kind != "vl":
        ds.AnatomicRegionSequence = [_code("81745001", "SCT", "Eye")]
        ds.PixelSpacing = [0.01, 0.01]
        ds.LossyImageCompression = "00"
    return ds


def make_analysis(sources: list[Dataset], *, with_model: bool = True, revision: int = 1) -> StudyAnalysis:
    """A realistic analysis of ``sources``: moderate NPDR on the right eye, glaucoma suspicion on the left;
    AMD and cataract not assessed (the model was not trained on them); model-emitted fractal dimension and
    vertical CDR beside the measured ones, the fractal dimension flagged as a disagreement."""
    images = []
    for ds in sources:
        right = ds.ImageLaterality == "R"
        findings = (
            [
                Finding(
                    condition=Condition.DIABETIC_RETINOPATHY,
                    grade=2 if right else 0,
                    probability=0.91 if right else 0.08,
                    grade_probabilities=[0.09, 0.2, 0.6, 0.08, 0.03]
                    if right
                    else [0.92, 0.05, 0.02, 0.01, 0.0],
                ),
                Finding(
                    condition=Condition.DIABETIC_MACULAR_EDEMA,
                    grade=1 if right else 0,
                    probability=0.55 if right else 0.1,
                ),
                Finding(
                    condition=Condition.GLAUCOMA, grade=0 if right else 1, probability=0.12 if right else 0.74
                ),
                Finding(condition=Condition.RETINAL_VEIN_OCCLUSION, probability=0.03),
            ]
            if with_model
            else []
        )
        lesions = (
            [
                Lesion(type=LesionType.MICROANEURYSM, box=(0.41, 0.52, 0.43, 0.54), score=0.81),
                Lesion(type=LesionType.HAEMORRHAGE, box=(0.6, 0.3, 0.66, 0.37), score=0.67),
            ]
            if with_model and right
            else []
        )
        contour = [
            (0.25 + 0.06 * np.cos(t), 0.5 + 0.07 * np.sin(t))
            for t in np.linspace(0, 2 * np.pi, 16, endpoint=False)
        ]
        landmarks = [
            Landmark(
                type=LandmarkType.OPTIC_DISC,
                center=(0.25, 0.5),
                box=(0.19, 0.43, 0.31, 0.57),
                contour=[(float(x), float(y)) for x, y in contour],
                score=0.95,
            ),
            Landmark(
                type=LandmarkType.OPTIC_CUP, center=(0.25, 0.5), box=(0.22, 0.46, 0.28, 0.54), score=0.9
            ),
            Landmark(type=LandmarkType.FOVEA, center=(0.55, 0.52)),
        ]
        measurements = [
            Measurement(key="Fractal_dimension", value=1.47, unit="1"),
            Measurement(key="Vessel_density", value=0.081, unit="1"),
            Measurement(
                key="Artery_Vessel_density_zone_b",
                value=0.034,
                unit="1",
                zone=Zone.B,
                vessel=VesselType.ARTERY,
            ),
            Measurement(
                key="CRAE_Knudtson_zone_c", value=141.2, unit="um", zone=Zone.C, vessel=VesselType.ARTERY
            ),
            Measurement(
                key="CRVE_Knudtson_zone_c", value=212.6, unit="um", zone=Zone.C, vessel=VesselType.VEIN
            ),
            Measurement(key="AVR_Knudtson_zone_c", value=0.66, unit="1", zone=Zone.C),
            Measurement(key="CDR_vertical", value=0.42 if right else 0.71, unit="1"),
            Measurement(key="Disc_height", value=61.0, unit="px"),
        ]
        disagreements = []
        not_assessed = []
        if with_model:
            not_assessed = [Condition.AGE_RELATED_MACULAR_DEGENERATION, Condition.CATARACT]
            measurements += [
                Measurement(key="Fractal_dimension", value=1.39, unit="1", source=Source.MODEL),
                Measurement(key="CDR_vertical", value=0.5 if right else 0.8, unit="1", source=Source.MODEL),
            ]
            disagreements.append(
                Disagreement(key="Fractal_dimension", model_value=1.39, measured_value=1.47, tolerance=0.05)
            )
        images.append(
            ImageAnalysis(
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                laterality=Laterality.RIGHT if right else Laterality.LEFT,
                view="macula-centred",
                width=int(ds.Columns),
                height=int(ds.Rows),
                pixel_spacing_um=10.0,
                quality=Quality(
                    grade=QualityGrade.GRADABLE if right else QualityGrade.USABLE,
                    score=0.88 if right else 0.61,
                    reasons=[] if right else ["uneven illumination"],
                ),
                findings=findings,
                not_assessed=not_assessed,
                lesions=lesions,
                landmarks=landmarks,
                measurements=measurements,
                disagreements=disagreements,
            )
        )
    return StudyAnalysis(
        study_instance_uid=str(sources[0].StudyInstanceUID),
        revision=revision,
        patient_id=str(sources[0].PatientID),
        patient_name=str(sources[0].PatientName),
        accession_number="ACC42",
        model=MODEL if with_model else None,
        pipeline=PIPELINE,
        images=images,
        impression=(
            "Moderate non-proliferative diabetic retinopathy with possible macular oedema in the right eye; "
            "enlarged cup-to-disc ratio in the left eye."
        )
        if with_model
        else "",
        referral=Referral.URGENT if with_model else Referral.ROUTINE,
        notes=[] if with_model else ["RetinalGPT not configured"],
        created=dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.UTC),
    )


OPTIONS = ReportOptions(institution_name="Eye Clinic", segmentation=True, key_image=True, pdf=True)


def vessel_mask(ds: pydicom.Dataset) -> np.ndarray:
    """A plausible vessel mask: the darkest 12 % of the green channel inside the fundus."""
    green = ds.pixel_array[..., 1].astype(np.float64)
    inside = green > np.percentile(green, 30)
    return (green < np.percentile(green[inside], 12)) & inside


def write_all(objects: ReportObjects, sources: list[pydicom.Dataset], folder: Path) -> dict[str, list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"source": [], "sr": [], "seg": [], "key": [], "pdf": []}
    groups = [
        ("source", sources),
        ("sr", [objects.sr]),
        ("seg", objects.segmentations),
        ("key", objects.key_images),
        ("pdf", [objects.pdf]),
    ]
    for name, datasets in groups:
        for n, ds in enumerate(datasets):
            path = folder / f"{name}{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written[name].append(path)
    return written
