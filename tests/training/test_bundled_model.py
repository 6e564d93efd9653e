"""The bundled default model loads offline, is what the worker falls back to, and analyses
``skimage.data.retina()`` with every answer parsed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import model

BUNDLED = Path(model.__file__).parent / "bundled" / "retinalgpt-tiny"


def test_bundled_model_is_small_and_carded() -> None:
    from model.checkpoint import validate_model_dir

    metadata = validate_model_dir(BUNDLED)
    assert metadata.preset == "tiny" and metadata.name == "retinalgpt-tiny"
    weights = sum(p.stat().st_size for p in BUNDLED.glob("*.safetensors"))
    assert weights <= 25 * 1024 * 1024
    card = (BUNDLED / "MODEL_CARD.md").read_text()
    assert "Not for clinical use" in card and "retinalgpt train training/recipes/tiny-bundled.toml" in card
    assert "eyepacs_kaggle_dr" not in metadata.provenance["data"]["images_per_source"]
    assert "HEI-MED" not in metadata.provenance["data"]["images_per_source"]
    assert metadata.answer_format == "canonical"


def test_worker_falls_back_to_bundled_model() -> None:
    from worker.runtime import bundled_model

    assert bundled_model() == BUNDLED


def test_bundled_model_analyses_retina_offline(retina_rgb: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    from model.engine import EngineOptions, RetinalGPTEngine
    from model.schema import Condition

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    engine = RetinalGPTEngine.load(BUNDLED, EngineOptions(device="cpu", cpu_threads=1))
    assert engine.constrain_answers  # trained on canonical answers: decoded under their grammar by default
    (result,) = engine.analyze([retina_rgb])
    assert len(result.answers) == 4
    failures = [(a.task, a.answer, a.error) for a in result.answers if not a.parsed]
    assert failures == []
    scored = [f for f in result.findings if f.condition != Condition.REFERABLE_DIABETIC_RETINOPATHY]
    assert scored and all(f.probability is not None and 0.0 <= f.probability <= 1.0 for f in scored)
