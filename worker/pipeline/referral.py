"""Study-level referral urgency and the short impression text.

The rules follow the referral thresholds of the International Clinical Diabetic Retinopathy scale
(Wilkinson et al., Ophthalmology 2003; ICO Guidelines for Diabetic Eye Care 2017): severe non-proliferative or
proliferative DR and centre-involving (grade 2) macular oedema are referred urgently; moderate DR, non-central
macular oedema and other sight-threatening findings routinely. A vertical cup-to-disc ratio ≥ 0.7 marks a
glaucoma suspect (routine) even when no language model ran. A study with no gradable image is ``ungradable``.
The impression names the conditions the model was not trained to assess on each gradable image.
"""

from __future__ import annotations

from collections.abc import Iterable

from model.schema import Condition, ImageAnalysis, LesionType, Referral, Source
from reporting.summary import condition_name, not_assessed

URGENT_DR_GRADE = 3
ROUTINE_DR_GRADE = 2
GLAUCOMA_SUSPECT_CDR = 0.7

_ROUTINE_CONDITIONS = frozenset(
    {
        Condition.REFERABLE_DIABETIC_RETINOPATHY,
        Condition.GLAUCOMA,
        Condition.AGE_RELATED_MACULAR_DEGENERATION,
        Condition.MYOPIC_MACULOPATHY,
        Condition.PATHOLOGIC_MYOPIA,
        Condition.HYPERTENSIVE_RETINOPATHY,
        Condition.CATARACT,
    }
)

_DR_NAMES = ("no", "mild non-proliferative", "moderate non-proliferative", "severe non-proliferative", "proliferative")
_EYE = {"R": "Right eye", "L": "Left eye"}


def image_referral(image: ImageAnalysis) -> tuple[Referral, list[str]]:
    """Referral urgency of one image and the reasons for it."""
    if image.quality is not None and not image.quality.gradable:
        return Referral.UNGRADABLE, ["image not gradable: " + ", ".join(image.quality.reasons or ["low quality"])]
    urgent: list[str] = []
    routine: list[str] = []
    dr = image.finding(Condition.DIABETIC_RETINOPATHY)
    if dr is not None and dr.grade is not None:
        if dr.grade >= URGENT_DR_GRADE:
            urgent.append(f"{_DR_NAMES[dr.grade]} diabetic retinopathy")
        elif dr.grade >= ROUTINE_DR_GRADE:
            routine.append(f"{_DR_NAMES[dr.grade]} diabetic retinopathy")
    dme = image.finding(Condition.DIABETIC_MACULAR_EDEMA)
    if dme is not None and dme.grade:
        (urgent if dme.grade >= 2 else routine).append(f"diabetic macular oedema risk {dme.grade}")
    rvo = image.finding(Condition.RETINAL_VEIN_OCCLUSION)
    if rvo is not None and rvo.present:
        urgent.append("retinal vein occlusion")
    if any(lesion.type == LesionType.NEOVASCULARISATION for lesion in image.lesions):
        urgent.append("neovascularisation")
    for finding in image.findings:
        if finding.condition in _ROUTINE_CONDITIONS and finding.present:
            routine.append(finding.condition.value.replace("_", " "))
    cdr = image.measurement("CDR_vertical", Source.MEASURED)
    if cdr is not None and cdr.value >= GLAUCOMA_SUSPECT_CDR:
        routine.append(f"vertical cup-to-disc ratio {cdr.value:.2f} (glaucoma suspect)")
    if urgent:
        return Referral.URGENT, urgent + routine
    if routine:
        return Referral.ROUTINE, routine
    return Referral.NONE, []


def study_referral(images: Iterable[ImageAnalysis]) -> Referral:
    """The most urgent image referral; ``ungradable`` only when no image is gradable."""
    levels = [image_referral(image)[0] for image in images]
    for level in (Referral.URGENT, Referral.ROUTINE):
        if level in levels:
            return level
    if levels and all(level == Referral.UNGRADABLE for level in levels):
        return Referral.UNGRADABLE
    return Referral.NONE if levels else Referral.UNGRADABLE


def impression(images: list[ImageAnalysis], model_ran: bool) -> str:
    """A short impression: per eye, the referral reasons or 'no referable findings', and the conditions the model
    was not trained to assess (never implied absent)."""
    lines: list[str] = []
    for image in images:
        eye = _EYE.get(image.laterality.value, f"Image {image.sop_instance_uid or image.file_path}")
        level, reasons = image_referral(image)
        missing = not_assessed(image)
        if level == Referral.NONE:
            text = "no referable findings" + (" among the conditions assessed" if missing else "")
        else:
            text = "; ".join(reasons)
        if missing:
            text += "; not assessed: " + ", ".join(condition_name(c).lower() for c in missing)
        lines.append(f"{eye}: {text}.")
    referral = study_referral(images)
    lines.append(f"Referral: {referral.value}.")
    if not model_ran:
        lines.append("RetinalGPT was not run; findings come from the measurement pipeline only.")
    return " ".join(lines)
