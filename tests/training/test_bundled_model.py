"""The bundled default model loads offline, is what the worker falls back to, analyses
``skimage.data.retina()`` with every answer parsed, and clears its AUC bar (:data:`AUC_BAR`)."""

from __future__ import annotations

from pathlib import Path

import json

import numpy as np
import pytest

import model

BUNDLED = Path(model.__file__).parent / "bundled" / "retinalgpt-tiny"

#: The AUC the bundled model must reach per (dataset, condition), on the test split. Set from the model's own
#: measured figures (model/bundled/retinalgpt-tiny/metrics.json) minus a margin of 0.05 for run-to-run and
#: platform differences; a new bundled model raises these to its own figures (issue 13).
AUC_MARGIN = 0.05
AUC_BAR: dict[tuple[str, str], float] = {
    ("idrid_grading", "diabetic_retinopathy"): 0.777 - AUC_MARGIN,
    ("idrid_grading", "referable_diabetic_retinopathy"): 0.733 - AUC_MARGIN,
    ("palm_pm", "pathologic_myopia"): 0.981 - AUC_MARGIN,
    ("oct_eye_fundus_mx", "diabetic_retinopathy"): 0.946 - AUC_MARGIN,
    ("oct_eye_fundus_mx", "diabetic_macular_edema"): 0.818 - AUC_MARGIN,
    ("CODRAS", "any_lesion"): 0.703 - AUC_MARGIN,
}
#: Datasets re-measured in the default suite (small enough to score in about 20 s on one CPU core).
MEASURED_BY_DEFAULT = {"idrid_grading"}


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


def test_recorded_evaluation_is_of_these_weights_and_clears_the_bar() -> None:
    """metrics.json belongs to the bundled weights (same checkpoint digest) and every AUC in :data:`AUC_BAR`
    is met by the recorded evaluation."""
    from model.checkpoint import checkpoint_sha256

    metrics = json.loads((BUNDLED / "metrics.json").read_text())
    assert metrics["identity"]["checkpoint_sha256"] == checkpoint_sha256(BUNDLED), "not this model's evaluation"
    short = {key: round(metrics["datasets"][key[0]]["auc"][key[1]]["auc"], 3) for key in AUC_BAR}
    assert all(short[key] >= bar for key, bar in AUC_BAR.items()), {k: (short[k], b) for k, b in AUC_BAR.items()}


@pytest.mark.shared_data
@pytest.mark.parametrize("dataset", sorted({name for name, _ in AUC_BAR}))
def test_measured_auc_clears_the_bar(dataset: str, shared_fundus: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Scores the labelled test split again with the bundled model (likelihood scoring, no generation) and
    holds every AUC to :data:`AUC_BAR`. The larger data sets run with ``-m slow``."""
    if dataset not in MEASURED_BY_DEFAULT and "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip(f"{dataset}: measured with -m slow (the default suite re-measures {sorted(MEASURED_BY_DEFAULT)})")
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
