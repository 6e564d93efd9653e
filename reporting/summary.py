"""Human-readable wording shared by the SR notes, the key image, the PDF and the FHIR conclusion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model.schema import Condition, Finding, ImageAnalysis, Measurement, StudyAnalysis, max_grade
from reporting import codes

NOT_VERIFIED = "AI result, not verified by a clinician."
NO_MODEL = "RetinalGPT was not run for this study: no AI findings; measured results only."

ICDR_NAMES = ("no apparent DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR")
EYE_NAMES = {"R": "right eye", "L": "left eye"}


def notes(analysis: StudyAnalysis, unmatched: Sequence[ImageAnalysis] = ()) -> list[str]:
    """Statements every result object carries: not verified, model absence, analysis notes, skipped images."""
    out = [NOT_VERIFIED]
    if analysis.model is None:
        out.append(NO_MODEL)
    out += [n for n in analysis.notes if n not in out]
    out += [
        f"Image {img.file_path or img.sop_instance_uid} has no source instance; not referenced."
        for img in unmatched
    ]
    return out


def finding_text(finding: Finding) -> str:
    """``Diabetic retinopathy: grade 2 (moderate NPDR), p=0.91``."""
    name = codes.CONDITIONS[finding.condition].meaning
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
    return f"{name}: {', '.join(parts) or 'not assessed'}"


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
    vessel = "" if m.vessel.value == "all" else f" {m.vessel.value}"
    zone = "" if m.zone.value == "whole" else f" zone {m.zone.value}"
    reference, flag = "", ""
    if feature.low is not None and feature.high is not None and m.unit in {"1", "um", "%"}:
        reference = f"{feature.low:g}–{feature.high:g}"
        flag = "low" if m.value < feature.low else "high" if m.value > feature.high else "normal"
    return MeasurementRow(
        name=f"{feature.code.meaning}{vessel}{zone}",
        value=f"{m.value:.4g}",
        unit="" if m.unit == "1" else m.unit.replace("um", "µm"),
        source="model estimate" if m.source.value == "model" else "measured",
        reference=reference,
        flag=flag,
    )


def image_title(img: ImageAnalysis) -> str:
    side = EYE_NAMES.get(img.laterality.value, "eye unknown")
    quality = f", quality {img.quality.grade.value} ({img.quality.score:.2f})" if img.quality else ""
    return f"{side.capitalize()}{quality}"


def conclusion(analysis: StudyAnalysis) -> str:
    """One paragraph: impression, referral, per-image main findings, and the notes."""
    lines: list[str] = []
    if analysis.impression:
        lines.append(analysis.impression.strip())
    lines.append(f"Referral: {analysis.referral.value}.")
    for img in analysis.images:
        present = [finding_text(f) for f in img.findings if f.present]
        lines.append(f"{image_title(img)}: {'; '.join(present) if present else 'no finding present'}.")
    lines += notes(analysis)
    return " ".join(lines)
