"""Human-readable wording shared by the SR notes, the key image, the PDF, the FHIR conclusion, the review page
and the CLI, and the rules every presentation of a result follows (docs/results.md):

* a condition the reading model was never trained to assess (``ImageAnalysis.not_assessed``) is presented as
  "not assessed", never as absent and never left out; an ungradable image is presented as "not gradable, no
  condition assessed", never as an image without findings;
* only measured numbers (``source = measured``) are presented as values. Numbers the model emitted stay in
  the analysis document and feed the model-vs-measured disagreement check, which is presented as a quality
  flag that names the feature and the measured value, not the model's number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from model.schema import (
    Condition,
    Disagreement,
    Finding,
    ImageAnalysis,
    Lesion,
    Measurement,
    Source,
    StudyAnalysis,
    VesselType,
    Zone,
    max_grade,
)
from reporting import codes
from reporting.verification import Verification, is_verified_note, verification_note

NOT_VERIFIED = "AI result, not verified by a clinician."
NO_MODEL = "RetinalGPT was not run for this study: no AI findings; measured results only."

NOT_ASSESSED = "not assessed"
UNGRADABLE = "Not gradable: no condition assessed"
MODEL_NOT_RUN = "RetinalGPT not run: no AI finding"

ICDR_NAMES = ("no apparent DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR")
EYE_NAMES = {"R": "right eye", "L": "left eye"}


def verification_statement(verification: Verification | None) -> str:
    """:data:`NOT_VERIFIED` for an unsigned result; the clinician's verification of a signed one
    (:func:`reporting.verification.verification_note`)."""
    return NOT_VERIFIED if verification is None else verification_note(verification)


def notes(analysis: StudyAnalysis, unmatched: Sequence[ImageAnalysis] = ()) -> list[str]:
    """Statements every result object carries: not verified (or the clinician's verification of a signed
    result, :mod:`reporting.verification`), model absence, analysis notes, skipped images."""
    out = [] if any(is_verified_note(n) for n in analysis.notes) else [NOT_VERIFIED]
    if analysis.model is None:
        out.append(NO_MODEL)
    out += [n for n in analysis.notes if n not in out]
    out += [
        f"Image {img.file_path or img.sop_instance_uid} has no source instance; not referenced."
        for img in unmatched
    ]
    return out


def finding_text(finding: Finding) -> str:
    """``Diabetic retinopathy: grade 2 (moderate NPDR), p=0.91``; a grade the signing clinician set ends
    ``, set by the clinician``."""
    name = condition_name(finding.condition)
    parts: list[str] = []
    if finding.grade is not None:
        if finding.condition == Condition.DIABETIC_RETINOPATHY:
            parts.append(f"grade {finding.grade} ({ICDR_NAMES[finding.grade]})")
        elif max_grade(finding.condition) > 1:
            parts.append(f"grade {finding.grade}/{max_grade(finding.condition)}")
        else:
            parts.append("present" if finding.grade else "absent")
    if finding.probability is not None:
        parts.append(f"p={finding.probability:.2f}")
    if finding.source == Source.CLINICIAN:
        parts.append("set by the clinician")
    return f"{name}: {', '.join(parts) or NOT_ASSESSED}"


def condition_name(condition: Condition) -> str:
    """``Age-related macular degeneration`` (the meaning of the condition's code)."""
    return codes.CONDITIONS[condition].meaning


def graded(img: ImageAnalysis) -> bool:
    """True unless the image's quality check found it not gradable (then nothing was assessed on it)."""
    return img.quality is None or img.quality.gradable


def not_assessed(img: ImageAnalysis) -> list[Condition]:
    """The conditions to present as not assessed: those the reading model was not trained on, on a gradable
    image (an ungradable image is presented as ungradable as a whole)."""
    return list(img.not_assessed) if graded(img) else []


def not_assessed_text(img: ImageAnalysis) -> str:
    """``Not assessed (model not trained on them): glaucoma, cataract`` (empty when none)."""
    names = [condition_name(c).lower() for c in not_assessed(img)]
    if not names:
        return ""
    return f"Not assessed (model not trained on {'it' if len(names) == 1 else 'them'}): {', '.join(names)}"


def image_summary(analysis: StudyAnalysis, img: ImageAnalysis) -> list[str]:
    """What the result of one image says: its present findings (or that none is present among the conditions
    assessed) and its not-assessed conditions; an ungradable image or one the model did not read says so."""
    if not img.findings and not graded(img):
        return [UNGRADABLE]
    if not img.findings and analysis.model is None:
        return [MODEL_NOT_RUN]
    missing = not_assessed_text(img)
    lines = [finding_text(f) for f in img.findings if f.present]
    if not lines:
        lines.append("No AI finding present" + (" among the conditions assessed" if missing else ""))
    if missing:
        lines.append(missing)
    return lines


def image_text(analysis: StudyAnalysis, img: ImageAnalysis) -> str:
    """``Right eye, quality gradable (0.88): <image_summary joined>.``"""
    return f"{image_title(img)}: {'; '.join(image_summary(analysis, img))}."


def reported_measurements(img: ImageAnalysis) -> list[Measurement]:
    """The measurements a report presents as values: measured ones with a finite value. Model-emitted numbers
    (``source = model``) are kept in the analysis document and for the disagreement check only."""
    return [m for m in img.measurements if m.source == Source.MEASURED and math.isfinite(m.value)]


def feature_name(key: str, vessel: VesselType = VesselType.ALL, zone: Zone = Zone.WHOLE) -> str:
    """``Central retinal artery equivalent (Knudtson) artery zone C``."""
    vessel_text = "" if vessel == VesselType.ALL else f" {vessel.value}"
    zone_text = "" if zone == Zone.WHOLE else f" zone {zone.value}"
    return f"{codes.feature(key).code.meaning}{vessel_text}{zone_text}"


def disagreement_text(d: Disagreement) -> str:
    """The quality flag of a model-vs-measured disagreement: the feature, the measured value and the
    tolerance; the model's own number is not presented."""
    name = feature_name(d.key, d.vessel, d.zone).lower()
    return (
        f"Quality flag: the model's estimate of {name} disagrees with the measured value "
        f"{d.measured_value:g} by more than the tolerance {d.tolerance:g}."
    )


@dataclass(frozen=True)
class MeasurementRow:
    """One measurement line with its reference range verdict."""

    name: str
    value: str
    unit: str
    source: str
    reference: str
    flag: str


def measurement_row(m: Measurement) -> MeasurementRow:
    feature = codes.feature(m.key)
    reference, flag = "", ""
    if feature.low is not None and feature.high is not None and m.unit in {"1", "um", "%"}:
        reference = f"{feature.low:g}–{feature.high:g}"
        flag = "low" if m.value < feature.low else "high" if m.value > feature.high else "normal"
    return MeasurementRow(
        name=feature_name(m.key, m.vessel, m.zone),
        value=f"{m.value:.4g}",
        unit="" if m.unit == "1" else m.unit.replace("um", "µm"),
        source="model estimate" if m.source.value == "model" else "measured",
        reference=reference,
        flag=flag,
    )


def clinician_lesion_text(lesion: Lesion) -> str:
    """``Haemorrhage drawn by the clinician at sign-off (missed by the AI), box [0.60, 0.30, 0.70, 0.40].``"""
    box = ", ".join(f"{v:.2f}" for v in lesion.box)
    return (f"{codes.LESIONS[lesion.type].meaning} drawn by the clinician at sign-off (missed by the AI), "
            f"box [{box}].")


def clinician_lesions(img: ImageAnalysis) -> list[Lesion]:
    """The lesion boxes of ``img`` the clinician drew (``Source.CLINICIAN``)."""
    return [lesion for lesion in img.lesions if lesion.source == Source.CLINICIAN]


def image_title(img: ImageAnalysis) -> str:
    side = EYE_NAMES.get(img.laterality.value, "eye unknown")
    quality = f", quality {img.quality.grade.value} ({img.quality.score:.2f})" if img.quality else ""
    return f"{side.capitalize()}{quality}"


def referral_text(analysis: StudyAnalysis) -> str:
    """``Referral: urgent.``, or ``Referral: urgent, set by the clinician.`` when she set it at sign-off."""
    by = ", set by the clinician" if analysis.referral_source == Source.CLINICIAN else ""
    return f"Referral: {analysis.referral.value}{by}."


def conclusion(analysis: StudyAnalysis) -> str:
    """One paragraph: impression, referral, per image the present findings and the conditions not assessed,
    the disagreement flags, and the notes."""
    lines: list[str] = []
    if analysis.impression:
        lines.append(analysis.impression.strip())
    lines.append(referral_text(analysis))
    for img in analysis.images:
        lines.append(image_text(analysis, img))
        lines += [disagreement_text(d) for d in img.disagreements]
    lines += notes(analysis)
    return " ".join(lines)
