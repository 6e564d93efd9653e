"""Equivalence proof of the LLaVA v0 / LLaVA-Med v1.0 import.

The test writes a small checkpoint in the exact v0 layout (``LlavaLlamaForCausalLM`` config with the ``mm_*`` keys,
``pytorch_model.bin`` with ``model.*`` / ``lm_head`` / ``model.mm_projector`` tensors and stale ``rotary_emb.inv_freq``
buffers, a sentencepiece ``tokenizer.model`` with ``<im_patch>``/``<im_start>``/``<im_end>`` added) and a CLIP vision
tower directory, all with random weights. It then runs the v0 forward pass re-implemented here from the published
architecture (CLIP ViT: patch conv, CLS, positions, pre-LN, pre-norm blocks with quick-GELU; hidden state of layer
``mm_vision_select_layer`` without CLS; linear projector written over the patch tokens after ``<im_start>``; LLaMA:
RMSNorm, rotary half-rotation, causal attention, SwiGLU) with plain tensor operations, imports the checkpoint, and
asserts equal logits (fp32, max abs diff ≤ 1e-4) and equal greedy output.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

VISION = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 56,
    "patch_size": 14,
    "layer_norm_eps": 1e-5,
}
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "rms_norm_eps": 1e-6,
}
SELECT_LAYER = -2
PATCHES = (VISION["image_size"] // VISION["patch_size"]) ** 2
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
QUESTION = "Which retinal diseases does this fundus photograph show, and at what grade?"


def _write_tokenizer(directory: Path) -> int:
    import sentencepiece as spm

    text = [
        SYSTEM,
        QUESTION,
        "Diabetic retinopathy: grade 2.",
        "Glaucoma: absent.",
        "Fractal_dimension is 1.452###",
    ] * 40
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=proto,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(proto.getvalue())
    size = spm.SentencePieceProcessor(model_proto=proto.getvalue()).get_piece_size()
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": 2048,
            }
        )
    )
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    (directory / "added_tokens.json").write_text(
        json.dumps({"<im_patch>": size, "<im_start>": size + 1, "<im_end>": size + 2})
    )
    return size + 3


def _random(generator: Any, *shape: int, scale: float = 0.08) -> Any:
    return torch.randn(*shape, generator=generator) * scale


def _write_v0(root: Path) -> tuple[Path, Path, dict[str, Any], dict[str, Any]]:
    """The v0 checkpoint and CLIP tower directories; returns them and their raw tensors."""
    g = torch.Generator().manual_seed(1234)
    v0, tower = root / "llava-med-v0", root / "clip"
    v0.mkdir()
    tower.mkdir()
    vocab = _write_tokenizer(v0)
    d, inter, layers = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["num_hidden_layers"]
    lm: dict[str, Any] = {
        "model.embed_tokens.weight": _random(g, vocab, d, scale=1.0),
        "model.norm.weight": 1 + _random(g, d),
        "lm_head.weight": _random(g, vocab, d, scale=0.5),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lm[p + f"self_attn.{name}.weight"] = _random(g, d, d, scale=0.2)
        lm[p + "self_attn.rotary_emb.inv_freq"] = torch.ones(d // TEXT["num_attention_heads"] // 2)
        lm[p + "mlp.gate_proj.weight"] = _random(g, inter, d, scale=0.2)
        lm[p + "mlp.up_proj.weight"] = _random(g, inter, d, scale=0.2)
        lm[p + "mlp.down_proj.weight"] = _random(g, d, inter, scale=0.2)
        lm[p + "input_layernorm.weight"] = 1 + _random(g, d)
        lm[p + "post_attention_layernorm.weight"] = 1 + _random(g, d)
    lm["model.mm_projector.weight"] = _random(g, d, VISION["hidden_size"], scale=0.3)
    lm["model.mm_projector.bias"] = _random(g, d)
    torch.save(lm, v0 / "pytorch_model.bin")
    (v0 / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlavaLlamaForCausalLM"],
                "model_type": "llava",
                "hidden_act": "silu",
                "hidden_size": d,
                "intermediate_size": inter,
                "num_attention_heads": TEXT["num_attention_heads"],
                "num_hidden_layers": layers,
                "rms_norm_eps": TEXT["rms_norm_eps"],
                "max_sequence_length": 2048,
                "vocab_size": vocab,
                "bos_token_id": 0,
                "eos_token_id": 1,
                "pad_token_id": -1,
                "mm_vision_tower": "openai/clip-vit-large-patch14",
                "mm_hidden_size": VISION["hidden_size"],
                "mm_vision_select_layer": SELECT_LAYER,
                "mm_use_im_start_end": True,
                "use_mm_proj": True,
                "sep_image_conv_front": False,
                "tune_mm_mlp_adapter": False,
                "torch_dtype": "float32",
                "use_cache": False,
            }
        )
    )

    h, vi = VISION["hidden_size"], VISION["intermediate_size"]
    grid = VISION["image_size"] // VISION["patch_size"]
    clip: dict[str, Any] = {
        "vision_model.embeddings.class_embedding": _random(g, h, scale=0.5),
        "vision_model.embeddings.patch_embedding.weight": _random(
            g, h, 3, VISION["patch_size"], VISION["patch_size"], scale=0.05
        ),
        "vision_model.embeddings.position_embedding.weight": _random(g, grid * grid + 1, h, scale=0.5),
        "vision_model.pre_layrnorm.weight": 1 + _random(g, h),
        "vision_model.pre_layrnorm.bias": _random(g, h),
        "vision_model.post_layernorm.weight": 1 + _random(g, h),
        "vision_model.post_layernorm.bias": _random(g, h),
    }
    for i in range(VISION["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            clip[p + f"self_attn.{name}.weight"] = _random(g, h, h, scale=0.2)
            clip[p + f"self_attn.{name}.bias"] = _random(g, h)
        clip[p + "layer_norm1.weight"], clip[p + "layer_norm1.bias"] = 1 + _random(g, h), _random(g, h)
        clip[p + "layer_norm2.weight"], clip[p + "layer_norm2.bias"] = 1 + _random(g, h), _random(g, h)
        clip[p + "mlp.fc1.weight"], clip[p + "mlp.fc1.bias"] = _random(g, vi, h, scale=0.2), _random(g, vi)
        clip[p + "mlp.fc2.weight"], clip[p + "mlp.fc2.bias"] = _random(g, h, vi, scale=0.2), _random(g, h)
    from safetensors.torch import save_file

    save_file(clip, tower / "model.safetensors")
    (tower / "config.json").write_text(
        json.dumps({"model_type": "clip_vision_model", "hidden_act": "quick_gelu", **VISION})
    )
    return v0, tower, lm, {k.removeprefix("vision_model."): v for k, v in clip.items()}


# ---- the v0 forward pass, from the published architecture -----------------------------------------------------


def _clip_hidden_states(pixels: Any, w: dict[str, Any]) -> list[Any]:
    h, heads, eps = VISION["hidden_size"], VISION["num_attention_heads"], VISION["layer_norm_eps"]
    x = (
        F.conv2d(pixels, w["embeddings.patch_embedding.weight"], stride=VISION["patch_size"])
        .flatten(2)
        .transpose(1, 2)
    )
    x = (
        torch.cat([w["embeddings.class_embedding"].expand(x.shape[0], 1, h), x], dim=1)
        + w["embeddings.position_embedding.weight"]
    )
    x = F.layer_norm(x, (h,), w["pre_layrnorm.weight"], w["pre_layrnorm.bias"], eps)
    states = [x]
    for i in range(VISION["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        y = F.layer_norm(x, (h,), w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], eps)
        q, k, v = (
            F.linear(y, w[p + f"self_attn.{n}.weight"], w[p + f"self_attn.{n}.bias"])
            for n in ("q_proj", "k_proj", "v_proj")
        )
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, h // heads).transpose(1, 2)
        attn = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(h // heads), dim=-1) @ split(v)
        attn = attn.transpose(1, 2).reshape(x.shape)
        x = x + F.linear(attn, w[p + "self_attn.out_proj.weight"], w[p + "self_attn.out_proj.bias"])
        y = F.layer_norm(x, (h,), w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], eps)
        y = F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])
        y = y * torch.sigmoid(1.702 * y)
        x = x + F.linear(y, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        states.append(x)
    return states


def _rms(x: Any, weight: Any) -> Any:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + TEXT["rms_norm_eps"]) * weight


def _v0_logits(ids: list[int], pixels: Any, lm: dict[str, Any], clip: dict[str, Any], start_id: int) -> Any:
    """LlavaLlamaForCausalLM.forward for one prompt: the image features replace the tokens after <im_start>."""
    d, heads = TEXT["hidden_size"], TEXT["num_attention_heads"]
    hd = d // heads
    features = _clip_hidden_states(pixels, clip)[SELECT_LAYER][:, 1:]
    features = F.linear(features, lm["model.mm_projector.weight"], lm["model.mm_projector.bias"])[0]
    x = lm["model.embed_tokens.weight"][torch.tensor(ids)]
    start = ids.index(start_id)
    x = torch.cat([x[: start + 1], features, x[start + 1 + PATCHES :]], dim=0)[None]
    t = x.shape[1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rotate = lambda u: torch.cat([-u[..., hd // 2 :], u[..., : hd // 2]], dim=-1)
    causal = torch.full((t, t), float("-inf")).triu(1)
    for i in range(TEXT["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = _rms(x, lm[p + "input_layernorm.weight"])
        q, k, v = (
            F.linear(y, lm[p + f"self_attn.{n}.weight"]).view(1, t, heads, hd).transpose(1, 2)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1) @ v
        x = x + F.linear(attn.transpose(1, 2).reshape(1, t, d), lm[p + "self_attn.o_proj.weight"])
        y = _rms(x, lm[p + "post_attention_layernorm.weight"])
        x = x + F.linear(
            F.silu(F.linear(y, lm[p + "mlp.gate_proj.weight"])) * F.linear(y, lm[p + "mlp.up_proj.weight"]),
            lm[p + "mlp.down_proj.weight"],
        )
    return F.linear(_rms(x, lm["model.norm.weight"]), lm["lm_head.weight"])[0]


def _v0_prompt(question: str) -> str:
    """LLaVA v0 eval: ``qs + "\\n" + <im_start> + <im_patch> * N + <im_end>`` in the "###" conversation."""
    image = "<im_start>" + "<im_patch>" * PATCHES + "<im_end>"
    return f"{SYSTEM}###Human: {question}\n{image}###Assistant:"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from model.importers import import_checkpoint

    root = tmp_path_factory.mktemp("v0")
    v0, tower, lm, clip = _write_v0(root)
    dest = import_checkpoint("llava-med-v0", v0, root / "imported", vision_tower=tower)
    return {"v0": v0, "tower": tower, "lm": lm, "clip": clip, "dest": dest}


def test_imported_logits_equal_the_v0_forward(imported: dict[str, Any], retina_rgb: np.ndarray) -> None:
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from model.engine import EngineOptions, RetinalGPTEngine

    tokenizer = AutoTokenizer.from_pretrained(imported["v0"])
    ids = tokenizer(_v0_prompt(QUESTION)).input_ids
    engine = RetinalGPTEngine.load(imported["dest"], EngineOptions(device="cpu", max_new_tokens=10))
    pixels = engine.pixel_values([retina_rgb]).float()
    with torch.no_grad():
        reference = _v0_logits(
            ids, pixels, imported["lm"], imported["clip"], tokenizer.convert_tokens_to_ids("<im_start>")
        )
        model = LlavaForConditionalGeneration.from_pretrained(imported["dest"], dtype=torch.float32)
        ours = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
    assert ours.shape == reference.shape
    assert float((ours - reference).abs().max()) <= 1e-4
    assert engine.encode(engine.template.prompt(QUESTION)) == ids


def test_imported_greedy_output_equals_v0_greedy(imported: dict[str, Any], retina_rgb: np.ndarray) -> None:
    from model.engine import EngineOptions, RetinalGPTEngine

    engine = RetinalGPTEngine.load(imported["dest"], EngineOptions(device="cpu", max_new_tokens=10))
    tokenizer = engine.tokenizer
    ids = tokenizer(_v0_prompt(QUESTION)).input_ids
    pixels = engine.pixel_values([retina_rgb]).float()
    start = tokenizer.convert_tokens_to_ids("<im_start>")

    def stopped(token: int) -> bool:
        return token == tokenizer.eos_token_id or "###" in tokenizer.convert_ids_to_tokens(token)

    generated: list[int] = []
    with torch.no_grad():
        for _ in range(10):
            token = int(
                _v0_logits(ids + generated, pixels, imported["lm"], imported["clip"], start)[-1].argmax()
            )
            generated.append(token)
            if stopped(token):
                break
    expected = engine.template.clean_answer(
        tokenizer.decode(generated[:-1] if stopped(generated[-1]) else generated)
    )
    assert engine.ask(retina_rgb, QUESTION) == expected

    forced = RetinalGPTEngine.load(imported["dest"], EngineOptions(device="cpu", force_new_tokens=12))
    reference: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            reference.append(
                int(_v0_logits(ids + reference, pixels, imported["lm"], imported["clip"], start)[-1].argmax())
            )
    assert forced.generate_tokens([ids], forced.image_features([retina_rgb])) == [reference]


def test_import_metadata_and_template(imported: dict[str, Any]) -> None:
    from model.checkpoint import validate_model_dir

    metadata = validate_model_dir(imported["dest"])
    template = metadata.conversation()
    assert (template.image_token, template.image_prefix, template.image_suffix, template.image_position) == (
        "<im_patch>",
        "<im_start>",
        "<im_end>",
        "after",
    )
    assert metadata.image.image_tokens == PATCHES and metadata.provenance["format"] == "llava-med-v0"
    config = json.loads((imported["dest"] / "config.json").read_text())
    assert config["projector_hidden_act"] == "linear" and config["vision_feature_layer"] == SELECT_LAYER


def test_import_rejects_inconsistent_checkpoints(imported: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    from model.checkpoint import CheckpointError
    from model.importers import import_checkpoint

    with pytest.raises(ValueError, match="vision-tower"):
        import_checkpoint("llava-med-v0", imported["v0"], tmp_path / "a")
    wrong_tower = tmp_path / "tower"
    shutil.copytree(imported["tower"], wrong_tower)
    config = json.loads((wrong_tower / "config.json").read_text())
    config["hidden_size"] = 32
    (wrong_tower / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mm_hidden_size"):
        import_checkpoint("llava-med-v0", imported["v0"], tmp_path / "b", vision_tower=wrong_tower)
    not_v0 = tmp_path / "hf"
    shutil.copytree(imported["v0"], not_v0)
    config = json.loads((not_v0 / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (not_v0 / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not LLaVA v0"):
        import_checkpoint("llava-med-v0", not_v0, tmp_path / "c", vision_tower=imported["tower"])
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        import_checkpoint("gguf", imported["v0"], tmp_path / "d")
