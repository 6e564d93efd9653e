"""Instruction data: records → hidden descriptions → multi-turn conversations in LLaVA JSON.

Each record becomes a hidden description (:class:`ImageLabels` from its labels, boxes and — when available —
the measurement pipeline's features), from which the deterministic generator writes one conversation of 3–6
turns: modality and quality, disease and grade (all labelled conditions), single-condition questions, vascular
measures, lesion locations, and lesion-presence yes/no questions. Answers are the runtime's canonical renderings
(:func:`model.protocol.render_answer`), so its parsers read every generated answer back to the labels it came
from. Questions are drawn from paraphrase banks with a seeded RNG per record, so a build is reproducible.

Stage 1 (alignment) gets one short caption per image. Output follows the LLaVA JSON convention: a list of
``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}], ...}`` with extra keys ``source``,
``split`` and ``tasks``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model import protocol
from model.protocol import ImageLabels, Task
from model.schema import Condition, LandmarkType, LesionType, QualityGrade
from training.records import Record

CAPTION_QUESTIONS: tuple[str, ...] = (
    "Describe this image briefly.",
    "Give a short description of this fundus photograph.",
    "Summarise what this image shows.",
    "What does this image show?",
)
"""Stage-1 alignment prompts; the caption is the modality sentence followed by the disease lines."""

VASCULAR_ANSWER_FEATURES: tuple[str, ...] = (
    "Fractal_dimension",
    "Vessel_density",
    "Average_width",
    "Distance_tortuosity",
    "Squared_curvature_tortuosity",
    "Tortuosity_density",
    "CDR_vertical",
)
"""Features a vascular answer carries (whole image, all vessels, and the vertical cup-to-disc ratio): short
answers fit the small presets' context; the protocol parser accepts any subset of its feature names."""


@dataclass(frozen=True)
class BuildOptions:
    seed: int = 0
    max_boxes_per_type: int = 4
    """Boxes per lesion type in a lesion answer, largest first (keeps answers within small models' context)."""
    min_turns: int = 3
    max_turns: int = 6
    feature_repeats: int = 1
    """Conversations per image with measured features (each with its own questions)."""
    vascular_features: tuple[str, ...] = VASCULAR_ANSWER_FEATURES
    assessment: bool = False
    """Conversations for a model trained for the complete assessment (training.assessment): no disease answer,
    no single-condition or lesion-presence turns — those questions are learnt, with partial labels masked, by the
    assessment stage — only modality and quality, vascular measures and lesion boxes."""


def _area(box: Sequence[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def hidden_description(record: Record, features: Mapping[str, float] | None = None,
                       quality: QualityGrade | None = None, options: BuildOptions = BuildOptions()) -> ImageLabels:
    """The labels a conversation about ``record`` may state (never more than the record and the measured
    features say)."""
    findings = {} if options.assessment else {
        c: g for c, g in record.grades.items() if c in protocol.DISEASE_CONDITIONS}
    measurements = {k: float(v) for k, v in (features or {}).items() if k in options.vascular_features}
    lesions: tuple[tuple[LesionType, tuple[float, float, float, float]], ...] | None = None
    lesion_boxes = [b for b in record.boxes if isinstance(b.label, LesionType)]
    if record.lesions or lesion_boxes:
        chosen: list[tuple[LesionType, tuple[float, float, float, float]]] = []
        for kind in LesionType:
            boxes = sorted((b.box for b in lesion_boxes if b.label == kind), key=_area, reverse=True)
            chosen += [(kind, box) for box in boxes[: options.max_boxes_per_type]]
        lesions = tuple(chosen)
    return ImageLabels(modality=protocol.DEFAULT_MODALITY, quality=quality or record.quality, findings=findings,
                       measurements=measurements, lesions=lesions)


def _rng(record: Record, seed: int, salt: str = "") -> random.Random:
    digest = hashlib.sha256(f"{seed}:{salt}:{record.key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class Turn:
    """One question/answer pair; ``kind`` is the protocol task or ``condition:<key>`` / ``lesion:<type>`` /
    ``lesion:any``."""

    kind: str
    question: str
    answer: str


def conversation_turns(record: Record, labels: ImageLabels, options: BuildOptions = BuildOptions(),
                       salt: str = "") -> list[Turn]:
    """The turns of one conversation (3–6 when the labels allow), deterministic for a record, seed and salt."""
    rng = _rng(record, options.seed, salt)
    protocol_turns = [Turn(task.value, rng.choice(protocol.QUESTIONS[task]), protocol.render_answer(task, labels))
                      for task in labels.tasks()]
    extra: list[Turn] = []
    if options.assessment:
        rng.shuffle(protocol_turns)
        return protocol_turns
    for condition, grade in labels.findings.items():
        name = protocol.CONDITION_NAMES[condition].lower()
        extra.append(Turn(f"condition:{condition.value}", rng.choice(protocol.CONDITION_QUESTIONS).format(name=name),
                          protocol.render_condition_line(condition, grade)))
    for kind, present in record.lesions.items():
        extra.append(Turn(f"lesion:{kind.value}", rng.choice(protocol.LESION_QUESTIONS).format(name=protocol.LESION_PLURALS[kind]),
                          protocol.YES if present else protocol.NO))
    if record.lesions:
        extra.append(Turn("lesion:any", rng.choice(protocol.ANY_LESION_QUESTIONS), protocol.YES if record.any_lesion() else protocol.NO))
    rng.shuffle(extra)
    wanted = rng.randint(options.min_turns, options.max_turns)
    turns = (protocol_turns + extra[: max(0, wanted - len(protocol_turns))])[: max(options.max_turns, len(protocol_turns))]
    # the engine asks every protocol question as the first turn, right after the image: every kind of turn must
    # open conversations, not only the modality question
    rng.shuffle(turns)
    return turns


def caption(labels: ImageLabels) -> str:
    """Stage-1 alignment caption: the modality/quality sentence and the disease lines."""
    parts = [protocol.render_answer(Task.MODALITY_QUALITY, labels)]
    if labels.findings:
        parts.append(protocol.render_answer(Task.DISEASE_GRADE, labels))
    return "\n".join(parts)


def llava_item(item_id: str, image: str, turns: Sequence[Turn], record: Record) -> dict[str, Any]:
    """One LLaVA JSON item; the image placeholder opens the first human message."""
    conversations: list[dict[str, str]] = []
    for index, turn in enumerate(turns):
        human = f"{protocol.IMAGE_TOKEN}\n{turn.question}" if index == 0 else turn.question
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": turn.answer}]
    return {"id": item_id, "image": image, "conversations": conversations, "source": record.dataset,
            "split": record.split, "tasks": [t.kind for t in turns]}


def parse_turn(kind: str, answer: str) -> Any:
    """Read an answer of turn ``kind`` back: protocol answers through :func:`model.protocol.parse_answer`,
    condition questions through the disease parser, presence questions as True/False (None if unreadable)."""
    if kind.startswith("condition:"):
        return protocol.parse_answer(Task.DISEASE_GRADE, answer)
    if kind.startswith("lesion:"):
        return {protocol.YES: True, protocol.NO: False}.get(answer.strip())
    return protocol.parse_answer(Task(kind), answer)


@dataclass
class BuildResult:
    instructions: list[dict[str, Any]] = field(default_factory=list)
    alignment: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    refused: Counter[str] = field(default_factory=Counter)


def content_key(path: Path) -> str:
    """SHA-256 of an image file's bytes (deduplication across datasets)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


FeatureSource = Callable[[Record], tuple[Mapping[str, float] | None, QualityGrade | None]]
TurnWriter = Callable[[Record, ImageLabels, Sequence[Turn]], Sequence[Turn]]


def build(records: Iterable[Record], options: BuildOptions = BuildOptions(), splits: Sequence[str] = ("train",),
          features: FeatureSource | None = None, writer: TurnWriter | None = None,
          image_path: Callable[[Record], str] = lambda r: str(r.image)) -> BuildResult:
    """Instruction and alignment items for the records in ``splits``. Evaluation-only records are refused for
    the train split; byte-identical images are kept once (first record wins, later labels merge in when they
    add conditions or lesions). ``writer`` may rewrite the deterministic turns (e.g. an LLM paraphraser)."""
    result = BuildResult()
    by_content: dict[str, Record] = {}
    order: list[str] = []
    for record in records:
        if record.split not in splits:
            continue
        if record.evaluation_only and record.split == "train":
            result.refused[record.dataset] += 1
            continue
        key = content_key(record.image)
        if key in by_content:
            result.duplicates += 1
            merge_labels(by_content[key], record)
            continue
        by_content[key] = record
        order.append(key)
    random.Random(options.seed).shuffle(order)  # measured features (limited per build) spread over sources
    for key in order:
        record = by_content[key]
        measured, quality = features(record) if features is not None else (None, None)
        labels = hidden_description(record, measured, quality, options)
        if not labels.tasks():
            continue
        item_id = f"{record.dataset}/{record.record_id}"
        for copy in range(options.feature_repeats if labels.measurements else 1):
            turns = conversation_turns(record, labels, options, salt=f"copy{copy}" if copy else "")
            if writer is not None:
                turns = list(writer(record, labels, turns))
            result.instructions.append(llava_item(item_id + (f"#{copy}" if copy else ""), image_path(record), turns, record))
        rng = _rng(record, options.seed, "caption")
        result.alignment.append(llava_item(item_id, image_path(record),
                                           [Turn("caption", rng.choice(CAPTION_QUESTIONS), caption(labels))], record))
        result.counts[record.dataset] += 1
    return result


def merge_labels(kept: Record, other: Record) -> None:
    """Add ``other``'s labels for conditions, lesions and boxes ``kept`` lacks (same photograph, two datasets)."""
    for condition, grade in other.grades.items():
        kept.grades.setdefault(condition, grade)
    for condition, present in other.present.items():
        kept.present.setdefault(condition, present)
    for kind, present in other.lesions.items():
        kept.lesions.setdefault(kind, present)
    if not any(isinstance(b.label, LesionType) for b in kept.boxes):
        kept.boxes += [b for b in other.boxes if isinstance(b.label, LesionType)]
    if not any(b.label == LandmarkType.OPTIC_DISC for b in kept.boxes):
        kept.boxes += [b for b in other.boxes if b.label == LandmarkType.OPTIC_DISC]


def write_json(items: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(items), indent=1) + "\n", encoding="utf-8")


def read_json(path: Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
