"""RetinalGPT question protocol: the questions, the canonical answers, strict parsers.

RetinalGPT (arXiv 2503.03987) was instruction-tuned on four kinds of question about a colour fundus photograph;
each is a :class:`Task`:

``modality_quality``  "This is a colour fundus photograph. Image quality: good."
``disease_grade``     one line per labelled condition, in :data:`DISEASE_CONDITIONS` order:
                      "Diabetic retinopathy: grade 2." (graded, :data:`model.schema.GRADE_SCALES`) or
                      "Glaucoma: absent." / "Glaucoma: present." (binary)
``vascular``          one line per feature, in :data:`VASCULAR_FEATURES` order, AutoMorph column names:
                      "{name} is {value:.3f}", e.g. "Fractal_dimension is 1.452"
``lesions``           one line per lesion type, in :class:`~model.schema.LesionType` order, boxes
                      ``[x_min, y_min, x_max, y_max]`` normalised to 0–1 with 4 decimals:
                      "Microaneurysm: [0.1200, 0.3400, 0.1300, 0.3500], [0.5000, 0.5000, 0.5100, 0.5200]."
                      or "No lesions detected."

Interfaces (used by the engine and by the training module to build instruction data):

* :class:`ImageLabels` — typed labels of one image (``None`` / empty = not labelled for that task).
* :func:`render_answer` ``(task, labels) -> str`` — the canonical answer text; :func:`question` ``(task)`` the
  inference question, :data:`QUESTIONS` ``[task]`` the question and its paraphrases for training.
* :func:`parse_answer` ``(task, text) -> ParsedAnswer`` — never raises. Reads the canonical form and the
  variants the paper's model writes (prose, British/American spelling, severity words, other separators).
  Lines it cannot read are reported in :attr:`ParsedAnswer.errors` (``ok`` is False) and contribute nothing;
  numbers mixed with box syntax, missing values, out-of-range grades/boxes are rejected, never guessed.
* Round trip: ``parse_answer(t, render_answer(t, labels)).labels() == labels.canonical()`` exactly, where
  :meth:`ImageLabels.canonical` rounds values to 3 decimals, boxes to 4 and groups lesions by type.
* The conversation templates that wrap questions and answers live in :mod:`model.template`
  (:class:`~model.template.ConversationTemplate`, and :data:`IMAGE_TOKEN`, the image placeholder the engine expands
  to the image tokens, are importable from here too).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from model import template
from model.schema import GRADE_SCALES, Condition, LesionType, QualityGrade, max_grade
from model.template import NATIVE_TEMPLATE

PROTOCOL_VERSION = "1.0"
IMAGE_TOKEN = template.IMAGE_TOKEN
ConversationTemplate = template.ConversationTemplate  # training builds its conversations through this module

Box = tuple[float, float, float, float]


class Task(StrEnum):
    """The four question kinds of the protocol, in the order the engine asks them."""

    MODALITY_QUALITY = "modality_quality"
    DISEASE_GRADE = "disease_grade"
    VASCULAR = "vascular"
    LESIONS = "lesions"


QUESTIONS: dict[Task, tuple[str, ...]] = {
    Task.MODALITY_QUALITY: (
        "What is the modality of this image and is its quality sufficient for grading?",
        "Which imaging modality is this, and how good is the image quality?",
        "Describe the image type and its quality.",
    ),
    Task.DISEASE_GRADE: (
        "Which retinal diseases does this fundus photograph show, and at what grade?",
        "Grade the retinal diseases visible in this image.",
        "What is the diagnosis and severity grade for this fundus image?",
    ),
    Task.VASCULAR: (
        "Report the quantitative vascular features of this fundus photograph.",
        "Measure the retinal vessels in this image.",
        "What are the vascular parameters of this retina?",
    ),
    Task.LESIONS: (
        "Locate the lesions in this fundus photograph as bounding boxes.",
        "Where are the lesions in this image?",
        "Detect and localise the retinal lesions.",
    ),
}
"""Per task: the inference question first, then paraphrases used to diversify training data."""


def question(task: Task) -> str:
    """The question the engine asks for ``task``."""
    return QUESTIONS[task][0]


# ---------------------------------------------------------------------------------------------------------------
# vocabularies

MODALITIES: tuple[str, ...] = (
    "colour fundus photograph",
    "wide-field colour fundus photograph",
    "fundus autofluorescence image",
    "fluorescein angiogram",
    "optical coherence tomography scan",
)
DEFAULT_MODALITY = MODALITIES[0]

QUALITY_WORDS: dict[QualityGrade, str] = {
    QualityGrade.GRADABLE: "good",
    QualityGrade.USABLE: "usable",
    QualityGrade.REJECT: "poor",
}

DISEASE_CONDITIONS: tuple[Condition, ...] = (
    Condition.DIABETIC_RETINOPATHY,
    Condition.DIABETIC_MACULAR_EDEMA,
    Condition.MYOPIC_MACULOPATHY,
    Condition.PATHOLOGIC_MYOPIA,
    Condition.GLAUCOMA,
    Condition.AGE_RELATED_MACULAR_DEGENERATION,
    Condition.RETINAL_VEIN_OCCLUSION,
    Condition.HYPERTENSIVE_RETINOPATHY,
    Condition.CATARACT,
)
"""Conditions the model answers about, in answer order. ``referable_diabetic_retinopathy`` is derived from the
diabetic retinopathy grade by the engine, never asked."""

CONDITION_NAMES: dict[Condition, str] = {
    Condition.DIABETIC_RETINOPATHY: "Diabetic retinopathy",
    Condition.DIABETIC_MACULAR_EDEMA: "Diabetic macular edema",
    Condition.MYOPIC_MACULOPATHY: "Myopic maculopathy",
    Condition.PATHOLOGIC_MYOPIA: "Pathologic myopia",
    Condition.GLAUCOMA: "Glaucoma",
    Condition.AGE_RELATED_MACULAR_DEGENERATION: "Age-related macular degeneration",
    Condition.RETINAL_VEIN_OCCLUSION: "Retinal vein occlusion",
    Condition.HYPERTENSIVE_RETINOPATHY: "Hypertensive retinopathy",
    Condition.CATARACT: "Cataract",
}

_CONDITION_ALIASES: dict[Condition, tuple[str, ...]] = {
    Condition.DIABETIC_RETINOPATHY: ("diabetic retinopathy", "dr"),
    Condition.DIABETIC_MACULAR_EDEMA: (
        "diabetic macular edema",
        "diabetic macular oedema",
        "macular edema",
        "macular oedema",
        "dme",
    ),
    Condition.MYOPIC_MACULOPATHY: ("myopic maculopathy",),
    Condition.PATHOLOGIC_MYOPIA: ("pathologic myopia", "pathological myopia"),
    Condition.GLAUCOMA: ("glaucoma", "glaucomatous optic neuropathy"),
    Condition.AGE_RELATED_MACULAR_DEGENERATION: (
        "age-related macular degeneration",
        "age related macular degeneration",
        "amd",
    ),
    Condition.RETINAL_VEIN_OCCLUSION: ("retinal vein occlusion", "rvo"),
    Condition.HYPERTENSIVE_RETINOPATHY: ("hypertensive retinopathy",),
    Condition.CATARACT: ("cataract",),
}

LESION_NAMES: dict[LesionType, str] = {
    LesionType.MICROANEURYSM: "Microaneurysm",
    LesionType.HAEMORRHAGE: "Haemorrhage",
    LesionType.HARD_EXUDATE: "Hard exudate",
    LesionType.SOFT_EXUDATE: "Soft exudate",
    LesionType.NEOVASCULARISATION: "Neovascularisation",
    LesionType.DRUSEN: "Drusen",
}

_LESION_ALIASES: dict[LesionType, tuple[str, ...]] = {
    LesionType.MICROANEURYSM: ("microaneurysm", "microaneurysms", "ma"),
    LesionType.HAEMORRHAGE: ("haemorrhage", "haemorrhages", "hemorrhage", "hemorrhages", "he"),
    LesionType.HARD_EXUDATE: ("hard exudate", "hard exudates", "ex"),
    LesionType.SOFT_EXUDATE: ("soft exudate", "soft exudates", "cotton wool spot", "cotton wool spots", "se"),
    LesionType.NEOVASCULARISATION: ("neovascularisation", "neovascularization", "nv"),
    LesionType.DRUSEN: ("drusen",),
}

_VASCULAR_BASE = (
    "Fractal_dimension",
    "Vessel_density",
    "Average_width",
    "Distance_tortuosity",
    "Squared_curvature_tortuosity",
    "Tortuosity_density",
)


def _vascular_features() -> tuple[str, ...]:
    keys: list[str] = []
    for zone in ("", "_zone_b", "_zone_c"):
        for vessel in ("", "Artery_", "Vein_"):
            keys.extend(f"{vessel}{base}{zone}" for base in _VASCULAR_BASE)
    for zone in ("_zone_b", "_zone_c"):
        for formula in ("Knudtson", "Hubbard"):
            keys.extend(f"{name}_{formula}{zone}" for name in ("CRAE", "CRVE", "AVR"))
    keys.extend(("Disc_height", "Disc_width", "Cup_height", "Cup_width", "CDR_vertical", "CDR_horizontal"))
    return tuple(keys)


VASCULAR_FEATURES: tuple[str, ...] = _vascular_features()
"""AutoMorph feature names the vascular answer may contain, in answer order."""

_FEATURE_BY_FOLDED = {k.lower(): k for k in VASCULAR_FEATURES}


def feature_unit(key: str) -> str:
    """UCUM unit of a model-emitted feature: widths, calibres and disc/cup sizes in pixels, the rest unitless."""
    pixel = ("Average_width", "CRAE_", "CRVE_", "Disc_height", "Disc_width", "Cup_height", "Cup_width")
    return "px" if any(p in key for p in pixel) else "1"


# ---------------------------------------------------------------------------------------------------------------
# complete assessment: one likelihood-scored question per condition and per lesion type

CONDITION_QUESTIONS: tuple[str, ...] = (
    "Does this fundus photograph show {name}?",
    "Is there evidence of {name} in this image?",
    "Grade {name} in this image.",
    "What is the {name} status of this eye?",
)
"""Single-condition questions (``{name}`` = the condition's name in lower case), the inference question first;
answered with the condition's canonical disease line (:func:`render_condition_line`)."""

LESION_PLURALS: dict[LesionType, str] = {
    LesionType.MICROANEURYSM: "microaneurysms",
    LesionType.HAEMORRHAGE: "haemorrhages",
    LesionType.HARD_EXUDATE: "hard exudates",
    LesionType.SOFT_EXUDATE: "soft exudates",
    LesionType.NEOVASCULARISATION: "neovascularisation",
    LesionType.DRUSEN: "drusen",
}

LESION_QUESTIONS: tuple[str, ...] = (
    "Are there any {name} in this image?",
    "Can you see {name} in this fundus photograph?",
    "Does this retina show {name}?",
)
"""Lesion-presence questions (``{name}`` from :data:`LESION_PLURALS`), the inference question first."""

ANY_LESION_QUESTIONS: tuple[str, ...] = (
    "Are there any lesions in this image?",
    "Does this fundus photograph show any retinal lesions?",
)

YES, NO = "Yes.", "No."
ANY_LESION = "any"
"""Key of the "any lesion" presence question (beside the :class:`LesionType` values)."""


@dataclass(frozen=True)
class AssessmentQuestion:
    """One question of the complete assessment: ``key`` is ``condition:<Condition>`` or ``lesion:<LesionType|any>``;
    ``questions`` the inference question first, then paraphrases; ``answers[k]`` the canonical answer meaning
    grade k (conditions: "<Name>: grade k." / "absent." / "present."; lesions: "No." = 0, "Yes." = 1). The model's
    probability of each answer is the softmax over the answers of their likelihoods after the question."""

    key: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]

    @property
    def question(self) -> str:
        return self.questions[0]

    @property
    def condition(self) -> Condition | None:
        kind, _, value = self.key.partition(":")
        return Condition(value) if kind == "condition" else None

    @property
    def lesion(self) -> str | None:
        kind, _, value = self.key.partition(":")
        return value if kind == "lesion" else None


def condition_question(condition: Condition) -> AssessmentQuestion:
    """The assessment question of a disease condition (:data:`DISEASE_CONDITIONS`)."""
    if condition not in DISEASE_CONDITIONS:
        raise ValueError(f"{condition} is not assessed by a question (derived or unknown)")
    name = CONDITION_NAMES[condition].lower()
    return AssessmentQuestion(
        key=f"condition:{condition.value}",
        questions=tuple(q.format(name=name) for q in CONDITION_QUESTIONS),
        answers=tuple(render_condition_line(condition, g) for g in range(max_grade(condition) + 1)),
    )


def lesion_question(kind: LesionType | str) -> AssessmentQuestion:
    """The presence question of a lesion type, or of any lesion (``kind`` = :data:`ANY_LESION`)."""
    if kind == ANY_LESION:
        return AssessmentQuestion(key=f"lesion:{ANY_LESION}", questions=ANY_LESION_QUESTIONS, answers=(NO, YES))
    lesion = LesionType(kind)
    return AssessmentQuestion(
        key=f"lesion:{lesion.value}",
        questions=tuple(q.format(name=LESION_PLURALS[lesion]) for q in LESION_QUESTIONS),
        answers=(NO, YES),
    )


# ---------------------------------------------------------------------------------------------------------------
# typed labels


@dataclass(frozen=True)
class ImageLabels:
    """What is known (or was answered) about one image, per task.

    ``findings`` maps a condition in :data:`DISEASE_CONDITIONS` to its grade (binary conditions 0/1);
    ``measurements`` maps a :data:`VASCULAR_FEATURES` name to its value; ``lesions`` is None when lesions are
    not labelled and an empty tuple when the image has none.
    """

    modality: str | None = None
    quality: QualityGrade | None = None
    findings: Mapping[Condition, int] = field(default_factory=dict)
    measurements: Mapping[str, float] = field(default_factory=dict)
    lesions: tuple[tuple[LesionType, Box], ...] | None = None

    def tasks(self) -> list[Task]:
        """The tasks these labels can answer."""
        out = []
        if self.modality is not None or self.quality is not None:
            out.append(Task.MODALITY_QUALITY)
        if self.findings:
            out.append(Task.DISEASE_GRADE)
        if self.measurements:
            out.append(Task.VASCULAR)
        if self.lesions is not None:
            out.append(Task.LESIONS)
        return out

    def canonical(self) -> ImageLabels:
        """These labels as an answer carries them: conditions and features in answer order, values rounded to
        3 decimals, box coordinates to 4, lesions grouped by type (stable)."""
        findings = {c: int(self.findings[c]) for c in DISEASE_CONDITIONS if c in self.findings}
        measurements = {
            k: round(float(self.measurements[k]), 3) for k in VASCULAR_FEATURES if k in self.measurements
        }
        lesions = None
        if self.lesions is not None:
            order = list(LesionType)
            grouped = sorted(self.lesions, key=lambda lesion: order.index(lesion[0]))
            lesions = tuple((t, _round_box(b)) for t, b in grouped)
        modality = self.modality if self.modality is not None or self.quality is None else DEFAULT_MODALITY
        return ImageLabels(modality, self.quality, findings, measurements, lesions)


def _round_box(box: Sequence[float]) -> Box:
    x0, y0, x1, y1 = (round(float(v), 4) for v in box)
    return (x0, y0, x1, y1)


# ---------------------------------------------------------------------------------------------------------------
# rendering


def render_answer(task: Task, labels: ImageLabels) -> str:
    """The canonical answer to ``task`` for ``labels``. Raises ValueError when the labels cannot answer it
    (check :meth:`ImageLabels.tasks`) or hold values outside the vocabularies."""
    return _RENDERERS[Task(task)](labels)


def _render_modality_quality(labels: ImageLabels) -> str:
    if labels.modality is None and labels.quality is None:
        raise ValueError("no modality or quality label")
    modality = labels.modality or DEFAULT_MODALITY
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}")
    text = f"This is a {modality}."
    if labels.quality is not None:
        text += f" Image quality: {QUALITY_WORDS[QualityGrade(labels.quality)]}."
    return text


def render_condition_line(condition: Condition, grade: int) -> str:
    """One line of the disease answer, e.g. "Diabetic retinopathy: grade 2." or "Glaucoma: absent."."""
    return f"{CONDITION_NAMES[condition]}: {grade_phrase(condition, grade)}."


def grade_phrase(condition: Condition, grade: int) -> str:
    """The value part of a disease line: "grade k" on a graded scale, "absent"/"present" for binary findings."""
    if condition not in DISEASE_CONDITIONS:
        raise ValueError(f"{condition} is not asked in the disease answer")
    if not 0 <= grade <= max_grade(condition):
        raise ValueError(f"{condition.value} grade {grade} is outside 0..{max_grade(condition)}")
    if condition in GRADE_SCALES:
        return f"grade {grade}"
    return "present" if grade else "absent"


def _render_disease(labels: ImageLabels) -> str:
    if not labels.findings:
        raise ValueError("no disease labels")
    unknown = [c for c in labels.findings if c not in DISEASE_CONDITIONS]
    if unknown:
        raise ValueError(f"conditions not asked in the disease answer: {unknown}")
    return "\n".join(
        render_condition_line(c, int(labels.findings[c])) for c in DISEASE_CONDITIONS if c in labels.findings
    )


def _render_vascular(labels: ImageLabels) -> str:
    if not labels.measurements:
        raise ValueError("no vascular labels")
    unknown = [k for k in labels.measurements if k not in _FEATURE_BY_FOLDED.values()]
    if unknown:
        raise ValueError(f"unknown vascular features: {unknown}")
    lines = []
    for key in VASCULAR_FEATURES:
        if key in labels.measurements:
            value = float(labels.measurements[key])
            if not math.isfinite(value):
                raise ValueError(f"{key} is not finite")
            lines.append(f"{key} is {value:.3f}")
    return "\n".join(lines)


def _render_lesions(labels: ImageLabels) -> str:
    if labels.lesions is None:
        raise ValueError("no lesion labels")
    if not labels.lesions:
        return "No lesions detected."
    lines = []
    for kind in LesionType:
        boxes = [_round_box(b) for t, b in labels.lesions if t == kind]
        for box in boxes:
            if not (0.0 <= box[0] <= box[2] <= 1.0 and 0.0 <= box[1] <= box[3] <= 1.0):
                raise ValueError(f"box {box} is not a normalised [x0, y0, x1, y1]")
        if boxes:
            rendered = ", ".join("[" + ", ".join(f"{v:.4f}" for v in box) + "]" for box in boxes)
            lines.append(f"{LESION_NAMES[kind]}: {rendered}.")
    return "\n".join(lines)


_RENDERERS = {
    Task.MODALITY_QUALITY: _render_modality_quality,
    Task.DISEASE_GRADE: _render_disease,
    Task.VASCULAR: _render_vascular,
    Task.LESIONS: _render_lesions,
}


# ---------------------------------------------------------------------------------------------------------------
# parsing


@dataclass(frozen=True)
class ParsedAnswer:
    """What a model answer says, read strictly. ``ok`` is False when any part could not be read; ``errors``
    names those parts; ``text`` keeps the answer verbatim."""

    task: Task
    text: str
    ok: bool
    errors: tuple[str, ...] = ()
    modality: str | None = None
    quality: QualityGrade | None = None
    findings: Mapping[Condition, int] = field(default_factory=dict)
    measurements: Mapping[str, float] = field(default_factory=dict)
    lesions: tuple[tuple[LesionType, Box], ...] | None = None

    def labels(self) -> ImageLabels:
        """The readable content as :class:`ImageLabels`."""
        return ImageLabels(
            self.modality, self.quality, dict(self.findings), dict(self.measurements), self.lesions
        )

    @property
    def error(self) -> str | None:
        """All errors in one line, or None."""
        return "; ".join(self.errors) if self.errors else None


def parse_answer(task: Task | str, text: str) -> ParsedAnswer:
    """Read ``text`` as an answer to ``task``. Never raises: anything unreadable is reported, not guessed."""
    try:
        kind = Task(task)
    except ValueError:
        return ParsedAnswer(Task.MODALITY_QUALITY, str(text), False, (f"unknown task {task!r}",))
    if not isinstance(text, str):
        return ParsedAnswer(kind, repr(text), False, ("answer is not text",))
    try:
        return _PARSERS[kind](text)
    except Exception as exc:  # noqa: BLE001 - the contract is "never raises"; a parser bug becomes a flagged answer
        return ParsedAnswer(kind, text, False, (f"parser failure: {type(exc).__name__}: {exc}",))


_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_SPLIT.split(text.strip()) if s.strip()]


def _snippet(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_MODALITY_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(?:ultra-?)?wide-?\s?field\b.*\bfundus\b"), "wide-field colour fundus photograph"),
    (re.compile(r"\bautofluorescence\b|\bfaf\b"), "fundus autofluorescence image"),
    (re.compile(r"\bangiogra(?:m|phy)\b|\bffa\b"), "fluorescein angiogram"),
    (re.compile(r"\boptical coherence tomography\b|\boct\b"), "optical coherence tomography scan"),
    (
        re.compile(
            r"\bcolou?r\s+fundus\b|\bfundus\s+(?:photo(?:graph)?|image|picture)\b|\bcfp\b|\bretinal photograph\b"
        ),
        DEFAULT_MODALITY,
    ),
)

_QUALITY_PATTERNS: tuple[tuple[re.Pattern[str], QualityGrade], ...] = (
    (
        re.compile(r"\b(?:poor|bad|ungradable|insufficient|inadequate|unacceptable|reject(?:ed)?|low)\b"),
        QualityGrade.REJECT,
    ),
    (re.compile(r"\b(?:usable|adequate|fair|acceptable|moderate)\b"), QualityGrade.USABLE),
    (re.compile(r"\b(?:good|gradable|excellent|high|sufficient)\b"), QualityGrade.GRADABLE),
)


def _parse_modality_quality(text: str) -> ParsedAnswer:
    modality: str | None = None
    quality: QualityGrade | None = None
    errors: list[str] = []
    for sentence in _sentences(text):
        low = sentence.lower()
        if "quality" in low:
            grades = {
                g for pattern, g in _QUALITY_PATTERNS if pattern.search(low.split("quality", 1)[1] or low)
            }
            grades = grades or {g for pattern, g in _QUALITY_PATTERNS if pattern.search(low)}
            if len(grades) == 1 and (quality is None or quality in grades):
                quality = grades.pop()
            else:
                errors.append(f"unreadable quality: {_snippet(sentence)!r}")
            low = low.split("quality", 1)[0]
        found = {name for pattern, name in _MODALITY_PATTERNS if pattern.search(low)}
        if DEFAULT_MODALITY in found and len(found) > 1:
            found.discard(DEFAULT_MODALITY)
        if len(found) == 1:
            name = found.pop()
            if modality not in (None, name):
                errors.append(f"two modalities: {modality!r} and {name!r}")
            modality = name
        elif len(found) > 1:
            errors.append(f"ambiguous modality: {_snippet(sentence)!r}")
    if modality is None and quality is None and not errors:
        errors.append("no modality or quality found")
    return ParsedAnswer(
        Task.MODALITY_QUALITY, text, not errors, tuple(errors), modality=modality, quality=quality
    )


_CANONICAL_CONDITION = re.compile(r"^\s*(?P<name>[A-Za-z][A-Za-z \-]*?)\s*:\s*(?P<value>.*?)\s*\.?\s*$")
_GRADE_VALUE = re.compile(r"^(?:grade|stage|level)\s*(?P<grade>" + _NUMBER + r")$", re.IGNORECASE)
_BINARY_VALUES = {"present": 1, "yes": 1, "positive": 1, "absent": 0, "no": 0, "negative": 0, "none": 0}
_NEGATION = re.compile(
    r"\b(?:no|not|without|absence of|negative for|free of|rules? out|no signs? of|no evidence of)\b"
)
_DR_SEVERITY = (
    (re.compile(r"\bno (?:apparent |signs? of )?(?:diabetic retinopathy|dr)\b"), 0),
    (re.compile(r"\bmild\b"), 1),
    (re.compile(r"\bmoderate\b"), 2),
    (re.compile(r"\bsevere\b"), 3),
    (re.compile(r"\b(?<!non-)(?<!non )proliferative\b|\bpdr\b"), 4),
)
_PRESENCE = re.compile(
    r"\b(?:present|shows?|showing|signs? of|evidence of|consistent with|detected|diagnosed|suggestive of|visible|"
    r"indicates?|indicating|has|with)\b"
)
_GRADE_IN_TEXT = re.compile(r"\b(?:grade|stage|level)\s*(?P<grade>" + _NUMBER + r")\b")


def _condition_for(name: str) -> Condition | None:
    low = " ".join(name.lower().replace("_", " ").split())
    for condition, aliases in _CONDITION_ALIASES.items():
        if low in aliases:
            return condition
    return None


def _conditions_mentioned(low: str) -> list[Condition]:
    found = []
    for condition, aliases in _CONDITION_ALIASES.items():
        if any(re.search(r"(?<![\w-])" + re.escape(a) + r"(?![\w-])", low) for a in aliases):
            found.append(condition)
    if Condition.DIABETIC_MACULAR_EDEMA in found and Condition.DIABETIC_RETINOPATHY in found:
        without_dme = low.replace("diabetic macular", "")
        if not any(
            re.search(r"(?<![\w-])" + re.escape(a) + r"(?![\w-])", without_dme)
            for a in _CONDITION_ALIASES[Condition.DIABETIC_RETINOPATHY]
        ):
            found.remove(Condition.DIABETIC_RETINOPATHY)
    return found


def _grade_from_value(condition: Condition, value: str) -> int | str:
    """The grade a canonical ``Name: value`` line states, or an error message."""
    low = value.strip().lower()
    if "[" in low or "]" in low:
        return "box syntax in a grade"
    match = _GRADE_VALUE.match(low)
    if match:
        return _checked_grade(condition, match.group("grade"))
    if low in _BINARY_VALUES and condition not in GRADE_SCALES:
        return _BINARY_VALUES[low]
    if re.fullmatch(_NUMBER, low):
        return _checked_grade(condition, low)
    if not low:
        return "missing value"
    return f"unreadable value {value!r}"


def _checked_grade(condition: Condition, number: str) -> int | str:
    try:
        grade_value = float(number)
    except ValueError:
        return f"unreadable grade {number!r}"
    if not grade_value.is_integer():
        return f"grade {number} is not an integer"
    grade_int = int(grade_value)
    if not 0 <= grade_int <= max_grade(condition):
        return f"{condition.value} grade {grade_int} is outside 0..{max_grade(condition)}"
    return grade_int


def _grade_from_prose(condition: Condition, low: str) -> int | str:
    """The grade a free-text sentence states for ``condition`` (paper-style prose), or an error message."""
    match = _GRADE_IN_TEXT.search(low)
    if match:
        return _checked_grade(condition, match.group("grade"))
    if condition == Condition.DIABETIC_RETINOPATHY:
        grades = {g for pattern, g in _DR_SEVERITY if pattern.search(low)}
        if grades == {0} or (not grades and _NEGATION.search(low)):
            return 0
        if len(grades) == 1:
            return grades.pop()
        if not grades:
            return "diabetic retinopathy mentioned without a grade"
        return f"conflicting severities in {_snippet(low)!r}"
    if _NEGATION.search(low):
        return 0
    if condition not in GRADE_SCALES and _PRESENCE.search(low):
        return 1
    return f"{condition.value} mentioned without a grade"


def _parse_disease(text: str) -> ParsedAnswer:
    findings: dict[Condition, int] = {}
    errors: list[str] = []
    conflicted: set[Condition] = set()

    def record(condition: Condition, result: int | str, where: str) -> None:
        if isinstance(result, str):
            errors.append(f"{result}: {_snippet(where)!r}")
        elif condition in findings and findings[condition] != result:
            errors.append(f"{condition.value} given twice ({findings[condition]} and {result})")
            conflicted.add(condition)
        else:
            findings[condition] = result

    for sentence in _sentences(text):
        canonical = _CANONICAL_CONDITION.match(sentence)
        condition = _condition_for(canonical.group("name")) if canonical else None
        if canonical and condition is not None:
            value = canonical.group("value")
            result = _grade_from_value(condition, value)
            if isinstance(result, str) and result.startswith("unreadable value"):
                result = _grade_from_prose(condition, value.lower())
            record(condition, result, sentence)
            continue
        low = sentence.lower()
        if "[" in low:
            errors.append(f"box syntax in the disease answer: {_snippet(sentence)!r}")
            continue
        mentioned = _conditions_mentioned(low)
        if len(mentioned) == 1:
            record(mentioned[0], _grade_from_prose(mentioned[0], low), sentence)
        elif len(mentioned) > 1:
            for condition in mentioned:
                if _GRADE_IN_TEXT.search(low) or condition == Condition.DIABETIC_RETINOPATHY:
                    errors.append(f"several conditions in one sentence: {_snippet(sentence)!r}")
                    break
                record(condition, _grade_from_prose(condition, low), sentence)
    for condition in conflicted:
        findings.pop(condition, None)
    if not findings and not errors:
        errors.append("no condition found")
    return ParsedAnswer(Task.DISEASE_GRADE, text, not errors, tuple(errors), findings=findings)


_VASCULAR_LINE = re.compile(
    r"^\s*(?P<name>[A-Za-z][A-Za-z0-9_ \-]*?)\s*(?:\bis\b|=|:)\s*(?P<value>\S.*?)?\s*[.;,]?\s*$"
)
_VALUE_WITH_UNIT = re.compile(r"^(?P<number>" + _NUMBER + r")\s*(?:px|pixels?|µm|um)?$")
_VASCULAR_SPLIT = re.compile(r"\n+|;\s*|[,.]\s+(?=[A-Za-z])")


def _parse_vascular(text: str) -> ParsedAnswer:
    measurements: dict[str, float] = {}
    errors: list[str] = []
    conflicted: set[str] = set()
    for line in (p.strip() for p in _VASCULAR_SPLIT.split(text.strip())):
        if not line:
            continue
        if "[" in line or "]" in line:
            errors.append(f"box syntax in a vascular value: {_snippet(line)!r}")
            continue
        match = _VASCULAR_LINE.match(line)
        if match is None:
            if re.search(r"\d", line):
                errors.append(f"unreadable line: {_snippet(line)!r}")
            continue
        name = re.sub(r"^(?:the|a)\s+", "", match.group("name").strip(), flags=re.IGNORECASE)
        key = _FEATURE_BY_FOLDED.get("_".join(name.replace("-", " ").split()).lower())
        if key is None:
            if re.search(r"\d", line):
                errors.append(f"unknown feature {match.group('name')!r}")
            continue
        raw = (match.group("value") or "").strip().rstrip(".")
        number = _VALUE_WITH_UNIT.match(raw)
        if number is None:
            errors.append(f"{key}: missing or unreadable value {raw!r}" if raw else f"{key}: missing value")
            continue
        value = float(number.group("number"))
        if not math.isfinite(value):
            errors.append(f"{key}: value {raw!r} is not finite")
        elif key in measurements and measurements[key] != value:
            errors.append(f"{key} given twice ({measurements[key]} and {value})")
            conflicted.add(key)
        else:
            measurements[key] = value
    for key in conflicted:
        measurements.pop(key, None)
    if not measurements and not errors:
        errors.append("no vascular feature found")
    return ParsedAnswer(Task.VASCULAR, text, not errors, tuple(errors), measurements=measurements)


_LESION_LINE = re.compile(r"^\s*(?P<name>[A-Za-z][A-Za-z \-]*?)\s*:\s*(?P<boxes>.*?)\s*\.?\s*$")
_BOX = re.compile(
    r"\[\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*\]"
)
_NO_LESIONS = re.compile(r"^\s*no\s+(?:lesions?|abnormalit(?:y|ies))\b[^\d\[\]]*$", re.IGNORECASE)


def _lesion_for(name: str) -> LesionType | None:
    low = " ".join(name.lower().split())
    for kind, aliases in _LESION_ALIASES.items():
        if low in aliases:
            return kind
    return None


def _parse_boxes(kind: LesionType, raw: str) -> list[Box] | str:
    boxes: list[Box] = []
    rest = raw
    for match in _BOX.finditer(raw):
        x0, y0, x1, y1 = (float(v) for v in match.groups())
        if not (0.0 <= x0 <= x1 <= 1.0 and 0.0 <= y0 <= y1 <= 1.0):
            return f"box {match.group(0)} is not a normalised [x0, y0, x1, y1]"
        boxes.append((x0, y0, x1, y1))
        rest = rest.replace(match.group(0), " ", 1)
    leftover = re.sub(r"[\s,;.]|\band\b", "", rest)
    if leftover:
        return f"text mixed with boxes: {_snippet(raw)!r}"
    if not boxes:
        return f"{kind.value}: no box"
    return boxes


def _parse_lesions(text: str) -> ParsedAnswer:
    lesions: list[tuple[LesionType, Box]] = []
    errors: list[str] = []
    none_stated = False
    for line in (p.strip() for p in re.split(r"\n+|;\s*|(?<=\])\.\s+", text.strip())):
        if not line:
            continue
        if _NO_LESIONS.match(line):
            none_stated = True
            continue
        match = _LESION_LINE.match(line)
        kind = _lesion_for(match.group("name")) if match else None
        if kind is None:
            if re.search(r"\d|\[", line):
                errors.append(f"unreadable line: {_snippet(line)!r}")
            continue
        assert match is not None
        parsed = _parse_boxes(kind, match.group("boxes"))
        if isinstance(parsed, str):
            errors.append(parsed)
        else:
            lesions.extend((kind, box) for box in parsed)
    if none_stated and lesions:
        errors.append("'no lesions' contradicted by boxes")
    if not lesions and not none_stated and not errors:
        errors.append("no lesion statement found")
    found = tuple(lesions) if lesions or none_stated else None
    return ParsedAnswer(Task.LESIONS, text, not errors, tuple(errors), lesions=found)


_PARSERS = {
    Task.MODALITY_QUALITY: _parse_modality_quality,
    Task.DISEASE_GRADE: _parse_disease,
    Task.VASCULAR: _parse_vascular,
    Task.LESIONS: _parse_lesions,
}


def protocol_text() -> list[str]:
    """Every string the protocol can produce (questions, names, template) — tokenizer training text for ``tiny``."""
    texts = [NATIVE_TEMPLATE.system, NATIVE_TEMPLATE.sep, *NATIVE_TEMPLATE.roles]
    texts += [q for qs in QUESTIONS.values() for q in qs]
    texts += [f"This is a {m}." for m in MODALITIES]
    texts += [f"Image quality: {w}." for w in QUALITY_WORDS.values()]
    texts += [render_condition_line(c, g) for c in DISEASE_CONDITIONS for g in range(max_grade(c) + 1)]
    texts += [f"{k} is 0.123" for k in VASCULAR_FEATURES]
    texts += [f"{name}: [0.1234, 0.5678, 0.9012, 0.3456]." for name in LESION_NAMES.values()]
    texts.append("No lesions detected.")
    return texts
