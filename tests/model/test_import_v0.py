"""An imported LLaVA v0 / LLaVA-Med v1.0 checkpoint answers exactly as the RetinalGPT authors' scripts make it answer.

The test writes small checkpoints in the released layout (``LlavaLlamaForCausalLM`` config with ``model_type
"llava"`` and the ``mm_*`` keys, sharded ``pytorch_model-0000k-of-0000n.bin`` with an index, ``model.*`` / ``lm_head``
/ ``model.mm_projector`` tensors and stale ``rotary_emb.inv_freq`` buffers, a sentencepiece ``tokenizer.model`` with
``<im_patch>``/``<im_start>``/``<im_end>`` added) and a CLIP vision tower directory, all with random weights.

Independently of the runtime it implements

* the v0 forward pass from the published architecture (CLIP ViT: patch conv, CLS, positions, pre-LN, pre-norm
  blocks with quick-GELU; hidden state of layer ``mm_vision_select_layer`` (−1 when absent) without CLS; linear
  projector written over the patch tokens; LLaMA: RMSNorm, rotary half-rotation, causal attention, SwiGLU) with plain
  tensor operations, and
* the published inference procedure of ``run_retinalGPT_simple.py`` / ``run_retinalGPT.py``: LLaVA-Med v1.0's
  ``conv_templates["simple"]`` (system message, few-shot ``Hi!`` turns, ``###``, ``get_prompt`` of the SINGLE style),
  the first message ``question.strip() + "\\n" + <im_start><im_patch>×N<im_end>`` (patches only without
  ``mm_use_im_start_end``), the prompt ending after the human turn, greedy ``generate`` until the config's EOS id or
  ``max_new_tokens``, ``decode(skip_special_tokens=True)`` with the image tokens made special, the cleaning rule,
  later questions appended after the cleaned answers;

and compares it with ``retinalgpt model import … --activate`` then ``retinalgpt ask`` / ``retinalgpt chat`` / the
engine's protocol questions and likelihood scoring: greedy answers of ≥ 32 generated tokens and first-token logits
(≤ 1e-4), with and without ``mm_use_im_start_end``, the separate-projector layout, the config without a vision tower,
and a clear error for each broken checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

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
WIDE_VISION = {**VISION, "hidden_size": 1024, "intermediate_size": 64, "num_hidden_layers": 2, "image_size": 28}
"""A tower of ViT-L/14's width (1024), the width the scripts assume for a config without ``mm_vision_tower``."""
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "rms_norm_eps": 1e-6,
}
SELECT_LAYER = -2
MAX_NEW_TOKENS = 48
MIN_ANSWER_TOKENS = 32

# LLaVA-Med v1.0, llava/conversation.py, simple_conv = conv_templates["simple"] (docs/model.md cites the commit)
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
FEW_SHOT = [["Human", "Hi!"], ["Assistant", "Hi there!  How can I help you today?\n"]]
SEP = "###"
QUESTION = "Which retinal diseases does this fundus photograph show, and at what grade?"
FREE_QUESTION = "  Describe the optic disc of this retinal image.  "
FOLLOW_UP = "Is there any haemorrhage near the fovea?"
CONFIG_EOS = 1  # early LLaMA conversions (and LLaVA v0 configs) say 1 although the tokenizer's </s> is 2


# ---- the checkpoint in the released layout ------------------------------------------------------------------


def _write_tokenizer(directory: Path, image_tokens: tuple[str, ...] = ("<im_patch>", "<im_start>", "<im_end>")) -> int:
    import sentencepiece as spm

    text = [
        SYSTEM,
        QUESTION,
        FOLLOW_UP,
        "###Human: Hi!###Assistant: Hi there!  How can I help you today?\n###",
        "Diabetic retinopathy: grade 2.",
        "Glaucoma: absent.",
        "Fractal_dimension is 1.452###",
        "Assistant: Response:",
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
    (directory / "added_tokens.json").write_text(json.dumps({t: size + i for i, t in enumerate(image_tokens)}))
    return size + 3


def _random(generator: Any, *shape: int, scale: float = 0.08) -> Any:
    return torch.randn(*shape, generator=generator) * scale


@dataclass
class Checkpoint:
    """A v0 checkpoint and its CLIP tower on disk, with their raw tensors (what the reference computes with)."""

    v0: Path
    tower: Path
    lm: dict[str, Any]
    clip: dict[str, Any]
    config: dict[str, Any]
    vision: dict[str, Any]
    projector_file: Path | None = None
    projector: dict[str, Any] = field(default_factory=dict)

    @property
    def start_end(self) -> bool:
        return bool(self.config.get("mm_use_im_start_end", False))

    @property
    def select_layer(self) -> int:
        return int(self.config.get("mm_vision_select_layer", -1))

    @property
    def patches(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2


def save_shards(directory: Path, tensors: dict[str, Any], shards: int = 2) -> None:
    """``pytorch_model-0000k-of-0000n.bin`` shards and ``pytorch_model.bin.index.json``, as released."""
    for old in directory.glob("pytorch_model*"):
        old.unlink()
    keys = list(tensors)
    weight_map = {}
    for k in range(shards):
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {key: tensors[key] for key in keys[k::shards]}
        torch.save(part, directory / name)
        weight_map.update({key: name for key in part})
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )


def write_checkpoint(
    root: Path,
    *,
    start_end: bool = True,
    tower_in_config: bool = True,
    separate_projector: bool = False,
    vision: dict[str, Any] | None = None,
    seed: int = 1234,
) -> Checkpoint:
    vision = vision or VISION
    g = torch.Generator().manual_seed(seed)
    v0, tower = root / "llava-med-v0", root / "clip"
    v0.mkdir(parents=True)
    tower.mkdir(parents=True)
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
    projector = {
        "weight": _random(g, d, vision["hidden_size"], scale=0.3 * math.sqrt(48 / vision["hidden_size"])),
        "bias": _random(g, d),
    }
    checkpoint_projector = {"model.mm_projector." + k: v for k, v in projector.items()}
    config: dict[str, Any] = {
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
        "eos_token_id": CONFIG_EOS,
        "pad_token_id": -1,
        "mm_vision_tower": "openai/clip-vit-large-patch14",
        "mm_hidden_size": vision["hidden_size"],
        "mm_vision_select_layer": SELECT_LAYER,
        "mm_use_im_start_end": start_end,
        "use_mm_proj": True,
        "sep_image_conv_front": False,
        "tune_mm_mlp_adapter": False,
        "torch_dtype": "float32",
        "use_cache": False,
    }
    if not tower_in_config:  # what `patch_config` repairs: no tower, width, projector flag or layer
        for key in ("mm_vision_tower", "mm_hidden_size", "use_mm_proj", "mm_vision_select_layer"):
            del config[key]
    projector_file = None
    if separate_projector:
        projector_file = root / "mm_projector.bin"
        torch.save(checkpoint_projector, projector_file)
        # a stale projector in the checkpoint, which the file replaces
        lm["model.mm_projector.weight"] = _random(g, d, vision["hidden_size"])
        lm["model.mm_projector.bias"] = _random(g, d)
    else:
        lm.update(checkpoint_projector)
    save_shards(v0, lm)
    (v0 / "config.json").write_text(json.dumps(config))

    h, vi = vision["hidden_size"], vision["intermediate_size"]
    grid = vision["image_size"] // vision["patch_size"]
    clip: dict[str, Any] = {
        "vision_model.embeddings.class_embedding": _random(g, h, scale=0.5),
        "vision_model.embeddings.patch_embedding.weight": _random(
            g, h, 3, vision["patch_size"], vision["patch_size"], scale=0.05
        ),
        "vision_model.embeddings.position_embedding.weight": _random(g, grid * grid + 1, h, scale=0.5),
        "vision_model.pre_layrnorm.weight": 1 + _random(g, h),
        "vision_model.pre_layrnorm.bias": _random(g, h),
        "vision_model.post_layernorm.weight": 1 + _random(g, h),
        "vision_model.post_layernorm.bias": _random(g, h),
    }
    for i in range(vision["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            clip[p + f"self_attn.{name}.weight"] = _random(g, h, h, scale=0.2 * math.sqrt(48 / h))
            clip[p + f"self_attn.{name}.bias"] = _random(g, h)
        clip[p + "layer_norm1.weight"], clip[p + "layer_norm1.bias"] = 1 + _random(g, h), _random(g, h)
        clip[p + "layer_norm2.weight"], clip[p + "layer_norm2.bias"] = 1 + _random(g, h), _random(g, h)
        clip[p + "mlp.fc1.weight"], clip[p + "mlp.fc1.bias"] = _random(g, vi, h, scale=0.2), _random(g, vi)
        clip[p + "mlp.fc2.weight"], clip[p + "mlp.fc2.bias"] = _random(g, h, vi, scale=0.2), _random(g, h)
    from safetensors.torch import save_file

    save_file(clip, tower / "model.safetensors")
    (tower / "config.json").write_text(
        json.dumps({"model_type": "clip_vision_model", "hidden_act": "quick_gelu", **vision})
    )
    return Checkpoint(
        v0=v0,
        tower=tower,
        lm=lm,
        clip={k.removeprefix("vision_model."): v for k, v in clip.items()},
        config=config,
        vision=vision,
        projector_file=projector_file,
        projector=projector,
    )


# ---- the v0 forward pass, from the published architecture -----------------------------------------------------


def _clip_hidden_states(pixels: Any, w: dict[str, Any], vision: dict[str, Any]) -> list[Any]:
    h, heads, eps = vision["hidden_size"], vision["num_attention_heads"], vision["layer_norm_eps"]
    x = F.conv2d(pixels, w["embeddings.patch_embedding.weight"], stride=vision["patch_size"]).flatten(2).transpose(1, 2)
    x = (
        torch.cat([w["embeddings.class_embedding"].expand(x.shape[0], 1, h), x], dim=1)
        + w["embeddings.position_embedding.weight"]
    )
    x = F.layer_norm(x, (h,), w["pre_layrnorm.weight"], w["pre_layrnorm.bias"], eps)
    states = [x]
    for i in range(vision["num_hidden_layers"]):
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


def v0_image_features(checkpoint: Checkpoint, pixels: Any) -> Any:
    """Layer ``mm_vision_select_layer`` of the tower without CLS, through the (file's, when separate) projector."""
    states = _clip_hidden_states(pixels, checkpoint.clip, checkpoint.vision)
    if checkpoint.projector_file is not None:
        weight, bias = checkpoint.projector["weight"], checkpoint.projector["bias"]
    else:
        weight, bias = checkpoint.lm["model.mm_projector.weight"], checkpoint.lm["model.mm_projector.bias"]
    return F.linear(states[checkpoint.select_layer][:, 1:], weight, bias)[0]


def v0_hidden(ids: list[int], features: Any, checkpoint: Checkpoint, tokens: dict[str, int]) -> Any:
    """LlavaLlamaModel.forward for one prompt: with ``mm_use_im_start_end`` the features replace the N tokens after
    ``<im_start>``, else the run of N ``<im_patch>`` tokens; returns the final-normed hidden states."""
    lm = checkpoint.lm
    d, heads = TEXT["hidden_size"], TEXT["num_attention_heads"]
    hd = d // heads
    x = lm["model.embed_tokens.weight"][torch.tensor(ids)]
    n = features.shape[0]
    if checkpoint.start_end:
        first = ids.index(tokens["<im_start>"]) + 1
        assert ids[first + n] == tokens["<im_end>"]
    else:
        first = ids.index(tokens["<im_patch>"])
        assert ids[first : first + n] == [tokens["<im_patch>"]] * n
    x = torch.cat([x[:first], features, x[first + n :]], dim=0)[None]
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
    return _rms(x, lm["model.norm.weight"])[0]


# ---- the published inference procedure -------------------------------------------------------------------------


def reference_clean(outputs: str) -> str:
    """The scripts' cleaning of a ``simple`` conversation answer: strip whitespace and a leading ``###``,
    ``Assistant:`` or ``Response:`` until nothing changes, then cut at the first separator."""
    while True:
        before = len(outputs)
        outputs = outputs.strip()
        for pattern in ("###", "Assistant:", "Response:"):
            if outputs.startswith(pattern):
                outputs = outputs[len(pattern) :].strip()
        if len(outputs) == before:
            break
    if SEP not in outputs:
        outputs += SEP
    return outputs[: outputs.index(SEP)].strip()


@dataclass
class Answer:
    text: str
    new_tokens: list[int]
    answer_tokens: int
    """How many generated tokens the answer needed (its text is complete after these)."""


class Reference:
    """The authors' procedure on one image: a ``simple`` conversation, greedy generation, cleaning."""

    def __init__(self, checkpoint: Checkpoint, pixels: Any) -> None:
        from transformers import AutoTokenizer

        self.checkpoint = checkpoint
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint.v0)
        added = ["<im_patch>", "<im_start>", "<im_end>"] if checkpoint.start_end else ["<im_patch>"]
        self.tokenizer.add_tokens(added, special_tokens=True)
        self.tokens = {t: self.tokenizer.convert_tokens_to_ids(t) for t in ("<im_patch>", "<im_start>", "<im_end>")}
        with torch.no_grad():
            self.features = v0_image_features(checkpoint, pixels)
        self.messages: list[list[str]] = [list(m) for m in FEW_SHOT]
        self.asked = 0

    def query(self, question: str) -> str:
        question = question.strip()
        if self.asked:
            return question
        n = self.checkpoint.patches
        image = "<im_start>" + "<im_patch>" * n + "<im_end>" if self.checkpoint.start_end else "<im_patch>" * n
        return question + "\n" + image

    def prompt(self, messages: list[list[str]] | None = None) -> str:
        text = SYSTEM + SEP
        for role, message in messages if messages is not None else self.messages:
            text += f"{role}: {message}{SEP}" if message else f"{role}:"
        return text

    def prompt_text(self, question: str) -> str:
        return self.prompt([*self.messages, ["Human", self.query(question)]])

    def prompt_ids(self, question: str) -> list[int]:
        return self.tokenizer([self.prompt_text(question)]).input_ids[0]

    def logits(self, ids: list[int]) -> Any:
        with torch.no_grad():
            return v0_hidden(ids, self.features, self.checkpoint, self.tokens) @ self.checkpoint.lm["lm_head.weight"].T

    def ask(self, question: str, max_new_tokens: int = MAX_NEW_TOKENS) -> Answer:
        self.messages.append(["Human", self.query(question)])
        self.asked += 1
        ids = self.tokenizer([self.prompt()]).input_ids[0]
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = int(self.logits(ids + new)[-1].argmax())
            new.append(token)
            if token == self.checkpoint.config["eos_token_id"]:
                break
        text = reference_clean(self.tokenizer.batch_decode([new], skip_special_tokens=True)[0])
        self.messages.append(["Assistant", text])
        needed = next(
            k
            for k in range(len(new) + 1)
            if reference_clean(self.tokenizer.decode(new[:k], skip_special_tokens=True)) == text
        )
        return Answer(text, new, needed)


# ---- our path: import, activate, ask, chat ----------------------------------------------------------------------


def run(*args: str) -> tuple[int, str]:
    from worker.cli.app import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout if result.exit_code == 0 else result.stderr


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "retinalgpt.toml"
    config.write_text(
        f'home = "{tmp_path / "var"}"\n[model]\ndevice = "cpu"\nmax_new_tokens = {MAX_NEW_TOKENS}\n'
        '[analysis]\nvessel_method = "classical"\n'
    )
    monkeypatch.setenv("RETINALGPT_CONFIG", str(config))
    return tmp_path


def cli_import(checkpoint: Checkpoint, *extra: str) -> dict[str, Any]:
    args = ["model", "import", "--format", "llava-med-v0", str(checkpoint.v0), "--vision-tower", str(checkpoint.tower)]
    if checkpoint.projector_file is not None:
        args += ["--mm-projector", str(checkpoint.projector_file)]
    code, out = run(*args, *extra, "--activate", "--json")
    assert code == 0, out
    return json.loads(out)


def active_engine() -> Any:
    from model.engine import EngineOptions, RetinalGPTEngine
    from worker.config import load_settings
    from worker.runtime import model_directory

    path = model_directory(load_settings())
    return RetinalGPTEngine.load(path, EngineOptions(device="cpu", max_new_tokens=MAX_NEW_TOKENS))


def fundus_png(directory: Path, retina_rgb: np.ndarray) -> tuple[Path, np.ndarray]:
    """A PNG of the photograph and the RGB pixels `retinalgpt ask` reads back from it."""
    from PIL import Image

    path = directory / "fundus.png"
    Image.fromarray(np.ascontiguousarray(retina_rgb[::4, ::4])).save(path)
    return path, np.asarray(Image.open(path).convert("RGB"))


def first_token_logits(engine: Any, question: str, rgb: np.ndarray) -> tuple[list[int], Any]:
    ids = engine.encode(engine.template.prompt(question))
    with torch.no_grad():
        _, logits, _, _ = engine._prefill([ids], engine.image_features([rgb]))
    return ids, logits[0]


def assert_same_answer(ours: str, reference: Answer) -> None:
    assert reference.answer_tokens >= MIN_ANSWER_TOKENS, reference  # a long greedy text, not a lucky short one
    assert ours == reference.text


@pytest.fixture(scope="module", params=[True, False], ids=["im_start_end", "patches_only"])
def released(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return write_checkpoint(tmp_path_factory.mktemp("released"), start_end=request.param)


def test_ask_after_cli_import_gives_the_published_answers(
    env: Path, released: Checkpoint, retina_rgb: np.ndarray
) -> None:
    entry = cli_import(released)
    assert entry["active"] and entry["provenance"]["format"] == "llava-med-v0"
    code, out = run("model", "info", "--json")
    template = json.loads(out)["template"]
    assert code == 0 and template["name"] == "llava_med_simple" and template["few_shot"] == FEW_SHOT
    image, rgb = fundus_png(env, retina_rgb)
    engine = active_engine()
    pixels = engine.pixel_values([rgb]).float()
    for question in (QUESTION, FREE_QUESTION):
        reference = Reference(released, pixels)
        expected_ids = reference.prompt_ids(question)
        ids, logits = first_token_logits(engine, question, rgb)
        assert ids == expected_ids  # the published prompt, token for token
        assert float((logits - reference.logits(expected_ids)[-1]).abs().max()) <= 1e-4
        code, out = run("ask", str(image), question, "--json")
        assert code == 0, out
        assert_same_answer(json.loads(out)["answer"], reference.ask(question))


def _store_study(settings: Any, dcm: Path, study_uid: str) -> None:
    import pydicom

    from model.schema import ImageAnalysis, Laterality, StudyAnalysis
    from worker.db import Analysis, Database, Instance, Series, Study

    ds = pydicom.dcmread(dcm, stop_before_pixels=True)
    db = Database(settings.database.url)
    try:
        with db.session() as session:
            study = Study(study_instance_uid=study_uid, patient_id="PAT001")
            series = Series(study=study, series_instance_uid=ds.SeriesInstanceUID, modality="OP")
            session.add_all([study, series])
            session.flush()
            session.add(
                Instance(
                    study=study,
                    series=series,
                    sop_instance_uid=ds.SOPInstanceUID,
                    sop_class_uid=ds.SOPClassUID,
                    transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                    path=str(dcm),
                    size_bytes=dcm.stat().st_size,
                    sha256=hashlib.sha256(dcm.read_bytes()).hexdigest(),
                    calling_ae_title="CAMERA1",
                    peer_host="127.0.0.1",
                    revision=1,
                    analysable=True,
                )
            )
            analysis = StudyAnalysis(
                study_instance_uid=study_uid,
                images=[ImageAnalysis(sop_instance_uid=ds.SOPInstanceUID, laterality=Laterality.RIGHT)],
            )
            session.add(
                Analysis(study=study, revision=1, model_name="retinalgpt", model_version="v1",
                         result=analysis.model_dump(mode="json"))
            )
    finally:
        db.dispose()


def _chat_answers(settings: Any, study_uid: str) -> list[tuple[str, str]]:
    from sqlalchemy import select

    from worker.db import AuditEvent, Database

    db = Database(settings.database.url)
    try:
        with db.session() as session:
            events = session.scalars(
                select(AuditEvent).where(AuditEvent.action == "chat").order_by(AuditEvent.id)
            ).all()
            return [(e.detail["question"], e.detail["answer"]) for e in events if e.study_instance_uid == study_uid]
    finally:
        db.dispose()


def test_chat_conversation_follows_run_retinalgpt(env: Path, released: Checkpoint, retina_rgb: np.ndarray,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two questions in `retinalgpt chat` about a stored study: the second is a plain human turn after the cleaned
    first answer, the image only in the first; the study's stored results stay out of the published prompt. Each
    exchange is audited once by the command (full text kept here, so the answers can be compared)."""
    from tests.dicom_node.dicom_fixtures import make_op, write_jpeg
    from worker.config import load_settings
    from worker.pipeline.sources import decode_limits, load_dicom

    cli_import(released)
    assert run("db", "upgrade")[0] == 0
    settings = load_settings()
    study_uid = "1.2.826.0.1.3680043.8.498.14"
    jpeg = write_jpeg(np.ascontiguousarray(retina_rgb[::4, ::4]), env / "retina.jpg")
    dcm = make_op(jpeg, env / "op.dcm", study_uid=study_uid)
    _store_study(settings, dcm, study_uid)

    monkeypatch.setenv("RETINALGPT_AUDIT__CHAT_TEXT", "full")
    code, out = run("chat", study_uid, "-q", QUESTION, "-q", FOLLOW_UP)
    assert code == 0, out
    ours = _chat_answers(settings, study_uid)

    engine = active_engine()
    reference = Reference(released, engine.pixel_values([load_dicom(dcm, decode_limits(settings)).rgb]).float())
    first, second = reference.ask(QUESTION), reference.ask(FOLLOW_UP)
    assert [q for q, _ in ours] == [QUESTION, FOLLOW_UP]
    assert_same_answer(ours[0][1], first)
    assert_same_answer(ours[1][1], second)
    assert reference.prompt().count("<im_patch>") == released.patches  # the image went with the first question only


def test_protocol_questions_use_the_published_prompt(env: Path, released: Checkpoint, retina_rgb: np.ndarray) -> None:
    from model import protocol
    from model.engine import EngineOptions, RetinalGPTEngine

    entry = cli_import(released)
    rgb = np.ascontiguousarray(retina_rgb[::4, ::4])
    engine = RetinalGPTEngine.load(
        Path(entry["path"]), EngineOptions(device="cpu", max_new_tokens=MAX_NEW_TOKENS, score_findings=False)
    )
    images = [rgb, np.ascontiguousarray(rgb[::-1])]
    result = engine.analyze(images)
    long_answers = 0
    for image, pixels in zip(result, images, strict=True):
        features = engine.pixel_values([pixels]).float()
        assert [a.task for a in image.answers] == [t.value for t in protocol.Task]
        for answer in image.answers:
            reference = Reference(released, features).ask(protocol.question(protocol.Task(answer.task)))
            assert answer.answer == reference.text
            long_answers += reference.answer_tokens >= MIN_ANSWER_TOKENS
    assert long_answers >= 4


def _log_likelihood(reference: Reference, question: str, text: str) -> float:
    """log P(text | published prompt) under the v0 model, ``text`` tokenised as it follows the prompt."""
    prompt_ids = reference.prompt_ids(question)
    full = reference.tokenizer([reference.prompt_text(question) + text]).input_ids[0]
    assert full[: len(prompt_ids)] == prompt_ids
    logp = torch.log_softmax(reference.logits(full)[:-1].double(), dim=-1)
    return float(sum(logp[i - 1, full[i]] for i in range(len(prompt_ids), len(full))))


def test_likelihood_scoring_scores_what_the_model_would_write(
    env: Path, tmp_path_factory: pytest.TempPathFactory, retina_rgb: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the published prompt (no opened role) the model writes ``Assistant: <answer>``; candidate answers are
    scored as exactly that text, tokenised in context (SentencePiece would give the text alone another first
    token)."""
    from model import protocol
    from model.schema import Condition

    checkpoint = write_checkpoint(tmp_path_factory.mktemp("scoring"))
    cli_import(checkpoint)
    engine = active_engine()
    rgb = np.ascontiguousarray(retina_rgb[::4, ::4])
    reference = Reference(checkpoint, engine.pixel_values([rgb]).float())
    question = protocol.question(protocol.Task.DISEASE_GRADE)

    answers = ["Glaucoma: absent.", "Glaucoma: present.", "Diabetic retinopathy: grade 2."]
    prompt_text = engine.template.prompt(question)
    ours = engine.score_candidates(
        [engine.encode(prompt_text)],
        engine.image_features([rgb]),
        [(0, [engine.continuation(prompt_text, a) for a in answers])],
    )[0]
    expected = torch.softmax(
        torch.tensor([_log_likelihood(reference, question, "Assistant: " + a) for a in answers]), dim=0
    )
    assert np.allclose(ours, expected.numpy(), atol=1e-4)

    canned = "Diabetic retinopathy: grade 1.\nGlaucoma: absent."
    monkeypatch.setattr(engine, "_generate", lambda rows, *args, **kwargs: [canned for _ in rows])
    engine.options = type(engine.options)(**{**engine.options.__dict__, "tasks": (protocol.Task.DISEASE_GRADE,)})
    findings = {f.condition: f for f in engine.analyze([rgb])[0].findings}
    dr = [_log_likelihood(reference, question, f"Assistant: Diabetic retinopathy: grade {g}.") for g in range(5)]
    glaucoma = [
        _log_likelihood(reference, question, f"Assistant: Diabetic retinopathy: grade 1.\nGlaucoma: {word}.")
        for word in ("absent", "present")
    ]
    assert np.allclose(findings[Condition.DIABETIC_RETINOPATHY].grade_probabilities,
                       torch.softmax(torch.tensor(dr), 0).numpy(), atol=1e-4)
    assert np.allclose(findings[Condition.GLAUCOMA].grade_probabilities,
                       torch.softmax(torch.tensor(glaucoma), 0).numpy(), atol=1e-4)


def _steer(checkpoint: Checkpoint, reference: Reference, question: str, text: str) -> None:
    """Set the ``lm_head`` rows of ``text``'s tokens so that greedy decoding after the published prompt writes
    ``text`` first (each row along the hidden state where its token is due, above every other logit), then save."""
    prompt_ids = reference.prompt_ids(question)
    steered = reference.tokenizer(text, add_special_tokens=False).input_ids
    if not reference.tokenizer.decode(steered[:1]):  # SentencePiece's lone word-start piece
        steered = steered[1:]
    full = prompt_ids + steered
    head = checkpoint.lm["lm_head.weight"]
    assert len(set(steered)) == len(steered), "one lm_head row per steered token"
    with torch.no_grad():
        hidden = v0_hidden(full[:-1], reference.features, checkpoint, reference.tokens)
    for _ in range(3):  # a later row may outbid an earlier position; re-set until every position wins
        for position in range(len(prompt_ids), len(full)):
            state = hidden[position - 1]
            others = torch.cat([head[: full[position]], head[full[position] + 1 :]]) @ state
            head[full[position]] = state * (float(others.max()) + 4.0) / float(state @ state)
    save_shards(checkpoint.v0, checkpoint.lm)


def _steer_at(checkpoint: Checkpoint, pixels: Any, question: str, position: int, token: int) -> None:
    """Set ``token``'s ``lm_head`` row so that greedy decoding writes it as new token ``position`` (re-set until
    the tokens before it, which the new row may outbid, are stable), then save."""
    head = checkpoint.lm["lm_head.weight"]
    for _ in range(5):
        reference = Reference(checkpoint, pixels)
        prompt = reference.prompt_ids(question)
        generated = reference.ask(question, max_new_tokens=position + 1).new_tokens
        if len(generated) == position + 1 and generated[position] == token:
            break
        ids = prompt + generated[:position]
        with torch.no_grad():
            state = v0_hidden(ids, reference.features, checkpoint, reference.tokens)[-1]
        others = torch.cat([head[:token], head[token + 1 :]]) @ state
        head[token] = state * (float(others.max()) + 4.0) / float(state @ state)
    else:
        raise AssertionError("steering did not converge")
    save_shards(checkpoint.v0, checkpoint.lm)


def test_a_leading_separator_and_role_are_cleaned_not_taken_for_the_end(
    env: Path, tmp_path_factory: pytest.TempPathFactory, retina_rgb: np.ndarray
) -> None:
    """The released model writes ``Assistant: …`` after the prompt, and a ``###`` may come first: the scripts
    strip both and read on, so decoding must not stop at that first separator."""
    checkpoint = write_checkpoint(tmp_path_factory.mktemp("steered"), seed=1)
    image, rgb = fundus_png(env, retina_rgb)
    from model.checkpoint import CLIP_MEAN, CLIP_STD

    pixels = torch.from_numpy(_clip_pixels(rgb, VISION["image_size"], CLIP_MEAN, CLIP_STD))
    _steer(checkpoint, Reference(checkpoint, pixels), FREE_QUESTION, "###Assistant:")
    separator = Reference(checkpoint, pixels).tokenizer.convert_tokens_to_ids("###")
    assert separator != 0  # one token, as in LLaMA's vocabulary
    _steer_at(checkpoint, pixels, FREE_QUESTION, 40, separator)
    reference = Reference(checkpoint, pixels)
    expected = reference.ask(FREE_QUESTION)
    raw = reference.tokenizer.decode(expected.new_tokens, skip_special_tokens=True)
    assert raw.startswith("###Assistant:") and expected.text and not expected.text.startswith("Assistant")
    assert expected.new_tokens[40] == separator and len(expected.new_tokens) > 41  # the scripts read on past it
    cli_import(checkpoint)
    assert float((active_engine().pixel_values([rgb]).float() - pixels).abs().max()) < 1e-5
    code, out = run("ask", str(image), FREE_QUESTION, "--json")
    assert code == 0, out
    assert_same_answer(json.loads(out)["answer"], expected)


def _clip_pixels(rgb: np.ndarray, size: int, mean: Any, std: Any) -> np.ndarray:
    """CLIP preprocessing (shortest edge bicubic, centre crop, normalise), as the engine does it."""
    from PIL import Image

    image = Image.fromarray(rgb)
    scale = size / min(image.size)
    resized = image.resize(
        (max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))), Image.Resampling.BICUBIC
    )
    left, top = (resized.size[0] - size) // 2, (resized.size[1] - size) // 2
    crop = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    normalised = (crop.transpose(2, 0, 1) - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(
        std, np.float32
    )[:, None, None]
    return normalised[None].astype(np.float32)


@pytest.mark.parametrize("layout", ["separate_projector", "no_tower_in_config"])
def test_other_released_layouts(
    layout: str, env: Path, tmp_path_factory: pytest.TempPathFactory, retina_rgb: np.ndarray
) -> None:
    """``--mm-projector FILE`` replaces the checkpoint's projector (input width = the tower's); a config without
    ``mm_vision_tower`` is read as the scripts patch it (ViT-L/14, width 1024, last layer)."""
    if layout == "separate_projector":
        checkpoint = write_checkpoint(tmp_path_factory.mktemp(layout), separate_projector=True, seed=11)
    else:
        checkpoint = write_checkpoint(
            tmp_path_factory.mktemp(layout), tower_in_config=False, vision=WIDE_VISION, seed=5
        )
    entry = cli_import(checkpoint)
    provenance = entry["provenance"]
    if layout == "separate_projector":
        assert provenance["mm_projector"] == str(checkpoint.projector_file)
    else:
        assert provenance["assumed_config"] == {
            "mm_hidden_size": 1024, "mm_vision_tower": "openai/clip-vit-large-patch14", "use_mm_proj": True
        }
        assert provenance["mm_vision_select_layer"] == -1
        code, out = run("model", "import", "--format", "llava-med-v0", str(checkpoint.v0),
                        "--vision-tower", str(checkpoint.tower), "--version", "again")
        assert code == 0 and "note: config.json names no vision tower" in out, out
    image, rgb = fundus_png(env, retina_rgb)
    engine = active_engine()
    reference = Reference(checkpoint, engine.pixel_values([rgb]).float())
    ids, logits = first_token_logits(engine, QUESTION, rgb)
    assert ids == reference.prompt_ids(QUESTION)
    assert float((logits - reference.logits(ids)[-1]).abs().max()) <= 1e-4
    code, out = run("ask", str(image), QUESTION, "--json")
    assert code == 0, out
    assert_same_answer(json.loads(out)["answer"], reference.ask(QUESTION))


# ---- clear errors -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return write_checkpoint(tmp_path_factory.mktemp("plain"))


def _copy(checkpoint: Checkpoint, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(checkpoint.v0, target)
    return target


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_broken_checkpoints_get_clear_errors(plain: Checkpoint, tmp_path: Path) -> None:
    from model.checkpoint import CheckpointError
    from model.importers import import_checkpoint

    def fails(source: Path, match: str, **kwargs: Any) -> None:
        kwargs.setdefault("vision_tower", plain.tower)
        with pytest.raises(CheckpointError, match=match):
            import_checkpoint("llava-med-v0", source, tmp_path / "out", **kwargs)
        shutil.rmtree(source, ignore_errors=True)

    source = _copy(plain, tmp_path)
    (source / "pytorch_model-00002-of-00002.bin").unlink()
    fails(source, r"1 of 2 weight shards named in pytorch_model.bin.index.json are missing: pytorch_model-00002")

    source = _copy(plain, tmp_path)
    (source / "pytorch_model.bin.index.json").unlink()
    (source / "pytorch_model-00001-of-00002.bin").unlink()
    fails(source, r"1 of 2 weight shards are missing: pytorch_model-00001-of-00002.bin")

    source = _copy(plain, tmp_path)
    index = json.loads((source / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "pytorch_model-00001-of-00002.bin"
    (source / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    fails(source, r"1 tensors named in the index are in no shard, e.g. model.layers.9.mlp.up_proj.weight")

    source = _copy(plain, tmp_path)
    added = json.loads((source / "added_tokens.json").read_text())
    (source / "added_tokens.json").write_text(json.dumps({"<im_start>": added["<im_start>"]}))
    fails(source, r"the tokenizer lacks the image token <im_patch>")

    source = _copy(plain, tmp_path)
    (source / "added_tokens.json").write_text(json.dumps({"<im_patch>": json.loads(
        (plain.v0 / "added_tokens.json").read_text())["<im_patch>"]}))
    fails(source, r"the tokenizer lacks the image token <im_start> \(mm_use_im_start_end is set\)")

    source = _copy(plain, tmp_path)
    _edit_json(source / "config.json", mm_hidden_size=32)
    fails(source, r"vision tower width 48 differs from mm_hidden_size 32")

    source = _copy(plain, tmp_path)
    tensors = {**plain.lm, "model.mm_projector.weight": torch.zeros(TEXT["hidden_size"], 40)}
    save_shards(source, tensors)
    fails(source, r"projector weight \(model.mm_projector\) has shape \(64, 40\), expected \(64, 48\)")

    source = _copy(plain, tmp_path)
    _edit_json(source / "config.json", vocab_size=500)
    fails(source, r"checkpoint tensor model.embed_tokens.weight has shape \(403, 64\), expected \(500, 64\)")

    source = _copy(plain, tmp_path)
    save_shards(source, {k: v for k, v in plain.lm.items() if not k.startswith("model.mm_projector")})
    fails(source, r"holds no projector \(model.mm_projector.weight\); give it with --mm-projector FILE")

    wide_tower = tmp_path / "wide"
    shutil.copytree(plain.tower, wide_tower)
    _edit_json(wide_tower / "config.json", hidden_size=1000)
    source = _copy(plain, tmp_path)
    config = json.loads((source / "config.json").read_text())
    del config["mm_vision_tower"]
    (source / "config.json").write_text(json.dumps(config))
    fails(source, r"differs from mm_hidden_size 1024 .*assumed with mm_vision_tower openai/clip-vit-large-patch14",
          vision_tower=wide_tower)

    for name, content, match in [
        ("extra.bin", {"model.mm_projector.weight": plain.lm["model.mm_projector.weight"],
                       "model.mm_projector.bias": plain.lm["model.mm_projector.bias"],
                       "model.mm_projector.scale": torch.ones(1)}, "neither a weight nor a bias"),
        ("nobias.bin", {"model.mm_projector.weight": plain.lm["model.mm_projector.weight"]}, "has no projector bias"),
        ("twice.bin", {"a.weight": plain.lm["model.mm_projector.weight"],
                       "b.weight": plain.lm["model.mm_projector.weight"]}, "more than one tensor ends in 'weight'"),
        ("narrow.bin", {"weight": torch.zeros(64, 40), "bias": torch.zeros(64)},
         r"projector weight \(.*narrow.bin\) has shape \(64, 40\), expected \(64, 48\)"),
    ]:
        torch.save(content, tmp_path / name)
        fails(_copy(plain, tmp_path), match, mm_projector=tmp_path / name)
    fails(_copy(plain, tmp_path), "projector file .* does not exist", mm_projector=tmp_path / "absent.bin")
    with pytest.raises(ValueError, match="vision-tower"):
        import_checkpoint("llava-med-v0", plain.v0, tmp_path / "a")
    with pytest.raises(ValueError, match="--mm-projector belongs to --format llava-med-v0"):
        import_checkpoint("hf-llava", plain.v0, tmp_path / "b", mm_projector=tmp_path / "extra.bin")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        import_checkpoint("gguf", plain.v0, tmp_path / "d")


def test_cli_reports_a_missing_shard_in_one_line(env: Path, plain: Checkpoint) -> None:
    source = _copy(plain, env)
    (source / "pytorch_model-00001-of-00002.bin").unlink()
    code, out = run("model", "import", "--format", "llava-med-v0", str(source), "--vision-tower", str(plain.tower))
    assert code == 1 and "weight shards named in pytorch_model.bin.index.json are missing" in out
    assert len(out.strip().splitlines()) == 1
    code, out = run("model", "list", "--json")
    assert code == 0 and json.loads(out) == []  # nothing half-imported


# ---- the template itself --------------------------------------------------------------------------------------


def test_the_recorded_template_is_llava_med_v1_simple(plain: Checkpoint, tmp_path: Path) -> None:
    from model.checkpoint import validate_model_dir
    from model.importers import import_checkpoint

    dest = import_checkpoint("llava-med-v0", plain.v0, tmp_path / "imported", vision_tower=plain.tower)
    stored = json.loads((dest / "retinalgpt.json").read_text())["template"]
    assert stored["system"] == SYSTEM and stored["sep"] == SEP and stored["roles"] == ["Human", "Assistant"]
    assert stored["few_shot"] == FEW_SHOT and "there!  How" in stored["few_shot"][1][1]
    assert stored["open_assistant"] is False and stored["continuation_prefix"] == "Assistant: "
    assert stored["strip_prefixes"] == ["###", "Assistant:", "Response:"]
    template = validate_model_dir(dest).conversation()
    reference = Reference(plain, torch.zeros(1, 3, 56, 56))
    prompt = template.prompt(QUESTION).replace("<im_patch>", "<im_patch>" * plain.patches)
    assert prompt == reference.prompt([*reference.messages, ["Human", reference.query(QUESTION)]])
    assert prompt.endswith("<im_end>###")
    history = [(QUESTION, "An answer."), (FOLLOW_UP, "")]
    reference.messages += [["Human", reference.query(QUESTION)], ["Assistant", "An answer."]]
    reference.asked = 1
    reference.messages += [["Human", FOLLOW_UP], ["Assistant", ""], ["Human", "Why?"]]
    expected = reference.prompt()
    assert template.prompt("Why?", history=history).replace("<im_patch>", "<im_patch>" * plain.patches) == expected
    assert template.prompt(QUESTION, context="Stored results.") == template.prompt(QUESTION)


def test_template_strings_are_overridable_in_retinalgpt_json(plain: Checkpoint, tmp_path: Path) -> None:
    from model.checkpoint import CheckpointError, read_metadata
    from model.engine import RetinalGPTEngine
    from model.importers import import_checkpoint

    dest = import_checkpoint("llava-med-v0", plain.v0, tmp_path / "imported", vision_tower=plain.tower)
    meta = json.loads((dest / "retinalgpt.json").read_text())
    meta["template"].update(system="You are RetinalGPT.", few_shot=[], continuation_prefix=" Assistant: ")
    (dest / "retinalgpt.json").write_text(json.dumps(meta))
    engine = RetinalGPTEngine.load(dest)
    assert engine.template.prompt("Q?").startswith("You are RetinalGPT.###Human: Q?\n<im_start>")
    assert engine.continuation("x###", "grade 1.") == engine.tokenizer("x### Assistant: grade 1.").input_ids[
        len(engine.tokenizer("x###").input_ids):
    ]
    for bad, match in [({"sytem": "typo"}, "unknown template key"), ({"few_shot": [["Human"]]}, "2 strings"),
                       ({"open_assistant": "no"}, "true or false"), ({"image_position": "middle"}, "image_position")]:
        broken = json.loads(json.dumps(meta))
        broken["template"].update(bad)
        (dest / "retinalgpt.json").write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=match):
            read_metadata(dest)


CLEANING_CASES = [
    "Assistant: The optic disc is pale.###Human: and?",
    " ### Assistant: Response: Drusen.### more",
    "###",
    "",
    "   \n",
    "Assistant:Response:###Assistant: nested ### cut",
    "The end without separator  ",
    "Response: first###",
    "Assistant ### not a role",
    "##Assistant: ## not a separator",
]


@pytest.mark.parametrize("text", CLEANING_CASES)
def test_cleaning_equals_the_scripts_rule(text: str) -> None:
    from model.template import LLAVA_MED_SIMPLE

    assert LLAVA_MED_SIMPLE.clean_answer(text) == reference_clean(text)


def test_answer_complete_means_more_text_cannot_change_the_answer() -> None:
    """Decoding stops once ``answer_complete``; no continuation may then change the cleaned answer, and every text
    that is not complete has a continuation that changes it."""
    from model.template import LLAVA_MED_SIMPLE, NATIVE_TEMPLATE

    pieces = ["#", "##", "###", " ", "\n", "Assistant:", "Assistant", ":", "Response:", "a", "b."]
    rng = random.Random(14)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 7)))
        more = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
        for template in (LLAVA_MED_SIMPLE, NATIVE_TEMPLATE):
            if template.answer_complete(text):
                assert template.clean_answer(text + more) == template.clean_answer(text), (text, more)
            else:
                assert template.clean_answer(text + " z###") != template.clean_answer(text), text


def test_our_own_models_keep_the_native_template(tiny_dir: Path) -> None:
    from model.checkpoint import validate_model_dir
    from model.template import NATIVE_TEMPLATE

    template = validate_model_dir(tiny_dir).conversation()
    assert template == NATIVE_TEMPLATE and template.name == "llava_v0"
    prompt = template.prompt("Grade it.", history=[("What is this?", "A fundus photograph.")], context="DR 2.")
    assert prompt == (
        f"{SYSTEM}\nDR 2.###Human: <image>\nWhat is this?###Assistant: A fundus photograph.###"
        "Human: Grade it.###Assistant:"
    )
    assert template.continuation_prefix == " " and template.few_shot == ()
