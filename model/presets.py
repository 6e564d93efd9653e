"""Model presets built from configs alone (no download): ``tiny`` and ``paper``.

``tiny``   CPU-sized RetinalGPT for tests and the bundled default: CLIP vision tower (112 px, patch 14 → 64
           image tokens, 3 layers of width 128), a 2-layer GELU projector, a 4-layer LLaMA of width 256, and a
           byte-level BPE tokenizer trained with ``tokenizers`` on the protocol's own text (:func:`tokenizer_corpus`).
           About 5 M parameters (~10 MB in fp16).
``lite0``  the bundled model's shapes: an EfficientNet-Lite0 tower (:mod:`model.vision.efficientnet_lite`, 384 px on
           the field of view, 37 image tokens of width 1 280) with the ``tiny`` projector and language model;
           trained from ImageNet weights by ``training/recipes/tiny-bundled.toml``.
``paper``  the RetinalGPT / LLaVA-Med v0 shapes: CLIP ViT-L/14 at 224 px, penultimate layer without CLS
           (256 image tokens), a linear projector (``projector_hidden_act="linear"``; ``linear_2`` is the identity
           after a v0 import), LLaMA-7B dimensions (32 layers, width 4096, 32 heads, MLP 11008, vocabulary
           32 004 as the v0 tokenizer with its added tokens). Random weights: for benchmarks and shape tests; real
           weights come from :mod:`model.importers`.

Interfaces::

    build_tokenizer(vocab_size=2048) -> PreTrainedTokenizerFast   # deterministic; "<image>" and "###" atomic
    build_model(name, seed=0, device="cpu", dtype=None, tokenizer=None) -> (model, tokenizer, ModelMetadata)
    save_preset(name, path, seed=0, dtype="float16", version="0") -> Path   # a complete model directory

The tokenizer pads on the left (batched generation), prepends ``<s>``, and keeps ``###`` (the conversation
separator, where answers end) as one token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model import protocol
from model.checkpoint import ImageSpec, ModelMetadata, save_model_dir
from model.schema import Condition, LesionType, max_grade
from model.template import NATIVE_TEMPLATE

if TYPE_CHECKING:
    import torch
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", protocol.IMAGE_TOKEN)


@dataclass(frozen=True)
class Preset:
    """Shapes of one preset: CLIP vision config, LLaMA text config, projector activation."""

    name: str
    description: str
    vision: dict[str, Any]
    text: dict[str, Any]
    projector_act: str
    vocab_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tower: str = "clip"
    """"clip" (a ViT from transformers) or "efficientnet_lite" (:mod:`model.vision.efficientnet_lite`)."""

    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def image_tokens(self) -> int:
        if self.tower == "efficientnet_lite":
            return 1 + int(self.vision["token_grid"]) ** 2
        return (self.image_size // int(self.vision["patch_size"])) ** 2

    def image_spec(self) -> ImageSpec:
        """How this preset's tower wants its images (size, tokens, normalisation, framing)."""
        if self.tower == "efficientnet_lite":
            return ImageSpec(size=self.image_size, image_tokens=self.image_tokens, mean=(0.5, 0.5, 0.5),
                             std=(0.5, 0.5, 0.5), framing="fov_square")
        return ImageSpec(size=self.image_size, image_tokens=self.image_tokens)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        description="CPU-sized RetinalGPT for tests and the bundled default",
        vision={
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 112,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
        },
        text={
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6,
        },
        projector_act="gelu",
    ),
    "lite0": Preset(
        name="lite0",
        description="the bundled model's shapes: EfficientNet-Lite0 tower (ImageNet-initialised) at 384 px on the "
        "field of view, 1 global + 6×6 grid image tokens of width 1280, a 2-layer GELU projector, the tiny LLaMA",
        vision={"variant": "lite0", "image_size": 384, "token_grid": 6},
        text={
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6,
        },
        projector_act="gelu",
        tower="efficientnet_lite",
    ),
    "paper": Preset(
        name="paper",
        description="RetinalGPT / LLaVA-Med v0 shapes: CLIP ViT-L/14-224, linear projector, LLaMA-7B",
        vision={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        text={
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
        },
        projector_act="linear",
        vocab_size=32004,
    ),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None


def tokenizer_corpus(seed: int = 0, samples: int = 400) -> list[str]:
    """Text the ``tiny`` tokenizer is trained on: every protocol string, rendered conversations for random
    labels, and a little chat vocabulary. Deterministic for a given seed."""
    rng = random.Random(seed)
    texts = protocol.protocol_text()
    for _ in range(samples):
        findings = {
            c: rng.randint(0, max_grade(c)) for c in protocol.DISEASE_CONDITIONS if rng.random() < 0.5
        }
        features = rng.sample(protocol.VASCULAR_FEATURES, 8)
        boxes = []
        for kind in rng.sample(list(LesionType), 2):
            x, y = rng.random() * 0.9, rng.random() * 0.9
            boxes.append((kind, (x, y, x + 0.05, y + 0.05)))
        labels = protocol.ImageLabels(
            quality=rng.choice(list(protocol.QUALITY_WORDS)),
            findings=findings or {Condition.DIABETIC_RETINOPATHY: 0},
            measurements={k: rng.random() * 3 for k in features},
            lesions=tuple(boxes),
        )
        for task in labels.tasks():
            texts.append(
                NATIVE_TEMPLATE.prompt(rng.choice(protocol.QUESTIONS[task]))
                + " "
                + protocol.render_answer(task, labels)
            )
    texts += [
        "The optic disc, macula, fovea and retinal vessels are visible. The cup-to-disc ratio is within normal limits.",
        "Refer the patient to an ophthalmologist. Routine follow-up in twelve months. Urgent referral is advised.",
        "Study results: right eye, left eye, laterality, findings, measurements, lesions, impression, referral.",
        "Why? Because the haemorrhages and exudates indicate moderate non-proliferative diabetic retinopathy.",
    ]
    return texts


def build_tokenizer(vocab_size: int = 2048, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer of ``tiny`` (digits split one per token, like LLaMA)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tokenizer_corpus(seed), trainer)
    backend.add_tokens([NATIVE_TEMPLATE.sep])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=int(PRESETS["tiny"].text["max_position_embeddings"]),
    )


def build_config(spec: Preset, tokenizer: PreTrainedTokenizerFast) -> Any:
    """The ``LlavaConfig`` of a preset for ``tokenizer``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from model.vision.efficientnet_lite import EfficientNetLiteConfig, register

    register()
    vocab = max(spec.vocab_size or 0, len(tokenizer))
    text = LlamaConfig(
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **spec.text,
    )
    lite = spec.tower == "efficientnet_lite"
    return LlavaConfig(
        vision_config=EfficientNetLiteConfig(**spec.vision) if lite else CLIPVisionConfig(**spec.vision),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(protocol.IMAGE_TOKEN),
        image_seq_length=spec.image_tokens,
        projector_hidden_act=spec.projector_act,
        vision_feature_select_strategy="full" if lite else "default",
        vision_feature_layer=-1 if lite else -2,
        multimodal_projector_bias=True,
    )


def build_model(
    name: str,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast, ModelMetadata]:
    """A randomly initialised preset model (seeded), its tokenizer and metadata. Weights are created directly
    on ``device`` in ``dtype`` (so ``paper`` can be built on a GPU without a CPU copy)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    spec = preset(name)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    config = build_config(spec, tokenizer)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype or torch.float32)
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    sep_id = tokenizer.convert_tokens_to_ids(NATIVE_TEMPLATE.sep)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, sep_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    metadata = ModelMetadata(
        name="retinalgpt",
        preset=name,
        image=spec.image_spec(),
        provenance={"source": f"preset:{name}", "seed": seed, "weights": "random initialisation"},
    )
    return model, tokenizer, metadata


def save_preset(
    name: str, path: Path, seed: int = 0, dtype: str | None = "float16", version: str = "0"
) -> Path:
    """Build preset ``name`` with random weights and write it as a model directory at ``path``."""
    model, tokenizer, metadata = build_model(name, seed=seed)
    metadata.version = version
    return save_model_dir(path, model, tokenizer, metadata, dtype=dtype)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
