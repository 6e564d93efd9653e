"""The bundled default model loads offline, is what the worker falls back to, assesses every condition it was
trained on for any gradable image (whatever dataset the image resembles), and reads photographs: referable DR on
the IDRiD test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import model
from model import protocol
from model.schema import Condition

BUNDLED = Path(model.__file__).parent / "bundled" / "retinalgpt-tiny"
#: The AUC the bundled model must reach per (dataset, condition), on the test split: its own measured figures
#: (model/bundled/retinalgpt-tiny/metrics.json) less a margin for run-to-run and platform differences, and never
#: below the issue's floor for referable DR on IDRiD (0.85).
AUC_MARGIN = 0.05
AUC_BAR: dict[tuple[str, str], float] = {
    ("idrid_grading", "referable_diabetic_retinopathy"): 0.917,  # measured 0.967
    ("idrid_grading", "diabetic_macular_edema"): 0.921,  # 0.971
    ("odir5k_subset", "glaucoma"): 0.844,  # 0.894
    ("odir5k_subset", "cataract"): 0.926,  # 0.976
    ("palm_pm", "pathologic_myopia"): 0.936,  # 0.986
    ("CODRAS", "any_lesion"): 0.891,  # 0.941
    ("oct_eye_fundus_mx", "diabetic_retinopathy"): 0.807,  # 0.857
    ("eyepacs_kaggle_dr", "referable_diabetic_retinopathy"): 0.653,  # 0.703 (evaluation only)
    ("HEI-MED", "hard_exudate"): 0.868,  # 0.918 (evaluation only)
}
#: Datasets re-measured in the default suite (small enough to score in about 20 s on one CPU core).
MEASURED_BY_DEFAULT = {"idrid_grading"}
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


def test_recorded_evaluation_is_of_these_weights_and_clears_the_bar() -> None:
    """metrics.json belongs to the bundled weights (same checkpoint digest) and every AUC in :data:`AUC_BAR`
    is met by the recorded evaluation."""
    from model.checkpoint import checkpoint_sha256

    metrics = json.loads((BUNDLED / "metrics.json").read_text())
    assert metrics["identity"]["checkpoint_sha256"] == checkpoint_sha256(BUNDLED), "not this model's evaluation"
    short = {key: round(metrics["datasets"][key[0]]["auc"][key[1]]["auc"], 3) for key in AUC_BAR}
    assert all(short[key] >= bar for key, bar in AUC_BAR.items()), {k: (short[k], b) for k, b in AUC_BAR.items()}


@pytest.mark.shared_data
@pytest.mark.parametrize("dataset", [
    pytest.param(name, marks=() if name in MEASURED_BY_DEFAULT else pytest.mark.slow)
    for name in sorted({name for name, _ in AUC_BAR})
])
def test_measured_auc_clears_the_bar(dataset: str, shared_fundus: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores the labelled test split again with the bundled model (likelihood scoring, no generation) and
    holds every AUC to :data:`AUC_BAR`. The larger data sets are marked slow (run with ``-m slow``)."""
    from training.adapters import load_dataset
    from training.evaluate import EvaluationOptions, evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records = load_dataset(dataset, shared_fundus / dataset)
    report = evaluate(BUNDLED, [(dataset, records)], tmp_path / "evaluation",
                      EvaluationOptions(device="cpu", full_limit=0))
    measured = report["datasets"][dataset]["auc"]
    for (name, condition), bar in AUC_BAR.items():
        if name == dataset:
            assert measured[condition]["auc"] >= bar, f"{dataset} {condition}: AUC {measured[condition]['auc']:.3f} < {bar:.3f}"
            low, high = measured[condition]["ece_ci95"]
            assert low <= measured[condition]["ece_bias_corrected"] <= high
            assert 0.0 <= report["calibration"][condition]["all"]["p_value"] <= 1.0
    assert "a calibrated model" in (tmp_path / "evaluation" / "report.md").read_text()
