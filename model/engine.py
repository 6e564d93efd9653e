"""Batched RetinalGPT inference: the whole question protocol over all images of a study, plus chat.

``RetinalGPTEngine.load(path, options)`` loads a model directory once (per process); ``analyze(images)`` runs
every protocol task for every image:

1. pixels → CLIP preprocessing (resize shortest edge, centre crop, normalise) → vision tower and projector,
   once per image for all tasks;
2. one left-padded batch of prompts (images × tasks) → prefill with attention mask → greedy decoding with the
   KV cache until every row's answer is complete (an end token, or a separator the template's cleaning rule keeps;
   or ``max_new_tokens``); deterministic. Prompts and answers follow the model's conversation template
   (:mod:`model.template`: ours, or the published one of an imported checkpoint);
3. answers are parsed strictly (:mod:`model.protocol`); unparsable ones are kept verbatim and flagged;
4. probabilities: for every condition the model graded, each candidate answer line ("grade 0." … "grade 4.",
   "absent." / "present.") is scored by its log-likelihood after the image prompt and the preceding answer lines,
   written as the model would write them (:meth:`RetinalGPTEngine.continuation`), in one forward pass over all
   candidates that reuses the prompt's KV cache; a softmax over the candidates gives P(grade) per condition.

GPU: bf16 weights and SDPA attention; CPU: fp32. Optional bitsandbytes 4-bit / 8-bit weights on CUDA.
Torch and transformers are imported lazily so importing this module is cheap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from model import protocol
from model.checkpoint import (
    Assessment,
    CheckpointError,
    ModelMetadata,
    checkpoint_sha256,
    device_uid,
    quiet_transformers,
    validate_model_dir,
)
from model.compare import compare_measurements
from model.grammar import AnswerConstraint, AnswerGrammar
from model.schema import (
    Condition,
    Finding,
    ImageAnalysis,
    Lesion,
    Measurement,
    ModelAnswer,
    ModelIdentity,
    Quality,
    QualityGrade,
    Source,
    VesselType,
    Zone,
    max_grade,
)
from model.vision.preprocess import fov_square

if TYPE_CHECKING:
    import torch
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

REFERABLE_DR_GRADE = 2
"""ICDR moderate non-proliferative DR or worse is referable (Wilkinson et al. 2003)."""


class EngineError(RuntimeError):
    """The engine cannot run as configured (device, quantisation, inputs)."""


class PromptTooLong(EngineError):
    """A question that does not fit the model's context even without history and study context."""


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs. ``batch_size`` counts images (each brings one row per task); ``force_new_tokens``
    ignores stop tokens and generates exactly that many tokens (benchmarks only); ``cpu_threads`` sets torch's
    intra-op threads on CPU (on a shared, loaded machine 1 thread is often fastest); ``static_cache`` decodes into
    a preallocated KV cache (default: on GPU, where re-copying a growing cache every step costs bandwidth);
    ``constrain_answers`` decodes the protocol's questions under their canonical grammar (:mod:`model.grammar`;
    default: when the checkpoint's metadata says it was trained on canonical answers)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    batch_size: int = 8
    max_new_tokens: int = 256
    tasks: tuple[protocol.Task, ...] = tuple(protocol.Task)
    score_findings: bool = True
    score_chunk_rows: int = 64
    force_new_tokens: int | None = None
    cpu_threads: int | None = None
    static_cache: bool | None = None
    constrain_answers: bool | None = None


@dataclass(frozen=True)
class GenerationTiming:
    """Where the time of the last :meth:`RetinalGPTEngine.generate_tokens` call went (for metrics and benchmarks)."""

    rows: int
    final_rows: int
    prompt_tokens: int
    steps: int
    prefill_s: float
    decode_s: float


@dataclass
class ModelImageResult:
    """What RetinalGPT said about one image, typed."""

    modality: str | None = None
    quality: QualityGrade | None = None
    findings: list[Finding] = field(default_factory=list)
    lesions: list[Lesion] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    answers: list[ModelAnswer] = field(default_factory=list)
    not_assessed: list[Condition] = field(default_factory=list)
    lesion_presence: dict[str, float] = field(default_factory=dict)
    """Calibrated P(present) per lesion-presence question (lesion type or ``any``), assessment models only."""

    def merge_into(self, image: ImageAnalysis) -> ImageAnalysis:
        """Add these results to ``image`` (a copy): findings, lesions, model measurements, answers, and the
        disagreements between model and measured numbers; the model's quality only where none is set."""
        merged = image.model_copy(deep=True)
        merged.findings.extend(self.findings)
        merged.lesions.extend(self.lesions)
        merged.measurements.extend(self.measurements)
        merged.answers.extend(self.answers)
        merged.not_assessed = [c for c in self.not_assessed if c not in merged.not_assessed] + merged.not_assessed
        measured = [m for m in merged.measurements if m.source == Source.MEASURED]
        merged.disagreements.extend(compare_measurements(self.measurements, measured))
        if merged.quality is None and self.quality is not None:
            score = {QualityGrade.GRADABLE: 1.0, QualityGrade.USABLE: 0.5, QualityGrade.REJECT: 0.0}[
                self.quality
            ]
            reasons = [] if self.quality == QualityGrade.GRADABLE else ["quality as stated by RetinalGPT"]
            merged.quality = Quality(grade=self.quality, score=score, reasons=reasons)
        return merged


def _zone_vessel(key: str) -> tuple[Zone, VesselType]:
    zone = Zone.B if key.endswith("_zone_b") else Zone.C if key.endswith("_zone_c") else Zone.WHOLE
    vessel = (
        VesselType.ARTERY
        if key.startswith("Artery_")
        else VesselType.VEIN
        if key.startswith("Vein_")
        else VesselType.ALL
    )
    if key.startswith("CRAE"):
        vessel = VesselType.ARTERY
    elif key.startswith("CRVE"):
        vessel = VesselType.VEIN
    return zone, vessel


def model_measurement(key: str, value: float) -> Measurement:
    """A model-emitted feature as a :class:`Measurement` with ``source = model``."""
    zone, vessel = _zone_vessel(key)
    return Measurement(
        key=key, value=value, unit=protocol.feature_unit(key), zone=zone, vessel=vessel, source=Source.MODEL
    )


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise EngineError("model.device is 'cuda' but no CUDA device is available")
    return requested


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless configured otherwise (fp16/bf16 matmuls on CPU are slow and inexact)."""
    import torch

    if requested == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, requested)


class RetinalGPTEngine:
    """A loaded RetinalGPT model. Use :meth:`load` (model directory) or :meth:`from_model` (in-memory)."""

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        metadata: ModelMetadata,
        identity: ModelIdentity,
        options: EngineOptions = EngineOptions(),
    ) -> None:
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.metadata = metadata
        self.identity = identity
        self.options = options
        self.template = metadata.conversation()
        self.device = next(model.parameters()).device
        self.compute_dtype = model.get_input_embeddings().weight.dtype
        config = model.config
        self.image_token_id = int(config.image_token_index)
        image_id = tokenizer.convert_tokens_to_ids(self.template.image_token)
        if image_id != self.image_token_id:
            raise CheckpointError(
                f"tokenizer id of {self.template.image_token!r} is {image_id}, config image_token_index is {self.image_token_id}"
            )
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            raise CheckpointError(
                f"tokenizer has {len(tokenizer)} tokens but the embedding matrix only {model.get_input_embeddings().weight.shape[0]}"
            )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stops = end_token_ids(model, tokenizer)
        self._pieces: list[str] | None = None
        self._check_ids: torch.Tensor | None = None
        if self.template.separator_ends_answer:
            vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            stops |= {i for i, tok in enumerate(vocab) if tok is not None and self.template.sep in tok}
        else:  # a separator may be cleaned away: check the text whenever a token could complete one
            self._pieces = token_pieces(tokenizer)
            last = self.template.sep[-1]
            self._check_ids = torch.tensor(
                [i for i, piece in enumerate(self._pieces) if last in piece], device=self.device
            )
        self.stop_ids = torch.tensor(sorted(stops), device=self.device)
        self._stop_set = frozenset(stops)
        self.constrain_answers = (
            options.constrain_answers if options.constrain_answers is not None
            else metadata.answer_format == "canonical"
        )
        self.last_timing: GenerationTiming | None = None
        self._mean = np.asarray(metadata.image.mean, dtype=np.float32)[:, None, None]
        self._std = np.asarray(metadata.image.std, dtype=np.float32)[:, None, None]

    # -----------------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def load(cls, path: Path, options: EngineOptions = EngineOptions()) -> RetinalGPTEngine:
        """Load a model directory; :class:`~model.checkpoint.CheckpointError` names a missing or inconsistent part."""
        import torch
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        from model.vision.efficientnet_lite import register

        register()
        path = Path(path)
        metadata = validate_model_dir(path)
        sha = checkpoint_sha256(path)
        device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
        if device == "cpu" and options.cpu_threads:
            torch.set_num_threads(options.cpu_threads)
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
        if options.quantization != "none":
            kwargs["quantization_config"] = _quantization_config(options.quantization, device, dtype)
            kwargs["device_map"] = {"": 0}
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(path)
                model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(
                f"{path}: cannot load the model ({type(exc).__name__}: {_first_line(exc)})"
            ) from None
        if options.quantization == "none":
            model = model.to(device)
        tokenizer.padding_side = "left"
        identity = ModelIdentity(
            name=metadata.name, version=metadata.version, device_uid=device_uid(sha), checkpoint_sha256=sha
        )
        log.info("loaded %s %s (%s) on %s as %s", metadata.name, metadata.version, sha[:12], device, dtype)
        with torch.inference_mode():
            return cls(model, tokenizer, metadata, identity, options)

    @classmethod
    def from_model(
        cls,
        model: LlavaForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        metadata: ModelMetadata,
        options: EngineOptions = EngineOptions(),
        identity: ModelIdentity | None = None,
    ) -> RetinalGPTEngine:
        """Wrap an in-memory model (training evaluation, tests). The identity defaults to an unregistered one."""
        identity = identity or ModelIdentity(
            name=metadata.name,
            version=metadata.version,
            device_uid=device_uid("0" * 64),
            checkpoint_sha256=None,
        )
        return cls(model, tokenizer, metadata, identity, options)

    # -----------------------------------------------------------------------------------------------------------
    # inputs

    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Tower input of RGB uint8 arrays (H×W×3; grey H×W and RGBA accepted), framed as the model directory says
        (``image.framing``): CLIP's bicubic resize of the shortest edge and centre crop, or the field of view's
        bounding square (:func:`model.vision.preprocess.fov_square`); then scaled to 0–1 and normalised with the
        metadata's mean and std."""
        import torch
        from PIL import Image

        size = self.metadata.image.size
        batch = np.empty((len(images), 3, size, size), dtype=np.float32)
        for index, array in enumerate(images):
            array = np.asarray(array)
            if array.ndim == 2:
                array = np.repeat(array[:, :, None], 3, axis=2)
            if array.ndim != 3 or array.shape[2] not in (3, 4) or array.shape[0] < 1 or array.shape[1] < 1:
                raise EngineError(f"image {index} has shape {array.shape}, expected H×W×3 RGB")
            if array.dtype != np.uint8:
                raise EngineError(f"image {index} has dtype {array.dtype}, expected uint8")
            if self.metadata.image.framing == "fov_square":
                crop = fov_square(array, size).astype(np.float32) / 255.0
            else:
                image = Image.fromarray(np.ascontiguousarray(array[:, :, :3]))
                scale = size / min(image.size)
                resized = image.resize(
                    (max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))),
                    Image.Resampling.BICUBIC,
                )
                left, top = (resized.size[0] - size) // 2, (resized.size[1] - size) // 2
                crop = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
            batch[index] = (crop.transpose(2, 0, 1) - self._mean) / self._std
        return torch.from_numpy(batch).to(self.device, self.compute_dtype)

    def image_features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Projected image tokens, ``[images, image_tokens, hidden]``."""
        import torch

        config = self.model.config
        with torch.inference_mode():
            out = self.model.model.get_image_features(
                pixel_values=self.pixel_values(images),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        if features.shape[1] != self.metadata.image.image_tokens:
            raise CheckpointError(
                f"vision tower gives {features.shape[1]} tokens per image, metadata says {self.metadata.image.image_tokens}"
            )
        return features.to(self.compute_dtype)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt with the image placeholder expanded to the image's tokens."""
        ids = self.tokenizer(text, add_special_tokens=True).input_ids
        expanded: list[int] = []
        for token in ids:
            if token == self.image_token_id:
                expanded.extend([self.image_token_id] * self.metadata.image.image_tokens)
            else:
                expanded.append(token)
        return expanded

    # -----------------------------------------------------------------------------------------------------------
    # core: prefill, greedy decoding, candidate scoring

    def _prefill(
        self, rows: Sequence[list[int]], features: torch.Tensor, row_image: Sequence[int] | None = None
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill of ``rows``; ``features[row_image[r]]`` fills row r's image placeholders (default: one image per
        row). The token prefix all rows share (system prompt and, in the native template, the image) is computed
        once per distinct image and its KV cache copied to the rows; the rest is left-padded, so a row's tokens
        read ``[shared prefix][padding][own tokens]`` with the padding masked out. Returns (cache, last-position
        logits, attention mask, last position ids)."""
        import torch
        from transformers import DynamicCache

        row_image = list(range(len(rows))) if row_image is None else list(row_image)
        shared = self._shared_prefix(rows)
        cache = DynamicCache()
        images = sorted(set(row_image))
        if shared:
            ids = torch.tensor([rows[0][:shared]] * len(images), device=self.device)
            embeds = self._embed(ids, features[images])
            positions = torch.arange(shared, device=self.device).expand(len(images), shared)
            self.model.model.language_model(
                inputs_embeds=embeds,
                attention_mask=torch.ones_like(ids),
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            select = torch.tensor([images.index(i) for i in row_image], device=self.device)
            cache = DynamicCache(
                ddp_cache_data=[(layer.keys[select], layer.values[select]) for layer in cache.layers]
            )
        tails = [row[shared:] for row in rows]
        length = max(len(t) for t in tails)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        tail_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, tail in enumerate(tails):
            ids[index, length - len(tail) :] = torch.tensor(tail)
            tail_mask[index, length - len(tail) :] = 1
        ids, tail_mask = ids.to(self.device), tail_mask.to(self.device)
        embeds = self._embed(ids, features[row_image])
        positions = shared + (tail_mask.cumsum(dim=1) - 1).clamp(min=0)
        mask = torch.cat(
            [torch.ones((len(rows), shared), dtype=torch.long, device=self.device), tail_mask], dim=1
        )
        out = self.model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()
        return cache, logits, mask, positions[:, -1]

    def _shared_prefix(self, rows: Sequence[list[int]]) -> int:
        """Length of the token prefix all rows share, never splitting an image and leaving every row ≥ 1 token."""
        if not rows:
            return 0
        shared = min(_common_prefix([list(r) for r in rows]), min(len(r) for r in rows) - 1)
        image_tokens = sum(1 for token in rows[0][:shared] if token == self.image_token_id)
        if image_tokens not in (0, self.metadata.image.image_tokens):
            shared = rows[0].index(self.image_token_id)
        return max(shared, 0)

    def _embed(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each row's image placeholders replaced by that row's image features."""
        embeds = self.model.get_input_embeddings()(ids)
        slots = ids == self.image_token_id
        with_image = slots.any(dim=1)
        if not bool(with_image.any()):
            return embeds
        if bool((slots.sum(dim=1)[with_image] != features.shape[1]).any()):
            raise EngineError("a prompt holds a different number of image tokens than the image has")
        return embeds.masked_scatter(slots.unsqueeze(-1), features[with_image].to(embeds.dtype))

    def answer_constraint(self, task: protocol.Task) -> AnswerConstraint:
        """A fresh decoding state for one answer to ``task`` under its canonical grammar."""
        if self._pieces is None:
            self._pieces = token_pieces(self.tokenizer)
        return AnswerConstraint(AnswerGrammar(task), self._pieces, self._stop_set, self.template.sep)

    def _generate(
        self,
        rows: Sequence[list[int]],
        features: torch.Tensor,
        row_image: Sequence[int] | None = None,
        constraints: Sequence[AnswerConstraint | None] | None = None,
    ) -> list[str]:
        """Greedy decoding of every row (see :meth:`_prefill` for ``row_image``); returns the answers: each row's
        new tokens decoded without special tokens and cleaned by the template (:meth:`ConversationTemplate.clean_answer`)."""
        tokens, lengths = self._decode(rows, features, row_image, constraints)
        return [
            self.template.clean_answer(self.tokenizer.decode(row[:length], skip_special_tokens=True))
            for row, length in zip(tokens, lengths, strict=True)
        ]

    def generate_tokens(
        self,
        rows: Sequence[list[int]],
        features: torch.Tensor,
        row_image: Sequence[int] | None = None,
        constraints: Sequence[AnswerConstraint | None] | None = None,
    ) -> list[list[int]]:
        """Greedy token ids per row (prompt token ids from :meth:`encode`, ``features`` from
        :meth:`image_features`), including the token that ended a row; rows that stopped early are padded with the
        pad id. Rows that finished are dropped from the batch (and their KV cache) at the next stop check once an
        eighth of the rows have, so long answers do not drag finished rows along. With ``force_new_tokens`` every
        row gets exactly that many tokens (and ``constraints`` are ignored); otherwise a row with a constraint
        takes the most likely token its grammar allows."""
        return self._decode(rows, features, row_image, constraints)[0]

    def _decode(
        self,
        rows: Sequence[list[int]],
        features: torch.Tensor,
        row_image: Sequence[int] | None = None,
        constraints: Sequence[AnswerConstraint | None] | None = None,
    ) -> tuple[list[list[int]], list[int]]:
        """:meth:`generate_tokens` and, per row, how many of its tokens make its answer text. A row ends at a stop
        token — an end token (the generation config's EOS ids) or, when the template's first separator always ends
        the answer, a token holding the separator — which adds no text (as the answer grammar assumes); or when
        its grammar is complete; or — when a separator may be cleaned away
        (:attr:`ConversationTemplate.separator_ends_answer`) — at the first stop check after a token that could
        complete a separator, once the decoded text fixes the cleaned answer
        (:meth:`ConversationTemplate.answer_complete`): tokens generated after that point never change it."""
        import torch

        options = self.options
        steps = options.force_new_tokens or options.max_new_tokens
        if options.force_new_tokens is not None or not any(c is not None for c in constraints or ()):
            constraints = None
        check_every = (
            8 if self.device.type == "cuda" and constraints is None else 1
        )  # a stop check syncs; on GPU let launches run ahead (constrained rows sync every step anyway)
        check_text = self._check_ids is not None and options.force_new_tokens is None
        started = time.perf_counter()
        with torch.inference_mode():
            cache, logits, mask, position = self._prefill(rows, features, row_image)
            filled = mask.shape[1]
            static = options.static_cache if options.static_cache is not None else self.device.type == "cuda"
            if static:
                cache, mask = self._static_cache(cache, mask, steps)
            self._sync()
            prefilled = time.perf_counter()
            output = torch.full((len(rows), steps), self.pad_id, dtype=torch.long, device=self.device)
            lengths = torch.full((len(rows),), steps, dtype=torch.long, device=self.device)
            alive = torch.arange(len(rows), device=self.device)
            finished = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
            pending = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
            embed = self.model.get_input_embeddings()
            done_steps = 0
            for step in range(steps):
                token = logits.argmax(dim=-1)
                ended = None
                if constraints is not None:
                    token, ended = _constrained_choice(logits, token, alive, finished, constraints)
                token = torch.where(finished, torch.full_like(token, self.pad_id), token)
                output[alive, step] = token
                done_steps = step + 1
                if options.force_new_tokens is None:
                    was = finished.clone()
                    stop = torch.isin(token, self.stop_ids)
                    finished |= stop
                    ends = torch.where(stop, step, step + 1)  # a stop token ends a row without its text
                    if ended is not None:
                        finished |= ended
                    if check_text:
                        pending |= torch.isin(token, self._check_ids) & ~finished
                    if (step + 1) % check_every == 0:
                        if check_text and bool(pending.any()):
                            finished |= self._answers_complete(output, alive, pending, step + 1)
                            pending.zero_()
                        lengths[alive] = torch.where(finished & ~was, ends, lengths[alive])
                        keep = (~finished).nonzero().squeeze(1)
                        if keep.numel() == 0:
                            break
                        if keep.numel() <= alive.numel() * 7 // 8:
                            alive, finished, token = alive[keep], finished[keep], token[keep]
                            mask, position, pending = mask[keep], position[keep], pending[keep]
                            _select_rows(cache, keep)
                    else:
                        lengths[alive] = torch.where(finished & ~was, ends, lengths[alive])
                if step == steps - 1:
                    break
                if static:
                    mask[:, filled + step] = 1
                else:
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                position = position + 1
                out = self.model.model.language_model(
                    inputs_embeds=embed(token[:, None]),
                    attention_mask=mask,
                    position_ids=position[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
                logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()
            tokens = output[:, :done_steps].tolist()
            generated = lengths.clamp(max=done_steps).tolist()
        self.last_timing = GenerationTiming(
            rows=len(rows),
            final_rows=int(alive.numel()),
            prompt_tokens=max(len(r) for r in rows),
            steps=done_steps,
            prefill_s=prefilled - started,
            decode_s=time.perf_counter() - prefilled,
        )
        return tokens, generated

    def _answers_complete(
        self, output: torch.Tensor, alive: torch.Tensor, pending: torch.Tensor, steps: int
    ) -> torch.Tensor:
        """Which alive rows' text so far fixes their cleaned answer (checked for the ``pending`` rows only)."""
        import torch

        complete = torch.zeros_like(pending)
        for position in pending.nonzero().squeeze(1).tolist():
            ids = output[alive[position], :steps].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            complete[position] = self.template.answer_complete(text)
        return complete

    def _static_cache(self, cache: Any, mask: torch.Tensor, steps: int) -> tuple[Any, torch.Tensor]:
        """The prefilled cache moved into a preallocated ``StaticCache`` with room for ``steps`` more tokens, and
        the attention mask over its full length (future slots masked). Decoding then writes each new key/value
        in place instead of concatenating (re-copying) the whole cache every step."""
        import torch
        from transformers import StaticCache

        length = mask.shape[1]
        static = StaticCache(config=self.model.config.text_config, max_cache_len=length + steps)
        for source, layer in zip(cache.layers, static.layers, strict=True):
            layer.lazy_initialization(source.keys, source.values)
            layer.keys[:, :, :length].copy_(source.keys)
            layer.values[:, :, :length].copy_(source.values)
            layer.cumulative_length.fill_(length)
        full = torch.zeros((mask.shape[0], length + steps), dtype=mask.dtype, device=mask.device)
        full[:, :length] = mask
        return static, full

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def score_candidates(
        self,
        rows: Sequence[list[int]],
        features: torch.Tensor,
        groups: Sequence[tuple[int, Sequence[list[int]]]],
        row_image: Sequence[int] | None = None,
        log_likelihoods: bool = False,
    ) -> list[list[float]]:
        """Likelihood scoring. ``groups`` pairs a prompt row index with candidate continuations (token ids); the
        result gives, per group, the softmax over candidates of their summed token log-probabilities after the
        prompt (or, with ``log_likelihoods``, those sums themselves). Tokens all candidates share from the start
        cancel out and are skipped. ``row_image`` maps prompt rows to images as in :meth:`_prefill`. One prefill
        of the prompts, then one forward over all candidates (chunked) on copies of the prompts' KV cache."""
        import torch
        from transformers import DynamicCache

        flat: list[tuple[int, int, list[int], int]] = []
        for group_index, (row, candidates) in enumerate(groups):
            shared = _common_prefix([list(c) for c in candidates])
            for candidate in candidates:
                if len(candidate) <= shared:
                    raise EngineError("a candidate is a prefix of another; scores would not be comparable")
                flat.append((group_index, row, list(candidate), shared))
        totals = torch.zeros(len(flat), dtype=torch.float64)
        with torch.inference_mode():
            cache, last_logits, mask, position = self._prefill(rows, features, row_image)
            first_logp = torch.log_softmax(last_logits, dim=-1)
            embed = self.model.get_input_embeddings()
            for start in range(0, len(flat), self.options.score_chunk_rows):
                chunk = flat[start : start + self.options.score_chunk_rows]
                index = torch.tensor([row for _, row, _, _ in chunk], device=self.device)
                width = max(len(c) for _, _, c, _ in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                suffix_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, (_, _, candidate, _) in enumerate(chunk):
                    ids[i, : len(candidate)] = torch.tensor(candidate)
                    suffix_mask[i, : len(candidate)] = 1
                ids, suffix_mask = ids.to(self.device), suffix_mask.to(self.device)
                copy = DynamicCache(
                    ddp_cache_data=[(layer.keys[index], layer.values[index]) for layer in cache.layers]
                )
                positions = position[index, None] + 1 + torch.arange(width, device=self.device)[None, :]
                out = self.model.model.language_model(
                    inputs_embeds=embed(ids),
                    attention_mask=torch.cat([mask[index], suffix_mask], dim=1),
                    position_ids=positions,
                    past_key_values=copy,
                    use_cache=True,
                )
                logp = torch.log_softmax(self.model.lm_head(out.last_hidden_state[:, :-1]).float(), dim=-1)
                per_token = torch.cat(
                    [
                        first_logp[index].gather(1, ids[:, :1]),
                        logp.gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1),
                    ],
                    dim=1,
                )
                counted = torch.zeros((len(chunk), width), dtype=torch.bool)
                for i, (_, _, candidate, shared) in enumerate(chunk):
                    counted[i, shared : len(candidate)] = True
                per_token = per_token.double().cpu().masked_fill(~counted, 0.0)
                totals[start : start + len(chunk)] = per_token.sum(dim=1)
        results: list[list[float]] = [[] for _ in groups]
        members: list[list[int]] = [[] for _ in groups]
        for k, item in enumerate(flat):
            members[item[0]].append(k)
        for group_index, chosen in enumerate(members):
            if log_likelihoods:
                results[group_index] = totals[chosen].tolist()
                continue
            probabilities = torch.softmax(totals[chosen], dim=0).tolist()
            results[group_index] = [min(1.0, max(0.0, p)) for p in probabilities]
        return results

    # -----------------------------------------------------------------------------------------------------------
    # public API

    def analyze(self, images: Sequence[np.ndarray]) -> list[ModelImageResult]:
        """Run the whole protocol on every image (RGB uint8 arrays), in batches of ``options.batch_size`` images."""
        results: list[ModelImageResult] = []
        for start in range(0, len(images), self.options.batch_size):
            results.extend(self._analyze_batch(images[start : start + self.options.batch_size]))
        return results

    def _analyze_batch(self, images: Sequence[np.ndarray]) -> list[ModelImageResult]:
        assessment = self.metadata.assessment
        wants_findings = protocol.Task.DISEASE_GRADE in self.options.tasks
        # a model trained for the complete assessment is asked every condition by its own scored question, never
        # one open disease question whose answer would let it choose which conditions to mention
        tasks = [t for t in self.options.tasks if assessment is None or t != protocol.Task.DISEASE_GRADE]
        features = self.image_features(images)
        texts = {task: self.template.prompt(protocol.question(task)) for task in tasks}
        prompts = {task: self.encode(text) for task, text in texts.items()}
        rows = [prompts[task] for _ in images for task in tasks]
        row_image = [index for index in range(len(images)) for _ in tasks]
        constraints = (
            [self.answer_constraint(task) for _ in images for task in tasks] if self.constrain_answers else None
        )
        answers = self._generate(rows, features, row_image, constraints) if rows else []
        results = []
        for index in range(len(images)):
            result = ModelImageResult()
            for offset, task in enumerate(tasks):
                text = answers[index * len(tasks) + offset]
                self._apply(result, protocol.parse_answer(task, text), protocol.question(task))
            results.append(result)
        if assessment is not None and wants_findings:
            for result, probabilities in zip(results, self.assess(features), strict=True):
                _apply_assessment(result, assessment, probabilities)
        elif self.options.score_findings and wants_findings:
            self._score_findings(results, features, texts[protocol.Task.DISEASE_GRADE])
        for result in results:
            result.findings.extend(_derived_findings(result.findings))
            if wants_findings:
                stated = {f.condition for f in result.findings}
                result.not_assessed = [c for c in protocol.DISEASE_CONDITIONS if c not in stated]
        return results

    def assess(self, features: torch.Tensor) -> list[dict[str, list[float]]]:
        """The complete assessment of every image (``features`` from :meth:`image_features`): per image, each
        assessment question's key → calibrated probabilities of its answers (grade 0…max, or no/yes). Every
        question is asked of every image on its own, and its answers are scored by likelihood."""
        assessment = self._assessment()
        return [
            {key: assessment.calibration_for(key).apply(values) for key, values in image.items()}
            for image in self.assessment_log_likelihoods(features)
        ]

    def _assessment(self) -> Assessment:
        if self.metadata.assessment is None:
            raise EngineError(f"{self.metadata.name} {self.metadata.version} was not trained for the complete assessment")
        return self.metadata.assessment

    def assessment_log_likelihoods(self, features: torch.Tensor) -> list[dict[str, list[float]]]:
        """Per image, each assessment question's key → its answers' log-likelihoods after the question (before
        calibration; what :class:`~model.checkpoint.Calibration` is fitted on)."""
        assessment = self._assessment()
        questions = assessment.questions()
        texts = [self.template.prompt(q.question) for q in questions]
        prompts = [self.encode(text) for text in texts]
        answers = [[self.continuation(text, a) for a in q.answers] for text, q in zip(texts, questions, strict=True)]
        rows, row_image, groups = [], [], []
        for image in range(features.shape[0]):
            for prompt, candidates in zip(prompts, answers, strict=True):
                groups.append((len(rows), candidates))
                rows.append(prompt)
                row_image.append(image)
        scores = self.score_candidates(rows, features, groups, row_image=row_image, log_likelihoods=True)
        return [
            {q.key: ll for q, ll in zip(questions, scores[i * len(questions):(i + 1) * len(questions)], strict=True)}
            for i in range(features.shape[0])
        ]

    @staticmethod
    def _apply(result: ModelImageResult, parsed: protocol.ParsedAnswer, question_text: str) -> None:
        result.answers.append(
            ModelAnswer(
                task=parsed.task.value,
                question=question_text,
                answer=parsed.text,
                parsed=parsed.ok,
                error=parsed.error,
            )
        )
        if parsed.task == protocol.Task.MODALITY_QUALITY:
            result.modality, result.quality = parsed.modality, parsed.quality
        elif parsed.task == protocol.Task.DISEASE_GRADE:
            result.findings = [
                Finding(condition=c, grade=g, probability=None, source=Source.MODEL)
                for c, g in parsed.findings.items()
            ]
        elif parsed.task == protocol.Task.VASCULAR:
            result.measurements = [model_measurement(k, v) for k, v in parsed.measurements.items()]
        elif parsed.task == protocol.Task.LESIONS and parsed.lesions:
            result.lesions = [Lesion(type=t, box=b, source=Source.MODEL) for t, b in parsed.lesions]

    def _score_findings(self, results: list[ModelImageResult], features: torch.Tensor, prompt_text: str) -> None:
        """P(grade) for every condition each image's disease answer graded, by candidate likelihood, conditioned
        on the answer lines before it (the canonical rendering of what the model said), as the model would write
        them after ``prompt_text`` (:meth:`continuation`)."""
        groups: list[tuple[int, list[list[int]]]] = []
        owners: list[tuple[int, int]] = []
        for image_index, result in enumerate(results):
            graded = {f.condition: int(f.grade or 0) for f in result.findings}
            for finding_index, finding in enumerate(result.findings):
                before = [
                    protocol.render_condition_line(c, graded[c])
                    for c in protocol.DISEASE_CONDITIONS[
                        : protocol.DISEASE_CONDITIONS.index(finding.condition)
                    ]
                    if c in graded
                ]
                prefix = "".join(line + "\n" for line in before)
                candidates = [
                    self.continuation(
                        prompt_text, prefix + protocol.render_condition_line(finding.condition, grade)
                    )
                    for grade in range(max_grade(finding.condition) + 1)
                ]
                groups.append((image_index, candidates))
                owners.append((image_index, finding_index))
        if not groups:
            return
        prompt = self.encode(prompt_text)
        scores = self.score_candidates([prompt for _ in results], features, groups)
        for (image_index, finding_index), probabilities in zip(owners, scores, strict=True):
            finding = results[image_index].findings[finding_index]
            total = sum(probabilities)
            probabilities = [p / total for p in probabilities]
            results[image_index].findings[finding_index] = Finding(
                condition=finding.condition,
                grade=finding.grade,
                probability=min(1.0, max(0.0, 1.0 - probabilities[0])),
                grade_probabilities=probabilities,
                source=Source.MODEL,
            )

    def continuation(self, prompt_text: str, answer: str) -> list[int]:
        """Token ids the model generates to write ``answer`` after the prompt ``prompt_text``: the template's
        :attr:`~model.template.ConversationTemplate.continuation_prefix` and the answer, tokenised in context (a
        SentencePiece tokenizer writes a text tokenised on its own with a different first token). Likelihood
        scoring scores these, so it scores exactly the text generation would produce."""
        prompt = self.tokenizer(prompt_text, add_special_tokens=True).input_ids
        ids = self.tokenizer(prompt_text + self.template.continuation_prefix + answer, add_special_tokens=True).input_ids
        if ids[: len(prompt)] != prompt or len(ids) == len(prompt):
            raise EngineError(
                f"{answer!r} does not tokenise as a continuation of the prompt; it cannot be scored"
            )
        return ids[len(prompt) :]

    def ask(
        self,
        image: np.ndarray,
        question_text: str,
        history: Sequence[tuple[str, str]] | None = None,
        context: str | None = None,
    ) -> str:
        """Answer a free question about ``image``; ``history`` holds earlier (question, answer) turns and
        ``context`` is added to the system message (e.g. the study's stored results).

        A prompt longer than the model's context less ``max_new_tokens`` is shortened: the oldest exchanges go
        first, then the context's lines from its end (a context puts what matters most first); a question that
        does not fit on its own is refused (:class:`PromptTooLong`)."""
        if not question_text.strip():
            raise EngineError("the question is empty")
        turns = list(history or ())
        lines = context.splitlines() if context else []
        limit = int(self.model.config.text_config.max_position_embeddings) - self.options.max_new_tokens
        while True:
            text = "\n".join(lines) or None
            ids = self.encode(self.template.prompt(question_text.strip(), history=turns, context=text))
            if len(ids) <= limit:
                break
            if turns:
                turns = turns[1:]
            elif lines:
                lines = lines[:-1]
            else:
                raise PromptTooLong(
                    f"the question needs {len(ids)} tokens with the image; the model takes {limit} before its "
                    "answer: ask a shorter question"
                )
        return self._generate([ids], self.image_features([image]))[0]


def end_token_ids(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end generation, as transformers' ``generate`` takes them: the generation config's
    ``eos_token_id`` (one id or a list; an imported checkpoint keeps its own), else the tokenizer's EOS."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    ids = [configured] if isinstance(configured, int) else list(configured or ())
    return {int(i) for i in ids if int(i) >= 0}


_CONSTRAINED_TOP_K = 64


def _constrained_choice(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    alive: torch.Tensor,
    finished: torch.Tensor,
    constraints: Sequence[AnswerConstraint | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each constrained row's most likely allowed token (its greedy choice when allowed, else the best of the
    top :data:`_CONSTRAINED_TOP_K`, else of the whole vocabulary) and which rows the choice ends. A row whose
    grammar allows nothing (cannot happen for a grammar that always offers a continuation or an end) ends."""
    import torch

    chosen = greedy.tolist()
    done = finished.tolist()
    ended = [False] * len(chosen)
    ranked: list[list[int]] | None = None
    for position, row in enumerate(alive.tolist()):
        constraint = constraints[row]
        if constraint is None or done[position]:
            continue
        if not constraint.allows(chosen[position]):
            if ranked is None:
                ranked = logits.topk(min(_CONSTRAINED_TOP_K, logits.shape[-1]), dim=-1).indices.tolist()
            allowed = next((t for t in ranked[position] if constraint.allows(t)), None)
            if allowed is None:
                order = logits[position].argsort(descending=True).tolist()
                allowed = next((t for t in order if constraint.allows(t)), None)
            if allowed is None:
                ended[position] = True
                continue
            chosen[position] = allowed
        constraint.advance(chosen[position])
        ended[position] = constraint.finished
    device = greedy.device
    return torch.tensor(chosen, device=device), torch.tensor(ended, device=device)


def token_pieces(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text each token id adds when it follows other text. Decoding a token alone drops a leading space
    under SentencePiece (LLaMA), so each is decoded after an anchor token and the anchor's text removed."""
    anchor = tokenizer("a", add_special_tokens=False).input_ids[-1]
    base = tokenizer.decode([anchor])
    return [tokenizer.decode([anchor, token])[len(base):] for token in range(len(tokenizer))]


def _select_rows(cache: Any, keep: torch.Tensor) -> None:
    """Keep only the batch rows ``keep`` of a dynamic or static KV cache (rows that finished are dropped, so
    the rest of the decode neither computes nor reads them)."""
    for layer in cache.layers:
        layer.keys = layer.keys[keep]
        layer.values = layer.values[keep]


def decide_grade(condition: Condition, probabilities: Sequence[float], assessment: Assessment) -> int:
    """The stated grade of an assessed condition from its calibrated grade probabilities, consistent with the
    operating points: diabetic retinopathy is graded 2–4 exactly when P(grade ≥ 2) reaches the referable-DR
    threshold (so grade and referral never contradict), other conditions are present exactly when P(grade ≥ 1)
    reaches the condition's threshold; within that range the most probable grade."""
    if condition == Condition.DIABETIC_RETINOPATHY:
        referable = sum(probabilities[REFERABLE_DR_GRADE:]) >= assessment.threshold(
            Condition.REFERABLE_DIABETIC_RETINOPATHY)
        allowed = range(REFERABLE_DR_GRADE, len(probabilities)) if referable else range(REFERABLE_DR_GRADE)
    else:
        present = 1.0 - probabilities[0] >= assessment.threshold(condition)
        allowed = range(1, len(probabilities)) if present else range(1)
    return max(allowed, key=lambda grade: probabilities[grade])


def _apply_assessment(result: ModelImageResult, assessment: Assessment, probabilities: dict[str, list[float]]) -> None:
    """Findings, lesion presence and audit answers of one image's complete assessment."""
    result.findings = []
    for question in assessment.questions():
        scores = probabilities[question.key]
        condition = question.condition
        if condition is not None:
            grade = decide_grade(condition, scores, assessment)
            result.findings.append(Finding(
                condition=condition, grade=grade, probability=min(1.0, max(0.0, 1.0 - scores[0])),
                grade_probabilities=scores, source=Source.MODEL,
            ))
        else:
            key = question.lesion or ""
            result.lesion_presence[key] = scores[1]
            grade = int(scores[1] >= assessment.threshold(f"lesion:{key}"))
        result.answers.append(ModelAnswer(task=question.key, question=question.question,
                                          answer=question.answers[grade], parsed=True))


def _derived_findings(findings: list[Finding]) -> list[Finding]:
    """Referable diabetic retinopathy from the DR finding: grade ≥ 2 (ICDR moderate or worse); its probability
    is P(DR grade ≥ 2) when the DR grades were scored."""
    dr = next((f for f in findings if f.condition == Condition.DIABETIC_RETINOPATHY), None)
    if dr is None or dr.grade is None:
        return []
    probability = None
    if dr.grade_probabilities is not None:
        probability = min(1.0, max(0.0, sum(dr.grade_probabilities[REFERABLE_DR_GRADE:])))
    return [
        Finding(
            condition=Condition.REFERABLE_DIABETIC_RETINOPATHY,
            grade=int(dr.grade >= REFERABLE_DR_GRADE),
            probability=probability,
            source=Source.MODEL,
        )
    ]


def _common_prefix(sequences: list[list[int]]) -> int:
    shortest = min(len(s) for s in sequences)
    for index in range(shortest):
        if len({s[index] for s in sequences}) > 1:
            return index
    return shortest


def _quantization_config(kind: str, device: str, dtype: torch.dtype) -> Any:
    import importlib.util

    if device != "cuda":
        raise EngineError(f"model.quantization = {kind} needs a CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise EngineError(
            f"model.quantization = {kind} needs the bitsandbytes package, which is not installed"
        )
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"]
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
