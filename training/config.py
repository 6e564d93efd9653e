"""The training recipe: one TOML file read by ``retinalgpt train CONFIG`` (keys documented in docs/training.md).

Relative paths in the file are resolved against the file's folder.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetRef(_Section):
    """A dataset folder and the adapter that reads it (``training.adapters.ADAPTERS``)."""

    kind: str
    root: Path


class LlmSection(_Section):
    """Optional OpenAI-compatible chat endpoint that rephrases generated questions (training.llm)."""

    base_url: str
    model: str
    api_key_env: str | None = Field(default=None, description="environment variable holding the API key")
    temperature: float = Field(default=0.7, ge=0, le=2)


class DataSection(_Section):
    datasets: list[DatasetRef] = Field(default_factory=list)
    instructions: Path | None = Field(default=None, description="prebuilt LLaVA JSON (retinalgpt data build)")
    alignment: Path | None = Field(default=None, description="prebuilt stage-1 captions JSON")
    general: Path | None = Field(default=None, description="optional general-domain LLaVA JSON mixed into stage 2")
    general_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    features: bool = Field(default=False, description="vascular answers from the measurement pipeline")
    features_max_images: int = Field(default=200, ge=0)
    features_cache: Path | None = Field(default=None, description="feature cache folder (default <output>/cache/features)")
    features_repeats: int = Field(default=1, ge=1, description="conversations per image that has measured features")
    max_records_per_dataset: int | None = Field(default=None, ge=1)
    max_boxes_per_type: int = Field(default=4, ge=1, description="lesion boxes per type in a lesion answer")
    max_turns: int = Field(default=6, ge=3, le=6)
    validation_fraction: float = Field(
        default=0.15, ge=0.0, lt=1.0,
        description="share of each dataset's train split (by patient, else photograph) held out for the best-epoch "
        "choice, calibration and operating points (training.splits)",
    )
    llm: LlmSection | None = None
    seed: int = 0


class ModelSection(_Section):
    preset: str = "tiny"
    init: Path | None = Field(default=None, description="start from this model directory instead of a preset")
    language_init: Path | None = Field(
        default=None,
        description="take the language model, tokenizer and conversation template from this model directory (the "
        "preset's tower and projector stay new)",
    )
    name: str = "retinalgpt"
    version: str = "0"


class VisionStage(_Section):
    """Supervised multi-task pre-training of a randomly initialised vision tower (training.vision)."""

    enabled: bool = True
    epochs: int = Field(default=8, ge=0)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)


class TowerSection(_Section):
    """Fine-tuning of an ImageNet-initialised EfficientNet-Lite tower (training.tower); presets with that tower."""

    enabled: bool = True
    pretrained: Literal["imagenet", "none"] = "imagenet"
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    head_learning_rate: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    freeze_blocks: int = Field(default=8, ge=0, description="leading MBConv blocks kept at their ImageNet weights")
    views: int = Field(default=6, ge=1, description="augmented views per image computed once (view 0 unaugmented)")
    label_smoothing: float = Field(default=0.05, ge=0, lt=1)


class AssessmentSection(_Section):
    """The assessment stage (training.assessment), then calibration and operating points on the validation split."""

    enabled: bool = True
    epochs: float = Field(default=6.0, gt=0)
    batch_size: int = Field(default=16, ge=1, description="images per step (each brings its labelled questions)")
    learning_rate: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_fraction: float = Field(default=0.05, ge=0, le=1)
    generative_weight: float = Field(default=0.2, ge=0, description="weight of the answers' next-token loss")
    paraphrase_rate: float = Field(default=0.5, ge=0, le=1)
    conversations_per_step: int = Field(
        default=4, ge=0, description="protocol conversations (modality and quality, lesion boxes) mixed into each step")
    lesions: list[str] = Field(default_factory=lambda: ["haemorrhage", "hard_exudate", "any"])
    min_labelled: int = Field(default=50, ge=1, description="train images a condition needs to be assessed")
    calibrate: bool = True
    referable_sensitivity: float = Field(
        default=0.9, gt=0, lt=1,
        description="the referable-DR operating point: the highest threshold whose validation sensitivity reaches this")


class LanguageStage(_Section):
    """Stage 1 (alignment: projector only) or stage 2 (instruction tuning: projector + language model)."""

    enabled: bool = True
    epochs: float = Field(default=1.0, ge=0)
    batch_size: int = Field(default=8, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_fraction: float = Field(default=0.03, ge=0, le=1)
    max_length: int = Field(default=768, ge=16)
    lora: bool = False
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    balance: Literal["none", "sqrt"] = Field(
        default="none",
        description="none: every conversation once per epoch; sqrt: each epoch draws conversations with probability "
        "proportional to 1/sqrt(size of their stratum: source dataset and disease answer), so rare grades are seen "
        "more often",
    )


class RunSection(_Section):
    output: Path = Path("runs/tiny")
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(default=200, ge=1, description="optimizer steps between resumable checkpoints")
    cpu_threads: int | None = Field(default=None, ge=1)
    save_dtype: Literal["float16", "bfloat16", "float32"] = "float16"


class TrainConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    vision: VisionStage = Field(default_factory=VisionStage)
    tower: TowerSection = Field(default_factory=TowerSection)
    assessment: AssessmentSection = Field(default_factory=AssessmentSection)
    stage1: LanguageStage = Field(default_factory=lambda: LanguageStage(epochs=1, learning_rate=1e-3))
    stage2: LanguageStage = Field(default_factory=lambda: LanguageStage(epochs=3, learning_rate=5e-4))
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="after")
    def _has_data(self) -> TrainConfig:
        if not self.data.datasets and self.data.instructions is None:
            raise ValueError("data.datasets or data.instructions is required")
        return self


def _resolve(path: Path | None, base: Path) -> Path | None:
    return None if path is None else (path if path.is_absolute() else (base / path).resolve())


def load_config(path: Path) -> TrainConfig:
    """Read and validate a recipe; relative paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    config = TrainConfig.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    base = path.resolve().parent
    for ref in config.data.datasets:
        ref.root = _resolve(ref.root, base)  # type: ignore[assignment]
    config.data.instructions = _resolve(config.data.instructions, base)
    config.data.alignment = _resolve(config.data.alignment, base)
    config.data.general = _resolve(config.data.general, base)
    config.data.features_cache = _resolve(config.data.features_cache, base)
    config.model.init = _resolve(config.model.init, base)
    config.model.language_init = _resolve(config.model.language_init, base)
    config.run.output = _resolve(config.run.output, base)  # type: ignore[assignment]
    return config
