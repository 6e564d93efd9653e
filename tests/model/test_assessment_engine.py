"""Complete assessment in the engine: every trained condition on every image, whatever the image looks like;
calibration applied as stored; grades consistent with the operating points; the rest reported as not assessed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from model import protocol
from model.checkpoint import Assessment, Calibration
from model.schema import Condition

TRAINED = [Condition.DIABETIC_RETINOPATHY, Condition.DIABETIC_MACULAR_EDEMA, Condition.GLAUCOMA,
           Condition.CATARACT, Condition.PATHOLOGIC_MYOPIA]


@pytest.fixture(scope="module")
def assessing(tiny: tuple[Any, Any, Any]) -> Any:
    from model.engine import EngineOptions, RetinalGPTEngine

    model, tokenizer, metadata = tiny
    metadata = metadata.model_copy(deep=True)
    metadata.assessment = Assessment(conditions=TRAINED, lesions=["haemorrhage", "any"])
    return RetinalGPTEngine.from_model(model, tokenizer, metadata, EngineOptions(device="cpu", max_new_tokens=24))


def synthetic_fundus() -> np.ndarray:
    """A dark frame with an orange disc: nothing like any training set."""
    y, x = np.mgrid[:300, :400]
    image = np.zeros((300, 400, 3), dtype=np.uint8)
    inside = (x - 200) ** 2 + (y - 150) ** 2 < 140**2
    image[inside] = (190, 90, 40)
    return image


def test_every_trained_condition_on_every_image(assessing: Any, retina_rgb: np.ndarray) -> None:
    results = assessing.analyze([retina_rgb, synthetic_fundus()])
    for result in results:
        stated = {f.condition for f in result.findings}
        assert stated == {*TRAINED, Condition.REFERABLE_DIABETIC_RETINOPATHY}
        assert all(f.probability is not None and f.grade is not None for f in result.findings)
        assert set(result.not_assessed) == set(protocol.DISEASE_CONDITIONS) - set(TRAINED)
        assert set(result.lesion_presence) == {"haemorrhage", "any"}
        asked = [a.task for a in result.answers]
        assert "disease_grade" not in asked  # never one open question that lets the model choose
        assert {f"condition:{c.value}" for c in TRAINED} <= set(asked)


def test_calibration_is_applied_as_stored(assessing: Any, retina_rgb: np.ndarray) -> None:
    features = assessing.image_features([retina_rgb])
    raw = assessing.assessment_log_likelihoods(features)[0]
    key = "condition:glaucoma"
    original = assessing.metadata.assessment
    try:
        calibrated = original.model_copy(deep=True)
        calibrated.calibration[key] = Calibration(temperature=3.0, bias=1.5)
        assessing.metadata.assessment = calibrated
        probabilities = assessing.assess(features)[0][key]
        scaled = [raw[key][0] / 3.0 + 1.5, raw[key][1] / 3.0]
        expected = math.exp(scaled[1]) / (math.exp(scaled[0]) + math.exp(scaled[1]))
        assert probabilities[1] == pytest.approx(expected, abs=1e-9)
        (result,) = assessing.analyze([retina_rgb])
        glaucoma = next(f for f in result.findings if f.condition == Condition.GLAUCOMA)
        assert glaucoma.probability == pytest.approx(expected, abs=1e-6)
    finally:
        assessing.metadata.assessment = original
    uncalibrated = assessing.assess(features)[0][key]
    assert uncalibrated[1] != pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("threshold", [0.05, 0.5, 0.95])
def test_dr_grade_agrees_with_the_referable_operating_point(threshold: float) -> None:
    from model.engine import decide_grade

    assessment = Assessment(conditions=TRAINED, thresholds={"referable_diabetic_retinopathy": threshold})
    rng = np.random.default_rng(1)
    for _ in range(200):
        p = rng.dirichlet(np.ones(5)).tolist()
        grade = decide_grade(Condition.DIABETIC_RETINOPATHY, p, assessment)
        assert (grade >= 2) == (sum(p[2:]) >= threshold)
        glaucoma = decide_grade(Condition.GLAUCOMA, p[:2] / np.sum(p[:2]), assessment)
        assert glaucoma == int(p[1] / (p[0] + p[1]) >= 0.5)


def test_a_model_without_assessment_reports_the_unanswered_conditions_as_not_assessed(
        tiny: tuple[Any, Any, Any], retina_rgb: np.ndarray) -> None:
    from model.engine import EngineOptions, RetinalGPTEngine

    model, tokenizer, metadata = tiny
    engine = RetinalGPTEngine.from_model(model, tokenizer, metadata, EngineOptions(device="cpu", max_new_tokens=24))
    (result,) = engine.analyze([retina_rgb])
    stated = {f.condition for f in result.findings}
    assert set(result.not_assessed) == set(protocol.DISEASE_CONDITIONS) - stated
