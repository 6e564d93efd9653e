"""``retinalgpt train CONFIG``: the staged recipe that produces a RetinalGPT model directory.

Stages, in order (each skippable in the recipe):

``vision``  supervised multi-task pre-training of a randomly initialised vision tower (:mod:`training.vision`);
``stage1``  alignment: the projector learns from image captions, vision tower and language model frozen;
``stage2``  instruction tuning: projector + language model (full, or LoRA adapters via peft merged at the end)
            on the multi-turn conversations, optionally mixed with general-domain conversations.

Runs under :class:`accelerate.Accelerator` (multi-GPU data parallel, bf16 on GPUs), with optional gradient
checkpointing, deterministic seeds, rich progress bars, resumable checkpoints every ``checkpoint_every``
optimizer steps (``<output>/checkpoints/``; a re-run of the same command continues where it stopped), loss
curves as PNG, and a final fp16 model directory with a model card (``<output>/model``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import ModelMetadata, read_metadata, save_model_dir
from training import instructions as inst
from training.adapters import load_dataset
from training.card import write_model_card
from training.config import LanguageStage, TrainConfig
from training.images import cached_pixels, square_resize
from training.records import Record
from training.sft import Example, collate, llava_loss, tokenize
from training.tasks import TASKS
from training.vision import FeatureSelection, MultiTaskProbe, VisionStageOptions, label_matrix, train_vision_tower

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, float], None]
"""``progress(stage, step, total, loss)``."""


@dataclass
class TrainState:
    """What a resumable checkpoint records besides weights and optimizer state."""

    stage: str = "vision"
    step: int = 0
    completed: list[str] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stratum(item: dict[str, Any]) -> str:
    """Sampling stratum of a LLaVA item: its source dataset and its disease answer (the label combination)."""
    answers = [turn["value"] for turn in item["conversations"][1::2]]
    disease = [a for kind, a in zip(item.get("tasks", ()), answers, strict=False) if kind == "disease_grade"]
    return f"{item.get('source', '')}|{disease[0] if disease else ''}"


def balanced_weights(strata: Sequence[str]) -> list[float]:
    """Per-item sampling weight 1/√(size of its stratum): a stratum of n items is drawn ∝ √n, between uniform
    over items (∝ n) and uniform over strata (∝ 1)."""
    sizes = Counter(strata)
    return [1.0 / math.sqrt(sizes[key]) for key in strata]


def load_records(config: TrainConfig) -> list[Record]:
    records: list[Record] = []
    for ref in config.data.datasets:
        found = load_dataset(ref.kind, ref.root)
        if config.data.max_records_per_dataset is not None:
            rng = random.Random(config.data.seed)
            by_split: dict[str, list[Record]] = {}
            for record in found:
                by_split.setdefault(record.split, []).append(record)
            found = [r for rs in by_split.values() for r in rng.sample(rs, min(len(rs), config.data.max_records_per_dataset))]
        records += found
    return records


def manifest_hashes(config: TrainConfig) -> dict[str, str]:
    """SHA-256 of each dataset's manifest/labels file (data provenance for the model card)."""
    out = {}
    for ref in config.data.datasets:
        for name in ("manifest.csv", "labels.csv"):
            path = Path(ref.root) / name
            if path.is_file():
                out[ref.kind] = hashlib.sha256(path.read_bytes()).hexdigest()
                break
    return out


def build_options(config: TrainConfig) -> inst.BuildOptions:
    data = config.data
    return inst.BuildOptions(seed=data.seed, max_boxes_per_type=data.max_boxes_per_type, max_turns=data.max_turns,
                             feature_repeats=data.features_repeats)


def features_cache_dir(config: TrainConfig) -> Path:
    return Path(config.data.features_cache or Path(config.run.output) / "cache" / "features")


def build_data(config: TrainConfig, records: Sequence[Record], output: Path,
               writer: inst.TurnWriter | None = None) -> inst.BuildResult:
    """The recipe's instruction and alignment data (``retinalgpt data build`` and the trainer share it), written
    to ``output`` as ``instructions.json``, ``alignment.json`` and ``summary.json``."""
    features = None
    if config.data.features:
        from training.features import FeatureCache

        features = FeatureCache(features_cache_dir(config), limit=config.data.features_max_images).lookup
    built = inst.build(records, build_options(config), features=features, writer=writer)
    inst.write_json(built.instructions, output / "instructions.json")
    inst.write_json(built.alignment, output / "alignment.json")
    (output / "summary.json").write_text(json.dumps(built_summary(built), indent=2) + "\n")
    return built


def built_summary(built: inst.BuildResult) -> dict[str, Any]:
    return {"conversations": len(built.instructions), "captions": len(built.alignment),
            "images_per_source": dict(built.counts), "duplicates_merged": built.duplicates,
            "evaluation_only_refused": dict(built.refused)}


class Trainer:
    """Runs a :class:`TrainConfig`; :meth:`run` returns the final model directory."""

    def __init__(self, config: TrainConfig, progress: Progress | None = None, command: str = "retinalgpt train CONFIG"):
        from accelerate import Accelerator

        self.config = config
        self.command = command
        self.progress = progress
        self.output = Path(config.run.output)
        self.output.mkdir(parents=True, exist_ok=True)
        if config.run.cpu_threads:
            torch.set_num_threads(config.run.cpu_threads)
        precision = config.run.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = Accelerator(mixed_precision=precision)
        seed_everything(config.run.seed)
        self.state = TrainState()

    # ------------------------------------------------------------------------------------------------ model
    def build_model(self) -> tuple[Any, Any, ModelMetadata]:
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        from model.presets import build_model

        if self.config.model.init is not None:
            path = self.config.model.init
            model = LlavaForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32)
            return model, AutoTokenizer.from_pretrained(path), read_metadata(path)
        return build_model(self.config.model.preset, seed=self.config.run.seed)

    # ------------------------------------------------------------------------------------------------ data
    def instruction_data(self, records: Sequence[Record]) -> tuple[list[dict], list[dict], dict[str, Any]]:
        data = self.config.data
        if data.instructions is not None:
            instructions = inst.read_json(data.instructions)
            alignment = inst.read_json(data.alignment) if data.alignment is not None else []
            return instructions, alignment, {"instructions": str(data.instructions)}
        built = build_data(self.config, records, self.output / "data")
        return built.instructions, built.alignment, built_summary(built)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _checkpoint_dir(self) -> Path:
        return self.output / "checkpoints"

    def save_checkpoint(self, model: Any, optimizer: Any | None, scheduler: Any | None) -> None:
        """Atomically write weights, optimizer/scheduler/RNG state and :class:`TrainState`."""
        final = self._checkpoint_dir() / "last"
        tmp = self._checkpoint_dir() / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        unwrapped = self.accelerator.unwrap_model(model)
        torch.save(unwrapped.state_dict(), tmp / "model.pt")
        extra = {"rng_torch": torch.get_rng_state(), "rng_numpy": np.random.get_state(), "rng_python": random.getstate()}
        if optimizer is not None:
            extra["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            extra["scheduler"] = scheduler.state_dict()
        torch.save(extra, tmp / "state.pt")
        (tmp / "train_state.json").write_text(json.dumps(self.state.__dict__))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def load_checkpoint(self) -> dict[str, Any] | None:
        last = self._checkpoint_dir() / "last"
        if not (last / "train_state.json").is_file():
            return None
        self.state = TrainState(**json.loads((last / "train_state.json").read_text()))
        extra = torch.load(last / "state.pt", weights_only=False)
        extra["model"] = torch.load(last / "model.pt", weights_only=True)
        return extra

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> Path:
        from model.presets import preset

        if self.config.model.init is None and preset(self.config.model.preset).tower == "efficientnet_lite":
            return self.run_assessment_recipe()
        config = self.config
        started = time.time()
        records = load_records(config)
        model, tokenizer, metadata = self.build_model()
        resume = self.load_checkpoint()
        if resume is not None:
            model.load_state_dict(resume["model"], strict=False)
            log.info("resuming at stage %s step %d (done: %s)", self.state.stage, self.state.step, self.state.completed)
        size = metadata.image.size
        selection = FeatureSelection(model.config.vision_feature_layer, model.config.vision_feature_select_strategy)
        if config.vision.enabled and "vision" not in self.state.completed:
            train_records = [r for r in records if r.split == "train" and not r.evaluation_only]
            self.vision_stage(model, train_records, metadata, resume)
            resume = None
        instructions, alignment, data_summary = self.instruction_data(records)
        images = sorted({item["image"] for item in instructions + alignment})
        index = {path: i for i, path in enumerate(images)}
        image_records = [Record(image=Path(p), dataset="instruction-images", record_id=str(i)) for i, p in enumerate(images)]
        pixels = cached_pixels(image_records, size, self.output / "cache" / "pixels",
                               preprocess=lambda rgb: square_resize(rgb, size))
        features = self.vision_features(model, pixels, metadata, selection)
        template = metadata.conversation()
        for name, stage, data in (("stage1", config.stage1, alignment), ("stage2", config.stage2, instructions)):
            if stage.enabled and name not in self.state.completed and data:
                if name == "stage2" and config.data.general is not None:
                    data = data + self.general_mix(len(data))
                examples = [tokenize(item, index[item["image"]], tokenizer, template, model.config.image_token_index,
                                     metadata.image.image_tokens, stage.max_length) for item in data]
                strata = [stratum(item) for item in data] if stage.balance == "sqrt" else None
                model = self.language_stage(name, stage, model, examples, strata, features, tokenizer, resume)
                resume = None
        self.plot_losses()
        metadata.name = config.model.name
        metadata.version = config.model.version
        if config.stage2.enabled:
            metadata.answer_format = "canonical"  # stage 2 teaches model.protocol's canonical answers
        metadata.provenance = {
            "source": f"retinalgpt train (preset {config.model.preset})" if config.model.init is None
            else f"retinalgpt train (init {config.model.init})",
            "recipe": json.loads(config.model_dump_json()),
            "data": data_summary,
            "data_manifests_sha256": manifest_hashes(config),
            "stage_seconds": self.state.seconds,
            "final_losses": {k: float(np.mean(v[-20:])) for k, v in self.state.losses.items() if v},
            "wall_seconds": round(time.time() - started, 1),
            "command": self.command,
        }
        model_dir = self.output / "model"
        model.eval()
        save_model_dir(model_dir, self.accelerator.unwrap_model(model), tokenizer, metadata, dtype=config.run.save_dtype)
        shutil.copy(self.output / "loss_curves.png", model_dir / "loss_curves.png")
        write_model_card(model_dir, self.command)
        return model_dir

    # ------------------------------------------------------------------------------------------------ pretrained tower
    def build_assessment_model(self) -> tuple[Any, Any, ModelMetadata]:
        """The preset with a new tower and projector; language model, tokenizer and template from
        ``model.language_init`` when given."""
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        from model.presets import build_model

        init = self.config.model.language_init
        if init is None:
            return build_model(self.config.model.preset, seed=self.config.run.seed)
        tokenizer = AutoTokenizer.from_pretrained(init)
        model, tokenizer, metadata = build_model(self.config.model.preset, seed=self.config.run.seed, tokenizer=tokenizer)
        source = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32).state_dict()
        own = model.state_dict()
        language = {k: v for k, v in source.items()
                    if k.startswith(("model.language_model.", "lm_head.")) and k in own and own[k].shape == v.shape}
        missing = [k for k in own if k.startswith(("model.language_model.", "lm_head.")) and k not in language]
        if missing:
            raise ValueError(f"{init}: its language model does not fit preset {self.config.model.preset} ({missing[0]})")
        model.load_state_dict(language, strict=False)
        metadata.template = read_metadata(init).template
        return model, tokenizer, metadata

    def run_assessment_recipe(self) -> Path:
        """tower (training.tower) → assessment (training.assessment) → calibration (training.calibration)."""
        from model.vision.efficientnet_lite import imagenet_weights_file, load_imagenet_state_dict
        from model.vision.preprocess import fov_square
        from training.splits import VALIDATION, carve_validation, unique_images
        from training.tower import TowerParts, TowerStageOptions, TowerViews, fine_tune_tower, precompute_views

        config = self.config
        started = time.time()
        pool = [r for r in load_records(config) if r.split == "train" and not r.evaluation_only]
        records = carve_validation(unique_images(pool), config.data.validation_fraction, config.data.seed)
        train = [r for r in records if r.split == "train"]
        validation = [r for r in records if r.split == VALIDATION]
        log.info("%d train and %d validation photographs", len(train), len(validation))
        model, tokenizer, metadata = self.build_assessment_model()
        tower = model.model.vision_tower
        size = metadata.image.size
        cache = self.output / "cache" / "pixels"
        train_pixels = cached_pixels(train, size, cache, preprocess=lambda rgb: fov_square(rgb, size), tag="fov_square")
        val_pixels = cached_pixels(validation, size, cache, preprocess=lambda rgb: fov_square(rgb, size),
                                   tag="fov_square")
        section = config.tower
        if section.pretrained == "imagenet":
            load_imagenet_state_dict(tower, torch.load(imagenet_weights_file(tower.config.variant), map_location="cpu"))
        options = TowerStageOptions(
            epochs=section.epochs, batch_size=section.batch_size, learning_rate=section.learning_rate,
            head_learning_rate=section.head_learning_rate, weight_decay=section.weight_decay,
            freeze_blocks=section.freeze_blocks, views=section.views, label_smoothing=section.label_smoothing,
            seed=config.run.seed)
        tower_started = time.time()
        saved = self.output / "tower.pt"
        history_file = self.output / "tower_validation.json"
        if saved.is_file():  # a re-run continues after a finished tower stage
            tower.load_state_dict(torch.load(saved, map_location="cpu"))
            parts = TowerParts(tower, options.freeze_blocks)
            views = TowerViews(parts, precompute_views(parts, train_pixels, options.views, options.seed),
                               precompute_views(parts, val_pixels, 1, options.seed)[0])
            history = json.loads(history_file.read_text())
            log.info("tower stage already done (%s); continuing with the assessment stage", saved)
        else:
            losses, history, views = fine_tune_tower(
                tower, train_pixels, label_matrix(train), val_pixels, label_matrix(validation), options,
                on_step=lambda step, total, loss: self._report("tower", step, total, loss),
                on_epoch=lambda epoch, aucs: log.info("tower epoch %d validation AUC %s", epoch,
                                                      {k: round(v, 3) for k, v in aucs.items()}))
            self.state.losses["tower"] = losses
            self.state.seconds["tower"] = round(time.time() - tower_started, 1)
            history_file.write_text(json.dumps(history, indent=2) + "\n")
            torch.save(tower.state_dict(), saved)
        train_tokens = torch.stack([views.tokens(views.train[v]) for v in range(options.views)])
        del views  # the frozen front's outputs (gigabytes) are not needed any more
        assessment = self.assessment_stage(model, tokenizer, metadata, train, train_tokens)
        metadata.assessment = assessment
        if config.assessment.calibrate:
            self.calibrate(model, tokenizer, metadata, validation)
        self.plot_losses()
        metadata.name = config.model.name
        metadata.version = config.model.version
        metadata.answer_format = "canonical"
        metadata.provenance = {
            "source": f"retinalgpt train (preset {config.model.preset}, ImageNet EfficientNet-Lite tower)",
            "recipe": json.loads(config.model_dump_json()),
            "data": {"train_images": len(train), "validation_images": len(validation),
                     "per_dataset": dict(Counter(r.dataset for r in train))},
            "data_manifests_sha256": manifest_hashes(config),
            "tower_validation_auc": history,
            "stage_seconds": self.state.seconds,
            "final_losses": {k: float(np.mean(v[-20:])) for k, v in self.state.losses.items() if v},
            "wall_seconds": round(time.time() - started, 1),
            "command": self.command,
        }
        model_dir = self.output / "model"
        model.eval()
        save_model_dir(model_dir, model, tokenizer, metadata, dtype=config.run.save_dtype)
        shutil.copy(self.output / "loss_curves.png", model_dir / "loss_curves.png")
        write_model_card(model_dir, self.command)
        return model_dir

    def assessment_stage(self, model: Any, tokenizer: Any, metadata: ModelMetadata, train: Sequence[Record],
                         tokens: torch.Tensor) -> Any:
        """Train projector + language model on the assessment questions (and protocol conversations); returns the
        :class:`~model.checkpoint.Assessment` the model was trained for. ``tokens``: views × images × T × D."""
        from model import protocol
        from model.checkpoint import Assessment
        from model.engine import RetinalGPTEngine
        from training.assessment import (allowed_answers, answer_log_likelihoods, assessment_loss,
                                         encode_questions, make_batch, question_weights)

        section = self.config.assessment
        candidates = Assessment(conditions=list(protocol.DISEASE_CONDITIONS), lesions=section.lesions).questions()
        labelled = [q for q in candidates if sum(allowed_answers(r, q) is not None for r in train) >= section.min_labelled]
        assessment = Assessment(conditions=[q.condition for q in labelled if q.condition is not None],
                                lesions=[q.lesion for q in labelled if q.lesion is not None])
        questions = assessment.questions()
        log.info("assessment questions: %s", [q.key for q in questions])
        engine = RetinalGPTEngine.from_model(model, tokenizer, metadata)
        sep = tokenizer.convert_tokens_to_ids(engine.template.sep)
        encoded = encode_questions(questions, lambda q: engine.encode(engine.template.prompt(q)),
                                   lambda q, a: engine.continuation(engine.template.prompt(q), a), sep)
        targets = [{i: a for i, q in enumerate(questions) if (a := allowed_answers(r, q)) is not None} for r in train]
        weights = question_weights(targets, len(questions))
        conversations = self._protocol_conversations(train, tokenizer, metadata, model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        trainable = [*model.model.multi_modal_projector.parameters(), *model.model.language_model.parameters(),
                     *model.lm_head.parameters()]
        for parameter in trainable:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(trainable, lr=section.learning_rate, weight_decay=section.weight_decay)
        usable = [i for i, t in enumerate(targets) if t]
        total = max(1, int(math.ceil(len(usable) * section.epochs / section.batch_size)))
        warmup = max(1, int(total * section.warmup_fraction))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
        rng = random.Random(self.config.run.seed)
        generator = torch.Generator().manual_seed(self.config.run.seed)
        model.train()
        model.model.vision_tower.eval()
        losses = self.state.losses.setdefault("assessment", [])
        started = time.time()
        order: list[int] = []
        pad = tokenizer.pad_token_id
        for step in range(1, total + 1):
            if len(order) < section.batch_size:
                order += rng.sample(usable, len(usable))
            chosen, order = order[:section.batch_size], order[section.batch_size:]
            view = torch.randint(0, tokens.shape[0], (len(chosen),), generator=generator)
            image_tokens = tokens[view, torch.tensor(chosen)].float()
            batch = make_batch(chosen, targets, encoded, weights, rng, section.paraphrase_rate)
            scores, full, counts = answer_log_likelihoods(model, image_tokens, batch, encoded,
                                                          model.config.image_token_index, pad)
            loss = assessment_loss(scores, full, counts, batch, section.generative_weight)
            if conversations and section.conversations_per_step:
                picked = rng.sample(conversations, min(section.conversations_per_step, len(conversations)))
                tensors = collate([Example(e.input_ids, e.labels, k) for k, e in enumerate(picked)], pad)
                conv_view = torch.randint(0, tokens.shape[0], (len(picked),), generator=generator)
                features = tokens[conv_view, torch.tensor([e.image_index for e in picked])].float()
                loss = loss + llava_loss(model, tensors, features)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            self._report("assessment", step, total, losses[-1])
        model.eval()
        self.state.seconds["assessment"] = round(time.time() - started, 1)
        return assessment

    def _protocol_conversations(self, train: Sequence[Record], tokenizer: Any, metadata: ModelMetadata,
                                model: Any) -> list[Example]:
        """Modality/quality and lesion-box conversations (no disease turns) of the train images, tokenised; each
        example's ``image_index`` is the image's position in ``train``."""
        options = inst.BuildOptions(seed=self.config.data.seed, max_boxes_per_type=self.config.data.max_boxes_per_type,
                                    max_turns=self.config.data.max_turns, assessment=True)
        built = inst.build(train, options, image_path=lambda r: r.key)
        position = {r.key: i for i, r in enumerate(train)}
        template = metadata.conversation()
        return [tokenize(item, position[item["image"]], tokenizer, template, model.config.image_token_index,
                         metadata.image.image_tokens, self.config.stage2.max_length) for item in built.instructions]

    def calibrate(self, model: Any, tokenizer: Any, metadata: ModelMetadata, validation: Sequence[Record]) -> None:
        """Fit each question's calibration and the referable-DR operating point on the validation split, through
        the engine exactly as inference runs (framing from the original files)."""
        from model import protocol
        from model.engine import EngineOptions, RetinalGPTEngine
        from model.schema import Condition
        from training.assessment import allowed_answers
        from training.calibration import fit_calibration, sensitivity_threshold
        from training.images import load_rgb

        assessment = metadata.assessment
        assert assessment is not None
        engine = RetinalGPTEngine.from_model(model.eval(), tokenizer, metadata, EngineOptions(device="cpu"))
        raw: list[dict[str, list[float]]] = []
        for start in range(0, len(validation), 16):
            images = [load_rgb(r.image) for r in validation[start:start + 16]]
            raw += engine.assessment_log_likelihoods(engine.image_features(images))
        for question in assessment.questions():
            rows = [(scores[question.key], a) for scores, r in zip(raw, validation, strict=True)
                    if (a := allowed_answers(r, question)) is not None]
            if rows:
                assessment.calibration[question.key] = fit_calibration([v for v, _ in rows], [a for _, a in rows])
        dr = protocol.condition_question(Condition.DIABETIC_RETINOPATHY)
        if raw and dr.key in raw[0]:
            labels, probabilities = [], []
            for scores, record in zip(raw, validation, strict=True):
                referable = record.grades.get(Condition.REFERABLE_DIABETIC_RETINOPATHY)
                if referable is None:
                    continue
                p = assessment.calibration_for(dr.key).apply(scores[dr.key])
                labels.append(int(referable))
                probabilities.append(sum(p[2:]))
            assessment.thresholds[Condition.REFERABLE_DIABETIC_RETINOPATHY.value] = sensitivity_threshold(
                labels, probabilities, self.config.assessment.referable_sensitivity)
        (self.output / "calibration.json").write_text(assessment.model_dump_json(indent=2) + "\n")

    def general_mix(self, n_domain: int) -> list[dict]:
        """General-domain conversations, ``general_fraction`` of the stage-2 mix (images must be readable)."""
        data = self.config.data
        assert data.general is not None
        general = inst.read_json(data.general)
        want = int(round(n_domain * data.general_fraction / max(1e-9, 1 - data.general_fraction)))
        rng = random.Random(data.seed)
        return rng.sample(general, min(want, len(general)))

    def vision_stage(self, model: Any, records: Sequence[Record], metadata: ModelMetadata,
                     resume: dict[str, Any] | None) -> None:
        config = self.config.vision
        size = metadata.image.size
        labelled = [r for r in records if any(t.label(r) is not None for t in TASKS)]
        pixels = cached_pixels(labelled, size, self.output / "cache" / "pixels",
                               preprocess=lambda rgb: square_resize(rgb, size))
        selection = FeatureSelection(model.config.vision_feature_layer, model.config.vision_feature_select_strategy)
        tower = model.model.vision_tower
        probe = MultiTaskProbe(tower, model.config.vision_config.hidden_size, TASKS, selection)
        self.state.stage = "vision"
        started = time.time()
        losses = train_vision_tower(
            probe, pixels, label_matrix(labelled), metadata.image.mean, metadata.image.std,
            VisionStageOptions(epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
                               weight_decay=config.weight_decay, seed=self.config.run.seed),
            on_step=lambda s, t, loss: self._report("vision", s, t, loss),
            device=self.accelerator.device,
        )
        tower.eval()
        self.probe_report(probe, metadata, selection)
        self.state.losses["vision"] = losses
        self.state.seconds["vision"] = round(time.time() - started, 1)
        self.state.completed.append("vision")
        self.state.step = 0
        self.save_checkpoint(model, None, None)

    def probe_report(self, probe: MultiTaskProbe, metadata: ModelMetadata, selection: FeatureSelection) -> None:
        """Test-split AUCs of the vision stage's linear heads (an upper bound for what the language model can
        read from the image tokens), written to ``<output>/vision_probe.json``."""
        from training.metrics import roc_auc
        from training.vision import predict

        records = [r for r in load_records(self.config) if r.split == "test"]
        if not records:
            return
        size = metadata.image.size
        pixels = cached_pixels(records, size, self.output / "cache" / "pixels", preprocess=lambda rgb: square_resize(rgb, size))
        probabilities = predict(probe, pixels, metadata.image.mean, metadata.image.std)
        labels = label_matrix(records)
        report: dict[str, dict[str, float]] = {}
        for j, task in enumerate(TASKS):
            if task.classes != 2:
                continue
            for dataset in sorted({r.dataset for r in records}):
                rows = [i for i, r in enumerate(records) if r.dataset == dataset and labels[i, j] >= 0]
                if len({int(labels[i, j]) for i in rows}) == 2:
                    report.setdefault(dataset, {})[task.name] = roc_auc(labels[rows, j], probabilities[task.name][rows, 1])
        (self.output / "vision_probe.json").write_text(json.dumps(report, indent=2) + "\n")

    @torch.no_grad()
    def vision_features(self, model: Any, pixels: np.ndarray, metadata: ModelMetadata,
                        selection: FeatureSelection) -> torch.Tensor:
        """The frozen tower's selected hidden states for every instruction image (fp16 to save memory)."""
        from training.vision import select_features, to_pixel_values

        tower = model.model.vision_tower.eval().to(self.accelerator.device)
        parts = []
        for start in range(0, len(pixels), 64):
            batch = to_pixel_values(pixels[start:start + 64], metadata.image.mean, metadata.image.std)
            parts.append(select_features(tower, batch.to(self.accelerator.device), selection).to(torch.float16).cpu())
        return torch.cat(parts)

    def _report(self, stage: str, step: int, total: int, loss: float) -> None:
        if step == total or step % max(1, total // 20) == 0:
            log.info("%s step %d/%d loss %.4f", stage, step, total, loss)
        if self.progress is not None:
            self.progress(stage, step, total, loss)

    def language_stage(self, name: str, stage: LanguageStage, model: Any, examples: list[Example],
                       strata: list[str] | None,
                       features: torch.Tensor, tokenizer: Any, resume: dict[str, Any] | None) -> Any:
        """Stage 1 trains the projector only; stage 2 the projector and the language model (or LoRA adapters).
        ``strata`` (one per example, when the stage balances its sampling) go to :meth:`_batches`."""
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in model.model.multi_modal_projector.parameters():
            parameter.requires_grad_(True)
        lora = name == "stage2" and stage.lora
        if name == "stage2":
            if lora:
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(model, LoraConfig(
                    r=stage.lora_rank, lora_alpha=stage.lora_alpha, lora_dropout=0.0,
                    target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                    modules_to_save=["multi_modal_projector", "lm_head"],
                ))
            else:
                for parameter in model.model.language_model.parameters():
                    parameter.requires_grad_(True)
                for parameter in model.lm_head.parameters():
                    parameter.requires_grad_(True)
        if self.config.run.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.train()
        model.model.vision_tower.eval() if not lora else model.base_model.model.model.vision_tower.eval()
        batch = stage.batch_size
        steps_per_epoch = math.ceil(len(examples) / (batch * stage.gradient_accumulation))
        total = max(1, int(round(steps_per_epoch * stage.epochs)))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=stage.learning_rate, weight_decay=stage.weight_decay)
        warmup = max(1, int(total * stage.warmup_fraction))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 0.5 * (1 + math.cos(math.pi * s / total))))
        step = 0
        if resume is not None and self.state.stage == name and not lora:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            step = self.state.step
        self.state.stage = name
        model, optimizer = self.accelerator.prepare(model, optimizer)
        losses = self.state.losses.setdefault(name, [])
        del losses[step:]
        pad = tokenizer.pad_token_id
        # lengths are similar within a bucket, which keeps padding (and CPU time) low
        order_all = self._batches(examples, batch, total * stage.gradient_accumulation, strata)
        started = time.time()
        device = self.accelerator.device
        for micro, indices in enumerate(order_all):
            if micro < step * stage.gradient_accumulation:
                continue
            tensors = {k: v.to(device) for k, v in collate([examples[i] for i in indices], pad).items()}
            with self.accelerator.autocast():
                loss = llava_loss(self.accelerator.unwrap_model(model) if not lora else model.base_model.model,
                                  tensors, features) / stage.gradient_accumulation
            self.accelerator.backward(loss)
            if (micro + 1) % stage.gradient_accumulation:
                continue
            self.accelerator.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss.detach()) * stage.gradient_accumulation)
            self.state.step = step
            self._report(name, step, total, losses[-1])
            if step % self.config.run.checkpoint_every == 0 and step < total and not lora:
                self.save_checkpoint(model, optimizer, scheduler)
        model = self.accelerator.unwrap_model(model)
        if lora:
            model = model.merge_and_unload()
        if self.config.run.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        self.state.seconds[name] = round(self.state.seconds.get(name, 0.0) + time.time() - started, 1)
        self.state.completed.append(name)
        self.state.step = 0
        self.save_checkpoint(model, None, None)
        return model

    def _batches(self, examples: Sequence[Example], batch: int, count: int,
                 strata: Sequence[str] | None = None) -> list[list[int]]:
        """``count`` micro-batches: each epoch a seeded shuffle (or, with ``strata``, as many seeded draws with
        probability ∝ 1/√(stratum size)), grouped into length-sorted chunks of 8 batches."""
        rng = random.Random(self.config.run.seed)
        weights = balanced_weights(strata) if strata is not None else None
        out: list[list[int]] = []
        while len(out) < count:
            order = list(range(len(examples)))
            if weights is None:
                rng.shuffle(order)
            else:
                order = rng.choices(order, weights=weights, k=len(order))
            chunk = batch * 8
            epoch = []
            for start in range(0, len(order), chunk):
                part = sorted(order[start:start + chunk], key=lambda i: len(examples[i].input_ids))
                epoch += [part[k:k + batch] for k in range(0, len(part), batch)]
            rng.shuffle(epoch)
            out += epoch
        return out[:count]

    def plot_losses(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        stages = [s for s in ("vision", "tower", "stage1", "stage2", "assessment") if self.state.losses.get(s)]
        figure, axes = plt.subplots(1, max(1, len(stages)), figsize=(4 * max(1, len(stages)), 3), squeeze=False)
        for axis, stage in zip(axes[0], stages, strict=False):
            values = np.asarray(self.state.losses[stage])
            axis.plot(values, alpha=0.3, color="tab:blue")
            window = max(1, len(values) // 20)
            axis.plot(np.convolve(values, np.ones(window) / window, mode="valid"), color="tab:blue")
            axis.set_title(stage)
            axis.set_xlabel("step")
            axis.set_ylabel("loss")
        figure.tight_layout()
        path = self.output / "loss_curves.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        (self.output / "losses.json").write_text(json.dumps(self.state.losses))
        return path


def train(config: TrainConfig, progress: Progress | None = None, command: str = "retinalgpt train CONFIG") -> Path:
    """Run the recipe and return the model directory."""
    return Trainer(config, progress, command).run()

