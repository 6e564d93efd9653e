"""The RetinalGPT model directory: a transformers ``LlavaForConditionalGeneration`` directory plus ``retinalgpt.json``.

Layout (everything transformers / vLLM expect, so the directory also loads with ``from_pretrained``)::

    config.json                  LlavaConfig (CLIP vision tower, LLaMA text model, projector)
    model.safetensors            weights (possibly sharded with an index)
    generation_config.json
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    preprocessor_config.json     CLIP image processor settings (resize shortest edge, centre crop, normalise)
    retinalgpt.json              :class:`ModelMetadata`: conversation template, protocol version, label
                                 vocabularies, image size and image-token count, provenance

Torch is only imported by the functions that need it, so reading metadata is cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model import protocol
from model.schema import Condition, LesionType, max_grade
from model.template import NATIVE_TEMPLATE, ConversationTemplate, TemplateError

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

METADATA_FILE = "retinalgpt.json"
FORMAT_VERSION = 1
EFFICIENTNET_LITE_TYPE = "retinalgpt_efficientnet_lite"
"""``vision_config.model_type`` of the EfficientNet-Lite tower (:mod:`model.vision.efficientnet_lite`)."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CheckpointError(ValueError):
    """A model directory is missing, incomplete or inconsistent; the message says what and where."""


class ImageSpec(BaseModel):
    """How images are turned into pixel values (CLIP preprocessing) and how many image tokens they become."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(gt=0, description="square input size of the vision tower, px")
    image_tokens: int = Field(gt=0, description="image tokens one image expands to")
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    framing: Literal["centre_crop", "fov_square"] = Field(
        default="centre_crop",
        description='"centre_crop": CLIP preprocessing (resize the shortest edge, centre crop); "fov_square": the '
        "field of view's bounding square (model.vision.preprocess.fov_square)",
    )


class Calibration(BaseModel):
    """Post-hoc calibration of one assessment question (Guo et al., ICML 2017 temperature scaling, with a bias on
    the first answer — for yes/no questions exactly Platt scaling, Platt 1999): calibrated P(answer k) =
    softmax_k(ℓ_k / temperature + bias·[k = 0]) where ℓ_k is the answer's log-likelihood. Fitted by maximum
    likelihood on a validation split carved from the training data (never on test data)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(default=1.0, gt=0)
    bias: float = 0.0
    fitted_on: int = Field(default=0, ge=0, description="validation images the parameters were fitted on")

    def apply(self, log_likelihoods: list[float]) -> list[float]:
        """Calibrated answer probabilities from the answers' log-likelihoods."""
        scaled = [v / self.temperature + (self.bias if k == 0 else 0.0) for k, v in enumerate(log_likelihoods)]
        top = max(scaled)
        weights = [math.exp(v - top) for v in scaled]
        total = sum(weights)
        return [w / total for w in weights]


class Assessment(BaseModel):
    """The complete assessment a model was trained for (model.protocol.AssessmentQuestion): every listed
    condition and lesion type is asked of every gradable image and scored by likelihood; conditions of the
    vocabulary not listed are reported as not assessed."""

    model_config = ConfigDict(extra="forbid")

    conditions: list[Condition] = Field(min_length=1)
    lesions: list[str] = Field(default_factory=list, description="lesion types (and 'any') with a presence question")
    calibration: dict[str, Calibration] = Field(
        default_factory=dict, description="per question key (condition:<key> / lesion:<key>); identity if absent"
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="operating points on calibrated probabilities, per condition key (P(present) ≥ t ⇒ present; "
        "for referable_diabetic_retinopathy, P(DR grade ≥ 2) ≥ t ⇒ referable); 0.5 if absent",
    )

    @field_validator("conditions")
    @classmethod
    def _asked(cls, conditions: list[Condition]) -> list[Condition]:
        unknown = [c.value for c in conditions if c not in protocol.DISEASE_CONDITIONS]
        if unknown:
            raise ValueError(f"conditions without an assessment question: {unknown}")
        return conditions

    @field_validator("lesions")
    @classmethod
    def _lesion_keys(cls, lesions: list[str]) -> list[str]:
        known = {t.value for t in LesionType} | {protocol.ANY_LESION}
        unknown = [k for k in lesions if k not in known]
        if unknown:
            raise ValueError(f"unknown lesion keys: {unknown}")
        return lesions

    @field_validator("thresholds")
    @classmethod
    def _unit(cls, thresholds: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in thresholds.items() if not 0.0 < v < 1.0}
        if bad:
            raise ValueError(f"thresholds must lie strictly between 0 and 1: {bad}")
        return thresholds

    def questions(self) -> list[protocol.AssessmentQuestion]:
        """The questions asked of every gradable image: conditions in answer order, then lesion types."""
        ordered = [c for c in protocol.DISEASE_CONDITIONS if c in self.conditions]
        return [protocol.condition_question(c) for c in ordered] + [protocol.lesion_question(k) for k in self.lesions]

    def calibration_for(self, key: str) -> Calibration:
        return self.calibration.get(key, Calibration())

    def threshold(self, condition: Condition | str) -> float:
        return self.thresholds.get(str(getattr(condition, "value", condition)), 0.5)


def default_vocabularies() -> dict[str, Any]:
    """The label vocabularies of the current protocol (stored so a model directory says what it was taught)."""
    return {
        "conditions": {c.value: max_grade(c) for c in protocol.DISEASE_CONDITIONS},
        "lesion_types": [t.value for t in LesionType],
        "vascular_features": list(protocol.VASCULAR_FEATURES),
        "modalities": list(protocol.MODALITIES),
        "quality": {g.value: w for g, w in protocol.QUALITY_WORDS.items()},
    }


class ModelMetadata(BaseModel):
    """Contents of ``retinalgpt.json``."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str = "retinalgpt"
    version: str = "0"
    preset: str | None = None
    protocol_version: str = protocol.PROTOCOL_VERSION
    answer_format: Literal["canonical", "free"] = Field(
        default="free",
        description='"canonical": trained on model.protocol.render_answer, so answers may be decoded under '
        "model.grammar; \"free\": writes its own prose (imported or random weights)",
    )
    template: dict[str, Any] = Field(
        default_factory=NATIVE_TEMPLATE.to_dict,
        description="conversation template (model.template.ConversationTemplate); every string overridable",
    )
    image: ImageSpec
    vocabularies: dict[str, Any] = Field(default_factory=default_vocabularies)
    assessment: Assessment | None = Field(
        default=None,
        description="complete-assessment questions, calibration and operating points; None for models that state "
        "their findings in one generated disease answer (imported or older models)",
    )
    provenance: dict[str, Any] = Field(
        default_factory=dict, description="source, import format, training run, data"
    )

    @field_validator("template")
    @classmethod
    def _valid_template(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            ConversationTemplate.from_dict(value)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        return value

    def conversation(self) -> ConversationTemplate:
        return ConversationTemplate.from_dict(self.template)


def read_metadata(path: Path) -> ModelMetadata:
    """Read ``retinalgpt.json`` of a model directory; :class:`CheckpointError` when missing or invalid."""
    file = Path(path) / METADATA_FILE
    if not Path(path).is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    if not file.is_file():
        raise CheckpointError(f"{path} is not a RetinalGPT model directory: {METADATA_FILE} is missing")
    try:
        return ModelMetadata.model_validate_json(file.read_text(encoding="utf-8"))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'file'}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise CheckpointError(f"{file}: invalid metadata ({problems})") from None


def write_metadata(path: Path, metadata: ModelMetadata) -> None:
    (Path(path) / METADATA_FILE).write_text(metadata.model_dump_json(indent=2) + "\n", encoding="utf-8")


def weight_files(path: Path) -> list[Path]:
    """The safetensors weight files of a model directory, sorted."""
    return sorted(Path(path).glob("*.safetensors"))


def checkpoint_sha256(path: Path) -> str:
    """SHA-256 over the weight files (names and bytes, sorted by name): the identity of the weights."""
    files = weight_files(path)
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors weights")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars (they would corrupt CLI output and worker logs)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def device_uid(sha256: str) -> str:
    """The DICOM Device UID of a checkpoint: a UUID-derived UID ``2.25.<int>`` (PS3.5 §B.2) built from the first
    128 bits of the weights' SHA-256, so it changes whenever the weights change and is stable otherwise."""
    if len(sha256) < 32 or any(c not in "0123456789abcdef" for c in sha256.lower()):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"2.25.{int(sha256[:32], 16)}"


def save_model_dir(
    path: Path,
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    metadata: ModelMetadata,
    dtype: str | None = None,
) -> Path:
    """Write a complete model directory (weights as safetensors, optionally cast to ``dtype`` such as
    ``"float16"``) and return its path."""
    import torch
    from transformers import CLIPImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    with quiet_transformers():
        model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": metadata.image.size},
        crop_size={"height": metadata.image.size, "width": metadata.image.size},
        image_mean=list(metadata.image.mean),
        image_std=list(metadata.image.std),
    ).save_pretrained(path)
    write_metadata(path, metadata)
    return path


def tower_image_tokens(vision_config: dict[str, Any], select_strategy: str) -> int:
    """Image tokens a vision tower config gives LLaVA: the EfficientNet-Lite tower's global token and grid
    (:mod:`model.vision.efficientnet_lite`), else a ViT's patches (its CLS token dropped by the "default"
    strategy, kept by "full")."""
    if vision_config.get("model_type") == EFFICIENTNET_LITE_TYPE:
        return 1 + int(vision_config.get("token_grid", 6)) ** 2
    patches = (int(vision_config.get("image_size", 224)) // int(vision_config.get("patch_size", 14))) ** 2
    return patches if select_strategy == "default" else patches + 1


def validate_model_dir(path: Path) -> ModelMetadata:
    """Check that ``path`` is a complete, self-consistent model directory without loading weights; return its
    metadata. Raises :class:`CheckpointError` naming the first problem."""
    metadata = read_metadata(path)
    path = Path(path)
    for required in ("config.json", "tokenizer.json"):
        if not (path / required).is_file():
            raise CheckpointError(f"{path}: {required} is missing")
    if not weight_files(path):
        raise CheckpointError(f"{path}: no *.safetensors weights")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llava":
        raise CheckpointError(
            f"{path}: config.json model_type is {config.get('model_type')!r}, expected 'llava'"
        )
    vision = config.get("vision_config", {})
    if vision.get("image_size") != metadata.image.size:
        raise CheckpointError(
            f"{path}: vision tower image_size {vision.get('image_size')} differs from {METADATA_FILE} {metadata.image.size}"
        )
    tokens = tower_image_tokens(vision, config.get("vision_feature_select_strategy", "default"))
    if tokens != metadata.image.image_tokens:
        raise CheckpointError(
            f"{path}: the vision tower gives {tokens} image tokens but {METADATA_FILE} says {metadata.image.image_tokens}"
        )
    if metadata.protocol_version.split(".")[0] != protocol.PROTOCOL_VERSION.split(".")[0]:
        raise CheckpointError(
            f"{path}: protocol version {metadata.protocol_version} is not compatible with {protocol.PROTOCOL_VERSION}"
        )
    return metadata
