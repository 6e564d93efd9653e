"""Typed result schema shared by :mod:`model`, :mod:`reporting` and :mod:`worker`.

This is the contract between packages (DESIGN.md, "The result schema"). A :class:`StudyAnalysis` holds one
:class:`ImageAnalysis` per analysed image; each image carries its quality, findings (condition, grade,
probability), lesion boxes, landmarks and measurements. Numbers that the language model emitted and numbers
that the measurement pipeline measured are both kept (``source``); disagreements beyond a tolerance are
recorded in :attr:`ImageAnalysis.disagreements`. A lesion box a clinician drew at sign-off has the source
``clinician``.

Coordinates are normalised to 0–1 of the image width and height, origin top-left, exactly as RetinalGPT
emits lesion boxes (``[x_min, y_min, x_max, y_max]``).
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = "1.3"
"""1.1: ``ImageAnalysis.not_assessed`` (conditions the model was not trained to assess). 1.2: ``Source.CLINICIAN``
(a lesion box drawn by the clinician who signed the result). 1.3: a finding whose grade the signing clinician set
or corrected has ``Source.CLINICIAN`` (before, it kept the model's source with the clinician's grade), and
``StudyAnalysis.referral_source`` says whether she set the referral. Each version
reads every earlier document."""

Unit = Annotated[float, Field(ge=0.0, le=1.0)]
"""A number in the closed unit interval (normalised coordinate, probability, score)."""


class Laterality(StrEnum):
    """Image laterality, DICOM (0020,0062) values plus unknown."""

    RIGHT = "R"
    LEFT = "L"
    UNKNOWN = "unknown"


class Referral(StrEnum):
    """Study-level referral urgency used by the worklist."""

    NONE = "none"
    ROUTINE = "routine"
    URGENT = "urgent"
    UNGRADABLE = "ungradable"


class QualityGrade(StrEnum):
    """Image quality class: ``gradable`` (all checks pass), ``usable`` (some degradation, still read),
    ``reject`` (not fit for grading)."""

    GRADABLE = "gradable"
    USABLE = "usable"
    REJECT = "reject"


class Condition(StrEnum):
    """Finding vocabulary (DESIGN.md). Grade scales are in :data:`GRADE_SCALES`."""

    DIABETIC_RETINOPATHY = "diabetic_retinopathy"
    REFERABLE_DIABETIC_RETINOPATHY = "referable_diabetic_retinopathy"
    DIABETIC_MACULAR_EDEMA = "diabetic_macular_edema"
    GLAUCOMA = "glaucoma"
    AGE_RELATED_MACULAR_DEGENERATION = "age_related_macular_degeneration"
    MYOPIC_MACULOPATHY = "myopic_maculopathy"
    PATHOLOGIC_MYOPIA = "pathologic_myopia"
    RETINAL_VEIN_OCCLUSION = "retinal_vein_occlusion"
    HYPERTENSIVE_RETINOPATHY = "hypertensive_retinopathy"
    CATARACT = "cataract"


GRADE_SCALES: dict[Condition, int] = {
    Condition.DIABETIC_RETINOPATHY: 4,  # ICDR 0 none … 4 proliferative
    Condition.DIABETIC_MACULAR_EDEMA: 2,  # IDRiD DME risk 0–2
    Condition.MYOPIC_MACULOPATHY: 4,  # META-PM 0–4
}
"""Highest grade of each graded condition; conditions not listed are binary (grade 0 absent, 1 present)."""


def max_grade(condition: Condition) -> int:
    """Highest valid grade for ``condition`` (1 for binary findings)."""
    return GRADE_SCALES.get(condition, 1)


class LesionType(StrEnum):
    """Lesion vocabulary (DESIGN.md)."""

    MICROANEURYSM = "microaneurysm"
    HAEMORRHAGE = "haemorrhage"
    HARD_EXUDATE = "hard_exudate"
    SOFT_EXUDATE = "soft_exudate"
    NEOVASCULARISATION = "neovascularisation"
    DRUSEN = "drusen"


class LandmarkType(StrEnum):
    OPTIC_DISC = "optic_disc"
    OPTIC_CUP = "optic_cup"
    FOVEA = "fovea"


class Zone(StrEnum):
    """Measurement region: whole image, or the peripapillary zones of AutoMorph / Knudtson:
    zone B is 0.5–1.0 disc diameters from the disc margin, zone C 0.5–2.0 disc diameters."""

    WHOLE = "whole"
    B = "B"
    C = "C"


class VesselType(StrEnum):
    ALL = "all"
    ARTERY = "artery"
    VEIN = "vein"


class Source(StrEnum):
    """Who produced a value: the language model (``model``), the measurement pipeline (``measured``), or the
    clinician who signed the result off (``clinician``: a lesion box drawn for a lesion the AI missed, or a grade the
    clinician set or corrected; neither has a score or probability)."""

    MODEL = "model"
    MEASURED = "measured"
    CLINICIAN = "clinician"


class ScaleSource(StrEnum):
    """How the µm/px scale of an image was obtained."""

    PIXEL_SPACING = "dicom_pixel_spacing"
    FIELD_OF_VIEW = "field_of_view_estimate"
    NONE = "none"


def _check_box(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    if not (0.0 <= x0 <= x1 <= 1.0 and 0.0 <= y0 <= y1 <= 1.0):
        raise ValueError(f"box {list(box)} is not [x0, y0, x1, y1] with 0 <= x0 <= x1 <= 1, 0 <= y0 <= y1 <= 1")
    return box


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, use_enum_values=False)


class Quality(_Model):
    """Image quality assessment (issue 3: focus, illumination, field coverage, contrast)."""

    grade: QualityGrade
    score: Unit = Field(description="0 worst … 1 best")
    reasons: list[str] = Field(default_factory=list, description="why the grade is not 'gradable'")
    metrics: dict[str, float] = Field(default_factory=dict, description="raw quality metrics by name")

    @property
    def gradable(self) -> bool:
        """True when the image can be graded (``gradable`` or ``usable``)."""
        return self.grade != QualityGrade.REJECT


class Finding(_Model):
    """A condition with its grade on its own scale and a probability.

    ``probability`` is P(condition present); for diabetic retinopathy P(grade ≥ 1). ``grade_probabilities``
    holds P(grade = k) for k = 0…max grade when the model scored every candidate answer.
    """

    condition: Condition
    grade: int | None = Field(default=None, ge=0)
    probability: Unit | None = None
    grade_probabilities: list[Unit] | None = None
    source: Source = Source.MODEL

    @model_validator(mode="after")
    def _grade_in_scale(self) -> Finding:
        top = max_grade(self.condition)
        if self.grade is not None and self.grade > top:
            raise ValueError(f"{self.condition.value} grade {self.grade} is outside 0..{top}")
        if self.grade_probabilities is not None:
            if len(self.grade_probabilities) != top + 1:
                raise ValueError(f"{self.condition.value} needs {top + 1} grade probabilities")
            if abs(sum(self.grade_probabilities) - 1.0) > 1e-3:
                raise ValueError("grade probabilities must sum to 1")
        if self.source == Source.CLINICIAN and (
            self.grade is None or self.probability is not None or self.grade_probabilities is not None
        ):
            raise ValueError("a finding the clinician set has a grade and no probability")
        return self

    @property
    def present(self) -> bool:
        return bool(self.grade) if self.grade is not None else (self.probability or 0.0) >= 0.5


class Lesion(_Model):
    """A lesion region as a normalised box ``[x0, y0, x1, y1]`` (origin top-left)."""

    type: LesionType
    box: tuple[float, float, float, float]
    score: Unit | None = None
    source: Source = Source.MODEL

    _box = field_validator("box")(_check_box)

    @model_validator(mode="after")
    def _clinician_boxes_have_no_score(self) -> Lesion:
        if self.source == Source.CLINICIAN and self.score is not None:
            raise ValueError("a lesion drawn by the clinician has no detection score")
        return self


class Landmark(_Model):
    """An anatomical landmark: optic disc / cup (box and centre) or fovea (centre only)."""

    type: LandmarkType
    center: tuple[Unit, Unit]
    box: tuple[float, float, float, float] | None = None
    contour: list[tuple[Unit, Unit]] | None = Field(default=None, description="closed outline, normalised")
    score: Unit | None = None
    source: Source = Source.MEASURED

    @field_validator("box")
    @classmethod
    def _valid_box(cls, box: tuple[float, float, float, float] | None) -> tuple[float, float, float, float] | None:
        return None if box is None else _check_box(box)


class Measurement(_Model):
    """A quantitative feature. ``key`` follows AutoMorph's column names (e.g. ``Fractal_dimension``,
    ``Artery_Vessel_density_zone_b``, ``CRAE_Knudtson_zone_c``, ``CDR_vertical``); ``zone`` and ``vessel``
    repeat what the key encodes so consumers need not parse it."""

    key: str = Field(min_length=1)
    value: float
    unit: str = Field(description="UCUM unit: 'px', 'um', '1' (dimensionless), '%'")
    zone: Zone = Zone.WHOLE
    vessel: VesselType = VesselType.ALL
    source: Source = Source.MEASURED
    method: str | None = Field(default=None, description="definition mode, e.g. 'standard' or 'automorph'")
    scale_source: ScaleSource | None = None


class Disagreement(_Model):
    """A model-emitted number that differs from the measured one beyond the feature's tolerance."""

    key: str
    zone: Zone = Zone.WHOLE
    vessel: VesselType = VesselType.ALL
    model_value: float
    measured_value: float
    tolerance: float = Field(ge=0.0)


class ModelAnswer(_Model):
    """One question/answer exchange with the model, kept verbatim for audit."""

    task: str = Field(description="protocol task, e.g. 'modality_quality', 'disease_grade', 'vascular', 'lesions'")
    question: str
    answer: str
    parsed: bool
    error: str | None = None


class ModelIdentity(_Model):
    """Identity of an algorithm that contributed to a result (TID 4019, ContributingEquipmentSequence)."""

    name: str
    version: str
    device_uid: str = Field(description="DICOM UID that changes with every model version")
    checkpoint_sha256: str | None = None
    manufacturer: str = "RetinalGPT Worker"


class ImageAnalysis(_Model):
    """Results for one fundus image."""

    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    file_path: str | None = Field(default=None, description="set when analysed from a plain file")
    laterality: Laterality = Laterality.UNKNOWN
    view: str | None = Field(default=None, description="e.g. 'macula-centred', 'disc-centred', 'wide-field'")
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    pixel_spacing_um: float | None = Field(default=None, gt=0, description="µm per pixel of the source image")
    scale_source: ScaleSource = ScaleSource.NONE
    quality: Quality | None = None
    findings: list[Finding] = Field(default_factory=list)
    not_assessed: list[Condition] = Field(
        default_factory=list,
        description="conditions of the vocabulary the model that read this image was not trained to assess: "
        "reported as not assessed, never as absent (empty when no model read the image)",
    )
    lesions: list[Lesion] = Field(default_factory=list)
    landmarks: list[Landmark] = Field(default_factory=list)
    measurements: list[Measurement] = Field(default_factory=list)
    disagreements: list[Disagreement] = Field(default_factory=list)
    answers: list[ModelAnswer] = Field(default_factory=list)

    @model_validator(mode="after")
    def _has_reference(self) -> ImageAnalysis:
        if not self.sop_instance_uid and not self.file_path:
            raise ValueError("an ImageAnalysis needs a sop_instance_uid or a file_path")
        return self

    def finding(self, condition: Condition) -> Finding | None:
        """The first finding for ``condition`` (model source preferred), or None."""
        found = [f for f in self.findings if f.condition == condition]
        found.sort(key=lambda f: f.source != Source.MODEL)
        return found[0] if found else None

    def measurement(self, key: str, source: Source | None = None) -> Measurement | None:
        """The measurement with ``key`` (optionally of one ``source``), or None."""
        for m in self.measurements:
            if m.key == key and (source is None or m.source == source):
                return m
        return None

    def landmark(self, kind: LandmarkType) -> Landmark | None:
        return next((lm for lm in self.landmarks if lm.type == kind), None)


class StudyAnalysis(_Model):
    """Results for one revision of one study."""

    schema_version: str = SCHEMA_VERSION
    study_instance_uid: str
    revision: int = Field(default=1, ge=1)
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    model: ModelIdentity | None = Field(default=None, description="RetinalGPT identity, None when not run")
    pipeline: ModelIdentity | None = Field(default=None, description="measurement pipeline identity")
    images: list[ImageAnalysis] = Field(default_factory=list)
    impression: str = ""
    referral: Referral = Referral.NONE
    referral_source: Source = Field(
        default=Source.MODEL,
        description="who set the referral: the product's rule over the AI and measured findings (model) or the "
        "clinician who signed the result off (clinician; schema 1.3)",
    )
    notes: list[str] = Field(default_factory=list, description="e.g. 'RetinalGPT not configured'")
    created: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def image(self, sop_instance_uid: str) -> ImageAnalysis | None:
        return next((i for i in self.images if i.sop_instance_uid == sop_instance_uid), None)


def automorph_key(feature: str, vessel: VesselType = VesselType.ALL, zone: Zone = Zone.WHOLE) -> str:
    """AutoMorph column name for a feature, e.g. ``automorph_key("Vessel_density", ARTERY, B)`` →
    ``"Artery_Vessel_density_zone_b"``."""
    prefix = {VesselType.ALL: "", VesselType.ARTERY: "Artery_", VesselType.VEIN: "Vein_"}[vessel]
    suffix = {Zone.WHOLE: "", Zone.B: "_zone_b", Zone.C: "_zone_c"}[zone]
    return f"{prefix}{feature}{suffix}"

