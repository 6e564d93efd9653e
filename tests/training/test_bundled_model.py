"""The bundled default model loads offline, is what the worker falls back to, assesses every condition it was
trained on for any gradable image (whatever dataset the image resembles), and reads photographs: referable DR on
the IDRiD test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import model
from model import protocol
from model.schema import Condition

BUNDLED = Path(model.__file__).parent / "bundled" / "retinalgpt-tiny"
TRAINED = {Condition.DIABETIC_RETINOPATHY, Condition.DIABETIC_MACULAR_EDEMA, Condition.GLAUCOMA,
           Condition.CATARACT, Condition.PATHOLOGIC_MYOPIA}


@pytest.fixture(scope="module")
def engine() -> object:
    import os

    from model.engine import EngineOptions, RetinalGPTEngine

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return RetinalGPTEngine.load(BUNDLED, EngineOptions(device="cpu", cpu_threads=1))


def test_bundled_model_is_small_calibrated_and_carded() -> None:
    from model.checkpoint import validate_model_dir

    metadata = validate_model_dir(BUNDLED)
    assert metadata.preset == "lite0" and metadata.name == "retinalgpt-tiny"
    weights = sum(p.stat().st_size for p in BUNDLED.glob("*.safetensors"))
    assert weights <= 50 * 1024 * 1024
    card = (BUNDLED / "MODEL_CARD.md").read_text()
    assert "Not for clinical use" in card and "retinalgpt train training/recipes/tiny-bundled.toml" in card
    assert "not assessed" in card
    per_dataset = metadata.provenance["data"]["per_dataset"]
    assert "eyepacs_kaggle_dr" not in per_dataset and "HEI-MED" not in per_dataset
    assert metadata.answer_format == "canonical"
    assessment = metadata.assessment
    assert assessment is not None and set(assessment.conditions) == TRAINED
    for question in assessment.questions():
        assert assessment.calibration_for(question.key).fitted_on >= 30, question.key
    assert 0.0 < assessment.threshold(Condition.REFERABLE_DIABETIC_RETINOPATHY) < 1.0


def test_worker_falls_back_to_bundled_model() -> None:
    from worker.runtime import bundled_model

    assert bundled_model() == BUNDLED


def synthetic_fundus() -> np.ndarray:
    y, x = np.mgrid[:480, :640]
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    inside = (x - 320) ** 2 + (y - 240) ** 2 < 220**2
    image[inside] = (170, 80, 35)
    image[(x - 420) ** 2 + (y - 230) ** 2 < 35**2] = (240, 220, 150)
    return image


def test_every_trained_condition_on_any_gradable_image(engine: object, retina_rgb: np.ndarray) -> None:
    results = engine.analyze([retina_rgb, synthetic_fundus()])  # type: ignore[attr-defined]
    for result in results:
        failures = [(a.task, a.answer, a.error) for a in result.answers if not a.parsed]
        assert failures == []
        findings = {f.condition: f for f in result.findings}
        assert set(findings) == TRAINED | {Condition.REFERABLE_DIABETIC_RETINOPATHY}
        assert all(f.probability is not None and 0.0 <= f.probability <= 1.0 for f in findings.values())
        assert set(result.not_assessed) == set(protocol.DISEASE_CONDITIONS) - TRAINED


@pytest.mark.shared_data
def test_referable_dr_auc_on_idrid_test_split(engine: object, shared_fundus: Path) -> None:
    from training.adapters import load_dataset
    from training.images import load_rgb
    from training.metrics import roc_auc

    records = [r for r in load_dataset("idrid_grading", shared_fundus / "idrid_grading") if r.split == "test"]
    truth, scores = [], []
    for start in range(0, len(records), 8):
        batch = records[start:start + 8]
        for record, result in zip(batch, engine.analyze([load_rgb(r.image) for r in batch]), strict=True):  # type: ignore[attr-defined]
            referable = next(f for f in result.findings if f.condition == Condition.REFERABLE_DIABETIC_RETINOPATHY)
            truth.append(record.grades[Condition.REFERABLE_DIABETIC_RETINOPATHY])
            scores.append(referable.probability)
    assert len(truth) == 59
    assert roc_auc(truth, scores) >= 0.85
