"""Calibration fitting, expected calibration error and the referable-DR operating point."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibration import (
    calibration_error_statistics,
    expected_calibration_error,
    fit_calibration,
    reliability,
    sensitivity_threshold,
)


def test_fit_recovers_temperature_and_bias() -> None:
    rng = np.random.default_rng(0)
    margin = rng.normal(0.0, 4.0, 4000)
    # true P(yes) = sigmoid(margin / 2 - 0.7): temperature 2, bias +0.7 on "no"
    labels = rng.random(4000) < 1 / (1 + np.exp(-(margin / 2.0 - 0.7)))
    fitted = fit_calibration([[0.0, m] for m in margin], [frozenset({int(y)}) for y in labels])
    assert fitted.temperature == pytest.approx(2.0, rel=0.1)
    assert fitted.bias == pytest.approx(0.7, abs=0.15)
    assert fitted.fitted_on == 4000


def test_fit_stays_finite_on_a_separable_handful() -> None:
    fitted = fit_calibration([[0.0, -5.0], [0.0, -6.0], [-5.0, 0.0]],
                             [frozenset({0}), frozenset({0}), frozenset({1})])
    assert 0.05 < fitted.temperature < 20 and abs(fitted.bias) < 5


def test_range_labels_use_the_probability_of_the_range() -> None:
    # grade in {1, 2, 3} never says which: only P(grade 0) is identified
    rng = np.random.default_rng(1)
    scores = [list(rng.normal(0, 1, 4)) for _ in range(300)]
    fitted = fit_calibration(scores, [frozenset({1, 2, 3})] * 300)
    assert fitted.apply(scores[0])[0] < 0.1  # all present: P(grade 0) pushed down


def test_expected_calibration_error() -> None:
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)
    assert expected_calibration_error([0, 0, 0, 0], [0.9, 0.9, 0.9, 0.9]) == pytest.approx(0.9)
    points = reliability([0, 1, 1, 1], [0.05, 0.95, 0.95, 0.95])
    assert [(p["bin"], p["observed"], p["n"]) for p in points] == [(0, 0.0, 1), (9, 1.0, 3)]


def test_expected_calibration_error_is_the_weighted_gap_of_every_bin() -> None:
    rng = np.random.default_rng(3)
    p = rng.random(500)
    y = (rng.random(500) < p**2).astype(int)
    expected = sum(point["n"] / 500 * abs(point["observed"] - point["predicted"]) for point in reliability(y, p))
    assert expected_calibration_error(y, p) == pytest.approx(expected)
    assert expected_calibration_error(y, p) > 0.1


def test_calibration_error_statistics_tell_small_split_noise_from_miscalibration() -> None:
    rng = np.random.default_rng(7)
    p = rng.random(120)
    calibrated = (rng.random(120) < p).astype(int)
    honest = calibration_error_statistics(calibrated, p)
    assert honest["n"] == 120
    assert honest["ci95"][0] <= honest["ece_bias_corrected"] <= honest["ci95"][1]
    assert honest["ece_bias_corrected"] < honest["ece"]  # the plug-in ECE of a small split is biased upwards
    assert honest["calibrated_ece"]["median"] > 0.03  # 120 images: a calibrated model's ECE is not ≈ 0
    assert honest["p_value"] > 0.05
    overconfident = np.clip(p + 0.25 * np.sign(p - 0.5), 0.0, 1.0)
    shifted = calibration_error_statistics(calibrated, overconfident)
    assert shifted["ece"] > honest["calibrated_ece"]["quantile"]
    assert shifted["p_value"] < 0.01
    assert shifted["ci95"][0] > honest["ci95"][1]
    assert calibration_error_statistics(calibrated, p) == honest  # seeded: the same figures every run


def test_sensitivity_threshold_is_the_highest_that_keeps_the_target() -> None:
    labels = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    scores = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.65]
    threshold = sensitivity_threshold(labels, scores, 0.9)
    assert threshold == pytest.approx(0.3)
    caught = sum(1 for y, s in zip(labels, scores) if y and s >= threshold)
    assert caught == 9
    assert sensitivity_threshold([1, 1], [0.2, 0.3], 0.9, fallback=0.42) == 0.42
