"""Model directory format, presets, HF-llava round trip, registry (versions, active pointer, rollback, Device UID)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.checkpoint import CheckpointError, checkpoint_sha256, device_uid, validate_model_dir
from model.registry import ModelRegistry, RegistryError, resolve_model_path


def test_tiny_preset_builds_offline_and_is_small(
    tiny: tuple[Any, Any, Any], tiny_dir: Path, tmp_path: Path
) -> None:
    from model.presets import parameter_count, save_preset

    model, tokenizer, metadata = tiny
    assert parameter_count(model) <= 10_000_000
    assert metadata.image.image_tokens == 64 and metadata.preset == "tiny"
    for token in ("<image>", "###", "<s>", "</s>", "<pad>"):
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1, token
    assert tokenizer.padding_side == "left"
    bundled = save_preset("tiny", tmp_path / "fp16", dtype="float16")
    size = sum(f.stat().st_size for f in bundled.iterdir())
    assert size <= 25 * 1024 * 1024
    assert validate_model_dir(bundled).preset == "tiny"


def test_paper_preset_has_the_published_shapes() -> None:
    import torch

    from model.presets import build_model, parameter_count

    model, _, metadata = build_model("paper", device="meta")
    config = model.config
    assert metadata.image.size == 224 and metadata.image.image_tokens == 256
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.projector_hidden_act == "linear"
    assert (
        config.text_config.hidden_size,
        config.text_config.num_hidden_layers,
        config.text_config.vocab_size,
    ) == (4096, 32, 32004)
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (1024, 24)
    assert 7.0e9 < parameter_count(model) < 7.4e9
    assert next(model.parameters()).device == torch.device("meta")


def test_hf_llava_round_trip(
    tiny: tuple[Any, Any, Any], tiny_dir: Path, tmp_path: Path, retina_rgb: np.ndarray
) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    from model.engine import EngineOptions, RetinalGPTEngine
    from model.importers import import_checkpoint

    plain = tmp_path / "plain-hf"
    shutil.copytree(tiny_dir, plain)
    (plain / "retinalgpt.json").unlink()  # a native Llava directory knows nothing of RetinalGPT
    imported = import_checkpoint("hf-llava", plain, tmp_path / "imported")
    assert checkpoint_sha256(imported) == checkpoint_sha256(tiny_dir)
    assert validate_model_dir(imported).provenance["format"] == "hf-llava"

    model, tokenizer, metadata = tiny
    engine = RetinalGPTEngine.load(imported, EngineOptions(device="cpu", max_new_tokens=10))
    pixels = engine.pixel_values([retina_rgb])
    ids = torch.tensor([engine.encode(engine.template.prompt("What is shown?"))])
    reloaded = LlavaForConditionalGeneration.from_pretrained(imported, dtype=torch.float32)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels).logits
        b = reloaded(input_ids=ids, pixel_values=pixels).logits
    assert float((a - b).abs().max()) <= 1e-5
    reference = RetinalGPTEngine.from_model(model, tokenizer, metadata, EngineOptions(max_new_tokens=10))
    assert engine.ask(retina_rgb, "What is shown?") == reference.ask(retina_rgb, "What is shown?")

    with pytest.raises(CheckpointError, match="not 'llava'"):
        bad = tmp_path / "bad"
        shutil.copytree(plain, bad)
        config = json.loads((bad / "config.json").read_text())
        config["model_type"] = "llama"
        (bad / "config.json").write_text(json.dumps(config))
        import_checkpoint("hf-llava", bad, tmp_path / "bad-out")


def test_registry_versions_activation_and_rollback(tiny_dir: Path, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    assert registry.list() == [] and registry.active() is None
    assert resolve_model_path(None, tmp_path / "models") is None
    first = registry.register(tiny_dir, activate=True)
    assert first.version == "v1" and first.active
    assert first.sha256 == checkpoint_sha256(tiny_dir) and first.device_uid == device_uid(first.sha256)
    assert validate_model_dir(first.path).version == "v1"
    assert first.identity.device_uid == first.device_uid and first.identity.version == "v1"

    changed = tmp_path / "changed"
    shutil.copytree(tiny_dir, changed)
    weights = next(changed.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    second = registry.register(changed, version="2026.11-a")
    assert second.device_uid != first.device_uid and not second.active
    assert registry.active().version == "v1"  # type: ignore[union-attr]

    registry.activate("2026.11-a")
    assert registry.active().version == "2026.11-a"  # type: ignore[union-attr]
    assert resolve_model_path(None, tmp_path / "models") == second.path
    assert registry.rollback().version == "v1"
    assert registry.active().version == "v1"  # type: ignore[union-attr]
    with pytest.raises(RegistryError, match="no earlier"):
        registry.rollback()
    with pytest.raises(RegistryError, match="already exists"):
        registry.register(tiny_dir, version="v1")
    with pytest.raises(RegistryError, match="unknown model version"):
        registry.activate("v9")
    with pytest.raises(RegistryError, match="letters, digits"):
        registry.register(tiny_dir, version="../escape")
    assert [v.version for v in registry.list()] == ["v1", "2026.11-a"]
    assert registry.register(tiny_dir).version == "v2"
