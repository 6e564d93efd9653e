"""Supervised image-level tasks derived from records: the targets of the vision-tower stage and the binary
findings that evaluation reports AUCs for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from model.schema import Condition, LesionType
from training.records import Record


@dataclass(frozen=True)
class Task:
    """An image-level label: ``classes`` = 2 for binary tasks; ``label`` returns None when unknown."""

    name: str
    classes: int
    label: Callable[[Record], int | None]


def _grade(condition: Condition) -> Callable[[Record], int | None]:
    return lambda record: record.grades.get(condition)


def _presence(condition: Condition) -> Callable[[Record], int | None]:
    def label(record: Record) -> int | None:
        present = record.is_present(condition)
        return None if present is None else int(present)

    return label


def _lesion(kind: LesionType | None) -> Callable[[Record], int | None]:
    def label(record: Record) -> int | None:
        value = record.any_lesion() if kind is None else record.lesions.get(kind)
        return None if value is None else int(value)

    return label


TASKS: tuple[Task, ...] = (
    Task("dr_grade", 5, _grade(Condition.DIABETIC_RETINOPATHY)),
    Task("diabetic_retinopathy", 2, _presence(Condition.DIABETIC_RETINOPATHY)),
    Task("referable_diabetic_retinopathy", 2, _presence(Condition.REFERABLE_DIABETIC_RETINOPATHY)),
    Task("diabetic_macular_edema", 2, _presence(Condition.DIABETIC_MACULAR_EDEMA)),
    Task("glaucoma", 2, _presence(Condition.GLAUCOMA)),
    Task("cataract", 2, _presence(Condition.CATARACT)),
    Task("pathologic_myopia", 2, _presence(Condition.PATHOLOGIC_MYOPIA)),
    Task("hard_exudate", 2, _lesion(LesionType.HARD_EXUDATE)),
    Task("haemorrhage", 2, _lesion(LesionType.HAEMORRHAGE)),
    Task("any_lesion", 2, _lesion(None)),
)

TASKS_BY_NAME = {task.name: task for task in TASKS}
