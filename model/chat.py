"""Conversation about a study: the stored results as system context, and a session that keeps the history.

``study_context(analysis) -> str`` summarises a :class:`~model.schema.StudyAnalysis` (per image: eye, quality,
graded findings with probabilities, lesion counts, key measurements; the impression and referral) in a few
lines that go into the system message, so RetinalGPT's answers stay consistent with the stored results.
``ChatSession(engine, image, context).ask(question) -> str`` keeps the (question, answer) history.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from model.schema import ImageAnalysis, Source, StudyAnalysis

if TYPE_CHECKING:
    from model.engine import RetinalGPTEngine

CONTEXT_MEASUREMENTS = (
    "CDR_vertical",
    "CDR_horizontal",
    "AVR_Knudtson_zone_b",
    "CRAE_Knudtson_zone_b",
    "CRVE_Knudtson_zone_b",
    "Fractal_dimension",
    "Vessel_density",
)
"""Measurements quoted in the context (the rest stay in the stored result)."""


def _image_line(index: int, image: ImageAnalysis) -> str:
    eye = {"R": "right eye", "L": "left eye"}.get(image.laterality.value, "eye unknown")
    parts = [f"Image {index} ({eye})"]
    if image.quality is not None:
        parts.append(f"quality {image.quality.grade.value}")
    findings = []
    for finding in image.findings:
        text = finding.condition.value.replace("_", " ")
        if finding.grade is not None:
            text += f" grade {finding.grade}"
        if finding.probability is not None:
            text += f" (p={finding.probability:.2f})"
        findings.append(text)
    if findings:
        parts.append("findings: " + ", ".join(findings))
    lesions = Counter(lesion.type.value.replace("_", " ") for lesion in image.lesions)
    if lesions:
        parts.append("lesions: " + ", ".join(f"{n} {kind}" for kind, n in sorted(lesions.items())))
    measured = []
    for key in CONTEXT_MEASUREMENTS:
        m = image.measurement(key, Source.MEASURED) or image.measurement(key)
        if m is not None:
            unit = "" if m.unit == "1" else f" {m.unit}"
            measured.append(f"{key} {m.value:.3f}{unit}")
    if measured:
        parts.append("measured: " + ", ".join(measured))
    if image.disagreements:
        parts.append(
            "model numbers differing from measurements: " + ", ".join(d.key for d in image.disagreements)
        )
    return "; ".join(parts) + "."


def study_context(analysis: StudyAnalysis) -> str:
    """The stored results of a study as a short text for the system message: the study-level lines (referral,
    impression) first, then one line per image, so that a prompt too long for the model loses image detail
    from the end before it loses the referral (:meth:`~model.engine.RetinalGPTEngine.ask` drops context lines
    from the end)."""
    lines = [f"Stored results of study {analysis.study_instance_uid} (revision {analysis.revision}); answer "
             "consistently with them.", f"Referral: {analysis.referral.value}."]
    if analysis.impression:
        lines.append(f"Impression: {analysis.impression}")
    lines += [_image_line(i, image) for i, image in enumerate(analysis.images, start=1)]
    return "\n".join(lines)


@dataclass
class ChatSession:
    """A conversation about one image with optional study context."""

    engine: RetinalGPTEngine
    image: np.ndarray
    context: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)

    def ask(self, question: str) -> str:
        answer = self.engine.ask(self.image, question, history=self.history, context=self.context)
        self.history.append((question, answer))
        return answer
