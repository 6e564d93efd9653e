"""A populated API deployment for the tests: OP files on disk, database rows, analyses, and the FHIR resources
indexed from the reporting module's own transaction Bundle (helpers)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
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
from reporting.fhir.bundle import build_bundle
from worker.db import Analysis, Database, Instance, Series, Study, StudyState
from worker.fhir_store import index_bundle
from worker.pipeline.sources import ophthalmic_photograph

SIZE = 256
MODEL = ModelIdentity(name="RetinalGPT", version="7b-v1.2", device_uid="2.25.113059749145936325402354257176981405696",
                      checkpoint_sha256="ab" * 32)
PIPELINE = ModelIdentity(name="RetinalGPT measurement pipeline", version="0.1.0",
                         device_uid="2.25.221427412357096830426839766380393856431")


@dataclass
class StudySpec:
    """One test study: who, when, which eyes, from which camera, what result."""

    patient_id: str
    patient_name: str
    date: dt.date
    eyes: str
    calling_ae: str
    referral: Referral | None
    state: StudyState
    dr_grade: int = 0
    uid: str = field(default_factory=generate_uid)


SPECS = [
    StudySpec("P-001", "Able^Anna", dt.date(2026, 1, 5), "RL", "CAMERA1", Referral.URGENT, StudyState.DELIVERED, 3),
    StudySpec("P-002", "Baker^Ben", dt.date(2026, 2, 10), "R", "CAMERA2", Referral.ROUTINE, StudyState.ANALYSED, 1),
    StudySpec("P-003", "Clark^Cara", dt.date(2026, 3, 1), "L", "CAMERA1", Referral.NONE, StudyState.DELIVERED, 0),
    StudySpec("P-004", "Dunn^Dave", dt.date(2026, 3, 15), "RL", "CAMERA2", Referral.UNGRADABLE, StudyState.DELIVERED, 0),
    StudySpec("P-005", "Evans^Eve", dt.date(2026, 4, 2), "R", "CAMERA1", None, StudyState.RECEIVING, 0),
    StudySpec("P-006", "Fox^Finn", dt.date(2026, 4, 20), "L", "CAMERA3", Referral.ROUTINE, StudyState.DELIVERED, 0),
]
"""The studies of the test deployment; P-006 is the one the rerun test re-runs (its state changes)."""


_SMALL: dict[int, np.ndarray] = {}


def _small(retina: np.ndarray) -> np.ndarray:
    if id(retina) not in _SMALL:
        _SMALL[id(retina)] = (resize(retina, (SIZE, SIZE), anti_aliasing=True) * 255).astype(np.uint8)
    return _SMALL[id(retina)]


def write_sources(spec: StudySpec, retina: np.ndarray, storage: Path) -> list[tuple[Dataset, Path]]:
    """OP 8-bit instances (one per eye) written below ``storage`` as the listener lays them out."""
    rgb = _small(retina)
    series = generate_uid()
    out = []
    for n, side in enumerate(spec.eyes, 1):
        ds = ophthalmic_photograph(
            rgb, study_instance_uid=spec.uid, series_instance_uid=series, patient_id=spec.patient_id,
            patient_name=spec.patient_name, laterality=Laterality(side), instance_number=n,
            accession_number=f"A{spec.patient_id[-3:]}", pixel_spacing_um=10.0,
            when=dt.datetime.combine(spec.date, dt.time(9, 30)))
        path = storage / spec.uid / series / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        out.append((ds, path))
    return out


def make_analysis(spec: StudySpec, sources: list[Dataset], revision: int = 1) -> StudyAnalysis:
    """A realistic result: DR graded per eye, lesions on a referable eye, disc/cup, vascular measures (and the
    model's own fractal dimension), AMD and cataract not assessed; an ungradable study abstains although the
    engine listed its not-assessed conditions."""
    assert spec.referral is not None
    images = []
    for ds in sources:
        side = str(ds.ImageLaterality)
        grade = spec.dr_grade if side == "R" else 0
        gradable = spec.referral != Referral.UNGRADABLE
        contour = [(0.25 + 0.06 * np.cos(t), 0.5 + 0.07 * np.sin(t)) for t in np.linspace(0, 2 * np.pi, 16, endpoint=False)]
        images.append(ImageAnalysis(
            sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
            laterality=Laterality(side), view="macula-centred", width=SIZE, height=SIZE, pixel_spacing_um=10.0,
            quality=Quality(grade=QualityGrade.GRADABLE if gradable else QualityGrade.REJECT,
                            score=0.9 if gradable else 0.2, reasons=[] if gradable else ["out of focus"]),
            findings=[
                Finding(condition=Condition.DIABETIC_RETINOPATHY, grade=grade, probability=0.9 if grade else 0.1),
                Finding(condition=Condition.GLAUCOMA, grade=int(side == "L"), probability=0.7 if side == "L" else 0.1),
            ] if gradable else [],
            not_assessed=[Condition.AGE_RELATED_MACULAR_DEGENERATION, Condition.CATARACT],
            lesions=[Lesion(type=LesionType.HAEMORRHAGE, box=(0.6, 0.3, 0.66, 0.37), score=0.7),
                     Lesion(type=LesionType.MICROANEURYSM, box=(0.41, 0.52, 0.43, 0.54), score=0.8)] if grade else [],
            landmarks=[
                Landmark(type=LandmarkType.OPTIC_DISC, center=(0.25, 0.5), box=(0.19, 0.43, 0.31, 0.57),
                         contour=[(float(x), float(y)) for x, y in contour]),
                Landmark(type=LandmarkType.OPTIC_CUP, center=(0.25, 0.5), box=(0.22, 0.46, 0.28, 0.54)),
                Landmark(type=LandmarkType.FOVEA, center=(0.55, 0.52)),
            ],
            measurements=[
                Measurement(key="Fractal_dimension", value=1.47, unit="1"),
                Measurement(key="Vessel_density", value=0.031, unit="1"),
                Measurement(key="CRAE_Knudtson_zone_c", value=141.2, unit="um", zone=Zone.C, vessel=VesselType.ARTERY),
                Measurement(key="CDR_vertical", value=0.42 if side == "R" else 0.71, unit="1"),
                Measurement(key="Fractal_dimension", value=1.39, unit="1", source=Source.MODEL),
            ],
            disagreements=[Disagreement(key="Fractal_dimension", model_value=1.39, measured_value=1.47, tolerance=0.05)],
        ))
    return StudyAnalysis(
        study_instance_uid=spec.uid, revision=revision, patient_id=spec.patient_id, patient_name=spec.patient_name,
        accession_number=f"A{spec.patient_id[-3:]}", model=MODEL, pipeline=PIPELINE, images=images,
        impression=f"Diabetic retinopathy grade {spec.dr_grade} in the right eye." if spec.dr_grade else "No DR.",
        referral=spec.referral, created=dt.datetime.combine(spec.date, dt.time(10, 0), tzinfo=dt.UTC))


def populate(db: Database, storage: Path, retina: np.ndarray, specs: list[StudySpec] = SPECS) -> dict[str, StudyAnalysis]:
    """Insert the studies, their instances and results, and index the FHIR bundles. Returns analyses by UID."""
    analyses = {}
    for spec in specs:
        written = write_sources(spec, retina, storage)
        with db.session() as session:
            study = Study(study_instance_uid=spec.uid, patient_id=spec.patient_id, patient_name=spec.patient_name,
                          accession_number=f"A{spec.patient_id[-3:]}", study_date=spec.date.strftime("%Y%m%d"),
                          study_description="Fundus photography", state=spec.state, revision=1)
            series = Series(series_instance_uid=str(written[0][0].SeriesInstanceUID), modality="OP", series_number=1,
                            study=study)
            for ds, path in written:
                session.add(Instance(
                    study=study, series=series, sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), instance_number=int(ds.InstanceNumber),
                    laterality=str(ds.ImageLaterality), path=str(path), size_bytes=path.stat().st_size, sha256="0" * 64,
                    calling_ae_title=spec.calling_ae, peer_host="127.0.0.1", revision=1, analysable=True))
            session.add(study)
            session.flush()
            if spec.referral is not None:
                analysis = make_analysis(spec, [ds for ds, _ in written])
                session.add(Analysis(study_id=study.id, revision=1, model_name=MODEL.name, model_version=MODEL.version,
                                     result=analysis.model_dump(mode="json")))
                index_bundle(session, study.id, 1, build_bundle(analysis, [ds for ds, _ in written]))
                analyses[spec.uid] = analysis
    return analyses


def reindex_revision(db: Database, spec: StudySpec, storage: Path, revision: int) -> StudyAnalysis:
    """Index a new revision of an existing study's results (what the pipeline does after a rerun)."""
    sources = sorted((pydicom.dcmread(p) for p in storage.joinpath(spec.uid).rglob("*.dcm")),
                     key=lambda ds: int(ds.InstanceNumber))
    analysis = make_analysis(spec, sources, revision=revision)
    analysis.created = analysis.created + dt.timedelta(days=revision - 1)
    with db.session() as session:
        study = session.query(Study).filter_by(study_instance_uid=spec.uid).one()
        index_bundle(session, study.id, revision, build_bundle(analysis, sources))
    return analysis
