"""The one record type every dataset adapter produces.

A :class:`Record` is one fundus photograph with whatever labels its dataset provides, expressed on the result
schema's vocabulary (:class:`model.schema.Condition`, :class:`model.schema.LesionType`,
:class:`model.schema.LandmarkType`). Labels a dataset does not provide are absent, never guessed: a missing key
means "unknown", not "negative".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from model.schema import Condition, LandmarkType, Laterality, LesionType, QualityGrade, max_grade

BoxTuple = tuple[float, float, float, float]


@dataclass(frozen=True)
class LabelledBox:
    """A normalised box ``[x0, y0, x1, y1]`` (origin top-left) of a lesion type or an optic-disc/cup landmark."""

    label: LesionType | LandmarkType
    box: BoxTuple


@dataclass
class Record:
    """One labelled fundus image.

    ``grades`` holds a grade on the condition's own scale (binary conditions: 0/1); ``present`` holds presence
    where only presence is known (e.g. "NPDR" without a grade). :meth:`is_present` combines both.
    ``lesions`` is image-level lesion presence; ``boxes`` the lesion/landmark boxes the dataset annotates
    (``boxes_complete`` says whether absence of a box type means absence of the lesion).
    """

    image: Path
    dataset: str
    record_id: str
    split: str = "unspecified"
    eye: Laterality = Laterality.UNKNOWN
    patient: str | None = None
    grades: dict[Condition, int] = field(default_factory=dict)
    present: dict[Condition, bool] = field(default_factory=dict)
    lesions: dict[LesionType, bool] = field(default_factory=dict)
    boxes: list[LabelledBox] = field(default_factory=list)
    boxes_complete: bool = False
    masks: dict[str, Path] = field(default_factory=dict)
    measurements: dict[str, float] = field(default_factory=dict)
    quality: QualityGrade | None = None
    evaluation_only: bool = False

    def __post_init__(self) -> None:
        for condition, grade in self.grades.items():
            if not 0 <= grade <= max_grade(condition):
                raise ValueError(f"{self.record_id}: {condition.value} grade {grade} outside 0..{max_grade(condition)}")
        derive_referable(self)

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.record_id}"

    def is_present(self, condition: Condition) -> bool | None:
        """Presence of ``condition``: from its grade when graded, else from ``present``, else None (unknown)."""
        if condition in self.grades:
            return self.grades[condition] > 0
        return self.present.get(condition)

    def any_lesion(self) -> bool | None:
        """Image-level "any lesion" label (True if any lesion type is present, None if nothing is known)."""
        if not self.lesions:
            return None
        return any(self.lesions.values())


REFERABLE_DR_MIN_GRADE = 2
"""Referable diabetic retinopathy: ICDR moderate non-proliferative or worse (grade ≥ 2), as in Gulshan et al.,
JAMA 2016 and the EyePACS/Kaggle and IDRiD referable-DR evaluations."""


def derive_referable(record: Record) -> None:
    """Set ``referable_diabetic_retinopathy`` from the DR grade (or from presence of PDR) when not given."""
    if Condition.REFERABLE_DIABETIC_RETINOPATHY in record.grades:
        return
    grade = record.grades.get(Condition.DIABETIC_RETINOPATHY)
    if grade is not None:
        record.grades[Condition.REFERABLE_DIABETIC_RETINOPATHY] = int(grade >= REFERABLE_DR_MIN_GRADE)


def laterality(text: str | None) -> Laterality:
    """Map 'left'/'right'/'L'/'R'/'OS'/'OD' (any case) to :class:`Laterality`."""
    value = (text or "").strip().lower()
    if value in {"left", "l", "os"}:
        return Laterality.LEFT
    if value in {"right", "r", "od"}:
        return Laterality.RIGHT
    return Laterality.UNKNOWN
