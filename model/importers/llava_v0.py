"""Import a LLaVA v0 / LLaVA-Med v1.0 checkpoint (the RetinalGPT release layout) as a transformers Llava directory.

Source layout (``LlavaLlamaForCausalLM``): ``config.json`` with the LLaMA keys plus ``mm_vision_tower``,
``mm_hidden_size``, ``mm_vision_select_layer``, ``mm_use_im_start_end``, ``use_mm_proj``; weights
(``pytorch_model*.bin`` or ``*.safetensors``) ``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``,
``lm_head``, ``model.mm_projector`` (one ``nn.Linear(mm_hidden_size → hidden_size)``); a LLaMA tokenizer with the
added tokens ``<im_patch>``, ``<im_start>``, ``<im_end>``. The vision tower is a CLIP ViT loaded by name in v0; here
from a local directory (``--vision-tower DIR``: a ``CLIPVisionModel`` or ``CLIPModel`` directory).

The v0 forward pass: CLIP hidden states of layer ``mm_vision_select_layer`` without the CLS token → projector →
written over the ``<im_patch>`` positions of the prompt (``question\\n<im_start><im_patch>×N<im_end>``) → LLaMA.

Exact mapping to ``LlavaForConditionalGeneration``: LLaMA weights renamed under ``model.language_model``;
``mm_projector`` → ``multi_modal_projector.linear_1`` with ``projector_hidden_act = "linear"`` and
``linear_2`` the identity (weight I, bias 0), so linear_2(act(linear_1(x))) = mm_projector(x) exactly;
``vision_feature_layer = mm_vision_select_layer`` with the ``default`` strategy (drops CLS); the image token is
``<im_patch>`` itself, so token ids (and ``<im_start>``/``<im_end>`` embeddings) are unchanged. The conversation
template keeps the v0 placement (image after the question, wrapped in ``<im_start>``/``<im_end>`` when
``mm_use_im_start_end``). Proven equal on logits by ``tests/model/test_import_v0.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.checkpoint import CLIP_MEAN, CLIP_STD, CheckpointError, ImageSpec, ModelMetadata, save_model_dir
from model.protocol import V0_TEMPLATE, ConversationTemplate

V0_ARCHITECTURES = {"LlavaLlamaForCausalLM", "LlavaLlamaModel"}
IMAGE_PATCH = "<im_patch>"
IMAGE_START = "<im_start>"
IMAGE_END = "<im_end>"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def read_state_dict(directory: Path) -> dict[str, Any]:
    """All tensors of a checkpoint directory (``*.safetensors`` preferred, else ``pytorch_model*.bin``)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    tensors: dict[str, Any] = {}
    if files:
        for file in files:
            tensors.update(load_file(file))
        return tensors
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors or pytorch_model*.bin weights")
    for file in files:
        tensors.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return tensors


def _vision_config(tower: Path) -> Any:
    from transformers import CLIPVisionConfig

    raw = _read_json(tower / "config.json")
    if raw.get("model_type") == "clip":
        raw = raw.get("vision_config") or {}
    elif raw.get("model_type") != "clip_vision_model":
        raise CheckpointError(f"{tower}: not a CLIP vision tower (model_type {raw.get('model_type')!r})")
    raw = {k: v for k, v in raw.items() if k not in {"model_type", "architectures", "transformers_version"}}
    return CLIPVisionConfig(**raw)


def _tower_tensors(tower: Path) -> dict[str, Any]:
    out = {}
    for key, tensor in read_state_dict(tower).items():
        if key.startswith("vision_model."):
            out[key.removeprefix("vision_model.")] = tensor
        elif not key.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale")):
            out[key] = tensor
    return out


def import_llava_v0(source: Path, vision_tower: Path, dest: Path, name: str = "retinalgpt") -> Path:
    """Convert the v0 checkpoint at ``source`` with the CLIP tower at ``vision_tower`` into ``dest``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    source, vision_tower = Path(source), Path(vision_tower)
    if not source.is_dir():
        raise CheckpointError(f"checkpoint directory {source} does not exist")
    if not vision_tower.is_dir():
        raise CheckpointError(f"vision tower directory {vision_tower} does not exist")
    config = _read_json(source / "config.json")
    if not V0_ARCHITECTURES & set(config.get("architectures") or []):
        raise CheckpointError(
            f"{source}: architectures {config.get('architectures')} are not LLaVA v0 ({', '.join(V0_ARCHITECTURES)})"
        )
    missing = [
        k
        for k in ("mm_hidden_size", "mm_vision_select_layer", "hidden_size", "num_hidden_layers")
        if k not in config
    ]
    if missing:
        raise CheckpointError(f"{source}/config.json lacks {', '.join(missing)}")
    if config.get("use_mm_proj") is False:
        raise CheckpointError(f"{source}: use_mm_proj is false, the checkpoint has no projector")

    vision = _vision_config(vision_tower)
    if vision.hidden_size != config["mm_hidden_size"]:
        raise CheckpointError(
            f"vision tower width {vision.hidden_size} differs from mm_hidden_size {config['mm_hidden_size']} of {source}"
        )
    select = int(config["mm_vision_select_layer"])
    if not -vision.num_hidden_layers - 1 <= select <= vision.num_hidden_layers:
        raise CheckpointError(
            f"mm_vision_select_layer {select} is outside the tower's {vision.num_hidden_layers} layers"
        )

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot load the tokenizer ({exc})") from None
    patch_id = tokenizer.convert_tokens_to_ids(IMAGE_PATCH)
    if patch_id is None or patch_id == tokenizer.unk_token_id:
        raise CheckpointError(f"{source}: tokenizer lacks the {IMAGE_PATCH} token")
    use_start_end = bool(config.get("mm_use_im_start_end", False))
    if use_start_end:
        for token in (IMAGE_START, IMAGE_END):
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise CheckpointError(f"{source}: mm_use_im_start_end is set but the tokenizer lacks {token}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"

    tensors = read_state_dict(source)
    dtype = (
        tensors["model.embed_tokens.weight"].dtype
        if "model.embed_tokens.weight" in tensors
        else torch.float32
    )
    text = LlamaConfig(
        vocab_size=int(config.get("vocab_size", len(tokenizer))),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=int(config["num_attention_heads"]),
        num_key_value_heads=int(config.get("num_key_value_heads", config["num_attention_heads"])),
        max_position_embeddings=int(
            config.get("max_position_embeddings", config.get("max_sequence_length", 2048))
        ),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    image_size, patch = int(vision.image_size), int(vision.patch_size)
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=patch_id,
        image_seq_length=(image_size // patch) ** 2,
        projector_hidden_act="linear",
        vision_feature_select_strategy="default",
        vision_feature_layer=select,
        multimodal_projector_bias="model.mm_projector.bias" in tensors,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava)
    state = _convert(tensors, _tower_tensors(vision_tower), model, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()

    template = ConversationTemplate(
        name="llava_v0",
        system=V0_TEMPLATE.system,
        image_token=IMAGE_PATCH,
        image_prefix=IMAGE_START if use_start_end else "",
        image_suffix=IMAGE_END if use_start_end else "",
        image_position="after",
    )
    processor = tower_preprocessing(vision_tower)
    metadata = ModelMetadata(
        name=name,
        image=ImageSpec(
            size=image_size, image_tokens=(image_size // patch) ** 2, mean=processor[0], std=processor[1]
        ),
        template=template.to_dict(),
        provenance={
            "source": str(source),
            "format": "llava-med-v0",
            "vision_tower": str(vision_tower),
            "mm_vision_tower": config.get("mm_vision_tower"),
            "mm_vision_select_layer": select,
            "mm_use_im_start_end": use_start_end,
        },
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_model_dir(dest, model, tokenizer, metadata)


def tower_preprocessing(tower: Path) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean and std of the tower's ``preprocessor_config.json`` (CLIP's when absent)."""
    file = tower / "preprocessor_config.json"
    if not file.is_file():
        return CLIP_MEAN, CLIP_STD
    raw = _read_json(file)
    mean = tuple(float(v) for v in raw.get("image_mean", CLIP_MEAN))
    std = tuple(float(v) for v in raw.get("image_std", CLIP_STD))
    return mean, std  # type: ignore[return-value]


def _convert(tensors: dict[str, Any], tower: dict[str, Any], model: Any, dtype: Any) -> dict[str, Any]:
    """The target state dict: renamed LLaMA and projector weights, identity ``linear_2``, the CLIP tower."""
    import torch

    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = set(shapes)
    tower_prefix = (
        "model.vision_tower.vision_model."
        if any(k.startswith("model.vision_tower.vision_model.") for k in expected)
        else "model.vision_tower."
    )
    state: dict[str, Any] = {}
    for key, tensor in tensors.items():
        if key.endswith("rotary_emb.inv_freq") or key.startswith("model.vision_tower"):
            continue
        if key.startswith("model.mm_projector."):
            state["model.multi_modal_projector.linear_1." + key.removeprefix("model.mm_projector.")] = tensor
        elif key.startswith("model."):
            state["model.language_model." + key.removeprefix("model.")] = tensor
        elif key.startswith("lm_head."):
            state[key] = tensor
        else:
            raise CheckpointError(f"unexpected tensor {key!r} in the v0 checkpoint")
    for key, tensor in tower.items():
        target = tower_prefix + key
        if target in expected:
            state[target] = tensor
    hidden = state["model.multi_modal_projector.linear_1.weight"].shape[0]
    state["model.multi_modal_projector.linear_2.weight"] = torch.eye(hidden, dtype=dtype)
    if "model.multi_modal_projector.linear_1.bias" in state:
        state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(hidden, dtype=dtype)
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    for key, tensor in state.items():
        if key not in shapes:
            raise CheckpointError(f"unexpected tensor {key!r} after conversion")
        if tuple(tensor.shape) != shapes[key]:
            raise CheckpointError(f"tensor {key} has shape {tuple(tensor.shape)}, expected {shapes[key]}")
    return state
