"""Import a LLaVA v0 / LLaVA-Med v1.0 checkpoint (the RetinalGPT release layout) as a transformers Llava directory.

Source layout (``LlavaLlamaForCausalLM``, ``model_type "llava"``): ``config.json`` with the LLaMA keys plus
``mm_vision_tower``, ``mm_hidden_size``, ``mm_vision_select_layer``, ``mm_use_im_start_end``, ``use_mm_proj``; weights
(``pytorch_model*.bin``, usually sharded with ``pytorch_model.bin.index.json``, or ``*.safetensors``)
``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``, ``lm_head``, ``model.mm_projector`` (one
``nn.Linear(mm_hidden_size → hidden_size)``); a LLaMA tokenizer with the added tokens ``<im_patch>``, ``<im_start>``,
``<im_end>``. The vision tower is a CLIP ViT loaded by name in v0; here from a local directory (``--vision-tower
DIR``: a ``CLIPVisionModel`` or ``CLIPModel`` directory).

As the authors' inference scripts load it (``run_retinalGPT_simple.py`` / ``run_retinalGPT.py`` with the LLaVA-Med
v1.0 model code):

* a config without ``mm_vision_tower`` is patched to ``openai/clip-vit-large-patch14`` with ``mm_hidden_size``
  1024 and ``use_mm_proj`` (recorded in the provenance); without ``mm_vision_select_layer`` the last layer (−1);
* a projector may come as a separate file (``--mm-projector FILE``: a torch or safetensors file whose keys end in
  ``weight`` and ``bias``, e.g. ``model.mm_projector.weight``), which replaces any projector in the checkpoint; its
  input width is then the tower's;
* ``<im_patch>`` (and ``<im_start>`` / ``<im_end>`` when ``mm_use_im_start_end``) are special tokens, so decoding
  without special tokens drops them; generation ends at the checkpoint's own ``eos_token_id``
  (``generation_config.json``, else ``config.json``), as its ``generate`` did;
* the prompt is LLaVA-Med v1.0's ``simple`` conversation (:data:`model.template.LLAVA_MED_SIMPLE`), recorded in
  ``retinalgpt.json`` where every string can be overridden.

The v0 forward pass: CLIP hidden states of layer ``mm_vision_select_layer`` without the CLS token → projector →
written over the ``<im_patch>`` positions of the prompt (``question\\n<im_start><im_patch>×N<im_end>``) → LLaMA.

Exact mapping to ``LlavaForConditionalGeneration``: LLaMA weights renamed under ``model.language_model``;
``mm_projector`` → ``multi_modal_projector.linear_1`` with ``projector_hidden_act = "linear"`` and
``linear_2`` the identity (weight I, bias 0), so linear_2(act(linear_1(x))) = mm_projector(x) exactly;
``vision_feature_layer = mm_vision_select_layer`` with the ``default`` strategy (drops CLS); the image token is
``<im_patch>`` itself, so token ids (and ``<im_start>``/``<im_end>`` embeddings) are unchanged. Proven equal on
logits and on greedy answers by ``tests/model/test_import_v0.py``.

A checkpoint that cannot be converted exactly gets a :class:`~model.checkpoint.CheckpointError` naming the file,
tensor or key: a shard missing, a tokenizer without the image tokens, a tensor of the wrong shape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from model.checkpoint import CLIP_MEAN, CLIP_STD, CheckpointError, ImageSpec, ModelMetadata, save_model_dir
from model.template import llava_med_simple

V0_ARCHITECTURES = {"LlavaLlamaForCausalLM", "LlavaLlamaModel"}
IMAGE_PATCH = "<im_patch>"
IMAGE_START = "<im_start>"
IMAGE_END = "<im_end>"
ASSUMED_TOWER = {"use_mm_proj": True, "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_hidden_size": 1024}
"""What the authors' scripts (``patch_config``) set when ``config.json`` has no ``mm_vision_tower``."""
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SHARD = re.compile(r"-(\d+)-of-(\d+)\.(bin|safetensors)$")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def _weight_files(directory: Path) -> tuple[list[Path], set[str] | None]:
    """The weight files of a checkpoint directory and, when an index names them, the tensor names it promises.
    An index's shards (or ``-0000k-of-0000n`` shards without an index) must all be present."""
    for name in INDEX_FILES:
        index = directory / name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            shards = sorted(set(weight_map.values()))
            missing = [shard for shard in shards if not (directory / shard).is_file()]
            if missing:
                raise CheckpointError(
                    f"{directory}: {len(missing)} of {len(shards)} weight shards named in {name} are missing: "
                    f"{', '.join(missing)}"
                )
            return [directory / shard for shard in shards], set(weight_map)
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors or pytorch_model*.bin weights")
    for file in files:
        match = SHARD.search(file.name)
        if match:
            total, width = int(match.group(2)), len(match.group(1))
            expected = [
                SHARD.sub(f"-{k:0{width}d}-of-{match.group(2)}.{match.group(3)}", file.name)
                for k in range(1, total + 1)
            ]
            missing = [shard for shard in expected if not (directory / shard).is_file()]
            if missing:
                raise CheckpointError(
                    f"{directory}: {len(missing)} of {total} weight shards are missing: {', '.join(missing)}"
                )
    return files, None


def _load(file: Path) -> dict[str, Any]:
    import pickle

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        raise CheckpointError(f"{file}: cannot read the weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise CheckpointError(f"{file} is not a state dict of named tensors")
    return loaded


def read_state_dict(directory: Path) -> dict[str, Any]:
    """All tensors of a checkpoint directory (index shards, else ``*.safetensors``, else ``pytorch_model*.bin``)."""
    files, promised = _weight_files(directory)
    tensors: dict[str, Any] = {}
    for file in files:
        tensors.update(_load(file))
    if promised is not None:
        absent = sorted(promised - set(tensors))
        if absent:
            raise CheckpointError(
                f"{directory}: {len(absent)} tensors named in the index are in no shard, e.g. {', '.join(absent[:3])}"
            )
    return tensors


def read_projector(file: Path) -> dict[str, Any]:
    """The ``weight`` and ``bias`` of a separate projector file (keys ending in ``weight`` / ``bias``, as the
    authors' scripts load it into one ``nn.Linear``)."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"projector file {file} does not exist")
    found: dict[str, Any] = {}
    for key, tensor in _load(file).items():
        part = key.rsplit(".", 1)[-1]
        if part not in ("weight", "bias"):
            raise CheckpointError(
                f"{file}: tensor {key!r} is neither a weight nor a bias (a projector file holds one linear layer)"
            )
        if part in found:
            raise CheckpointError(f"{file}: more than one tensor ends in {part!r}; which is the projector's?")
        found[part] = tensor
    for part in ("weight", "bias"):
        if part not in found:
            raise CheckpointError(f"{file} has no projector {part} (a key ending in {part!r})")
    return found


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


def _end_tokens(source: Path, config: dict[str, Any], tokenizer: Any) -> list[int]:
    """The ids the checkpoint's own ``generate`` stopped at: ``generation_config.json``'s ``eos_token_id``, else
    ``config.json``'s, else the tokenizer's EOS."""
    generation = source / "generation_config.json"
    configured = _read_json(generation).get("eos_token_id") if generation.is_file() else None
    if configured is None:
        configured = config.get("eos_token_id")
    ids = [configured] if isinstance(configured, int) else list(configured or ())
    ids = [int(i) for i in ids if isinstance(i, int) and 0 <= i < len(tokenizer)]
    return ids or [int(tokenizer.eos_token_id)]


def _tokenizer(source: Path, use_start_end: bool) -> Any:
    """The checkpoint's tokenizer with the image tokens special (so decoding skips them, as the authors' scripts'
    ``add_tokens(..., special_tokens=True)`` makes them), left padding; errors name a missing image token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: cannot load the tokenizer ({exc})") from None
    needed = [IMAGE_PATCH, IMAGE_START, IMAGE_END] if use_start_end else [IMAGE_PATCH]
    for token in needed:
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            reason = " (mm_use_im_start_end is set)" if token != IMAGE_PATCH else ""
            raise CheckpointError(
                f"{source}: the tokenizer lacks the image token {token}{reason}; "
                "a LLaVA v0 checkpoint's tokenizer has it as an added token"
            )
    size = len(tokenizer)
    tokenizer.add_tokens(needed, special_tokens=True)
    if len(tokenizer) != size:  # cannot happen after the check above; never renumber the vocabulary silently
        raise CheckpointError(f"{source}: marking the image tokens special changed the vocabulary")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    return tokenizer


def import_llava_v0(
    source: Path, vision_tower: Path, dest: Path, name: str = "retinalgpt", mm_projector: Path | None = None
) -> Path:
    """Convert the v0 checkpoint at ``source`` with the CLIP tower at ``vision_tower`` (and the projector file
    ``mm_projector``, when the projector comes separately) into ``dest``."""
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in config]
    if missing:
        raise CheckpointError(f"{source}/config.json lacks {', '.join(missing)}")
    assumed: list[str] = []
    if mm_projector is None and "mm_vision_tower" not in config:
        config = {**config, **ASSUMED_TOWER}
        assumed = sorted(ASSUMED_TOWER)

    vision = _vision_config(vision_tower)
    projector = read_projector(Path(mm_projector)) if mm_projector is not None else None
    if projector is not None:
        mm_hidden = int(vision.hidden_size)
    elif "mm_hidden_size" in config:
        mm_hidden = int(config["mm_hidden_size"])
    else:
        raise CheckpointError(f"{source}/config.json lacks mm_hidden_size")
    if vision.hidden_size != mm_hidden:
        why = (
            f" (assumed with mm_vision_tower {ASSUMED_TOWER['mm_vision_tower']}: config.json names no tower)"
            if assumed
            else ""
        )
        raise CheckpointError(
            f"vision tower width {vision.hidden_size} differs from mm_hidden_size {mm_hidden} of {source}{why}"
        )
    select = int(config.get("mm_vision_select_layer", -1))
    if not -vision.num_hidden_layers - 1 <= select <= vision.num_hidden_layers:
        raise CheckpointError(
            f"mm_vision_select_layer {select} is outside the tower's {vision.num_hidden_layers} layers"
        )

    use_start_end = bool(config.get("mm_use_im_start_end", False))
    tokenizer = _tokenizer(source, use_start_end)
    patch_id = tokenizer.convert_tokens_to_ids(IMAGE_PATCH)

    tensors = read_state_dict(source)
    if projector is not None:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("model.mm_projector.")}
        tensors["model.mm_projector.weight"], tensors["model.mm_projector.bias"] = projector["weight"], projector["bias"]
    elif "model.mm_projector.weight" not in tensors:
        raise CheckpointError(
            f"{source} holds no projector (model.mm_projector.weight); give it with --mm-projector FILE"
        )
    hidden = int(config["hidden_size"])
    where = str(mm_projector) if projector is not None else "model.mm_projector"
    _expect_shape(tensors["model.mm_projector.weight"], (hidden, mm_hidden), f"projector weight ({where})",
                  "(hidden_size, mm_hidden_size)")
    if "model.mm_projector.bias" in tensors:
        _expect_shape(tensors["model.mm_projector.bias"], (hidden,), f"projector bias ({where})", "(hidden_size,)")
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise CheckpointError(f"{source} has no model.embed_tokens.weight")
    if len(tokenizer) > embed.shape[0]:
        raise CheckpointError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens but model.embed_tokens only {embed.shape[0]} rows"
        )
    dtype = embed.dtype
    if projector is not None:  # the scripts cast the file's projector to the model's dtype
        for key in ("model.mm_projector.weight", "model.mm_projector.bias"):
            tensors[key] = tensors[key].to(dtype)
    text = LlamaConfig(
        vocab_size=int(config.get("vocab_size", embed.shape[0])),
        hidden_size=hidden,
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

    processor = tower_preprocessing(vision_tower)
    end_tokens = _end_tokens(source, config, tokenizer)
    metadata = ModelMetadata(
        name=name,
        image=ImageSpec(
            size=image_size, image_tokens=(image_size // patch) ** 2, mean=processor[0], std=processor[1]
        ),
        template=llava_med_simple(use_start_end).to_dict(),
        provenance={
            "source": str(source),
            "format": "llava-med-v0",
            "vision_tower": str(vision_tower),
            "mm_projector": str(mm_projector) if mm_projector is not None else None,
            "mm_vision_tower": config.get("mm_vision_tower"),
            "assumed_config": {key: ASSUMED_TOWER[key] for key in assumed},
            "mm_vision_select_layer": select,
            "mm_use_im_start_end": use_start_end,
            "eos_token_id": end_tokens,
        },
    )
    model.generation_config.eos_token_id = end_tokens
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_model_dir(dest, model, tokenizer, metadata)


def _expect_shape(tensor: Any, shape: tuple[int, ...], what: str, meaning: str) -> None:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{what} has shape {tuple(tensor.shape)}, expected {shape} = {meaning}")


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
    origin: dict[str, str] = {}
    for key, tensor in tensors.items():
        if key.endswith("rotary_emb.inv_freq") or key.startswith("model.vision_tower"):
            continue
        if key.startswith("model.mm_projector."):
            target = "model.multi_modal_projector.linear_1." + key.removeprefix("model.mm_projector.")
        elif key.startswith("model."):
            target = "model.language_model." + key.removeprefix("model.")
        elif key.startswith("lm_head."):
            target = key
        else:
            raise CheckpointError(f"unexpected tensor {key!r} in the v0 checkpoint")
        state[target], origin[target] = tensor, f"checkpoint tensor {key}"
    for key, tensor in tower.items():
        target = tower_prefix + key
        if target in expected:
            state[target], origin[target] = tensor, f"vision tower tensor {key}"
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
            raise CheckpointError(
                f"{origin.get(key, 'tensor ' + key)} has shape {tuple(tensor.shape)}, expected {shapes[key]} "
                "from config.json and the vision tower's config"
            )
    return state
