"""Fitting the post-hoc calibration and the operating points of an assessment model on its validation split.

Calibration (:class:`model.checkpoint.Calibration`): per question, a temperature T and a bias b on the first answer
(grade 0 / "No."), P(k) = softmax_k(ℓ_k / T + b·[k = 0]), fitted by maximum likelihood of the *admitted* answers —
for partial labels (a grade range) the probability of the range, as in training — with T constrained positive.
For yes/no questions this is Platt scaling; for graded ones temperature scaling with a shift of P(grade 0).
A weak Gaussian prior on log T (σ = 1) and b (σ = 2) keeps the fit finite when a small validation split separates
perfectly (maximum a posteriori; with hundreds of images it is negligible).

Reliability: expected calibration error (ECE, Naeini et al. AAAI 2015; Guo et al. ICML 2017) of P(present) with
ten equal-width bins, Σ_b (n_b / n)·|mean label_b − mean P_b|. On a test split of a hundred images the ECE of a
perfectly calibrated model is itself several hundredths (each bin's observed frequency is a binomial mean), so
:func:`calibration_error_statistics` reports it with a bootstrap bias correction and interval, and against the
ECE a calibrated model would show on the same predictions (consistency resampling, Bröcker & Smith, Weather and
Forecasting 2007: labels drawn from the predicted probabilities themselves).

Operating point of referable DR: the highest threshold on calibrated P(DR grade ≥ 2) whose validation sensitivity
reaches the recipe's target (screening programmes favour sensitivity), so that specificity is as high as it can be
at that sensitivity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model.checkpoint import Calibration


def fit_calibration(log_likelihoods: Sequence[Sequence[float]], allowed: Sequence[frozenset[int]],
                    max_iterations: int = 200) -> Calibration:
    """Temperature and first-answer bias maximising Σ log P(allowed answers) over the validation images."""
    if not log_likelihoods:
        return Calibration()
    width = len(log_likelihoods[0])
    scores = torch.tensor([list(v) for v in log_likelihoods], dtype=torch.float64)
    mask = torch.tensor([[k in a for k in range(width)] for a in allowed], dtype=torch.bool)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    first = torch.zeros(width, dtype=torch.float64)
    first[0] = 1.0
    optimizer = torch.optim.LBFGS([log_t, bias], max_iter=max_iterations, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        logits = scores / torch.exp(log_t) + bias * first
        loss = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~mask, float("-inf")), 1)).mean()
        loss = loss + (0.5 * log_t**2 + 0.125 * bias**2) / len(log_likelihoods)
        loss.backward()
        return loss

    optimizer.step(nll)
    temperature = float(torch.exp(log_t.detach()))
    return Calibration(temperature=temperature, bias=float(bias.detach()), fitted_on=len(log_likelihoods))


def expected_calibration_error(labels: Sequence[int], probabilities: Sequence[float], bins: int = 10) -> float:
    """ECE of binary ``labels`` against ``probabilities`` with ``bins`` equal-width bins; NaN without data."""
    y = np.asarray(labels, dtype=float)
    p = np.clip(np.asarray(probabilities, dtype=float), 0.0, 1.0)
    if y.size == 0:
        return float("nan")
    return float(_binned_ece(y[None, :], p[None, :], bins)[0])


def _bin_index(probabilities: np.ndarray, bins: int) -> np.ndarray:
    """The equal-width bin of every probability (1.0 falls in the last bin)."""
    return np.minimum((probabilities * bins).astype(int), bins - 1)


def _binned_ece(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> np.ndarray:
    """ECE of each row of ``labels`` / ``probabilities`` (shape resamples × images): Σ_b |Σ label − Σ P| / n over
    the images of bin b, which equals Σ_b (n_b / n)·|mean label_b − mean P_b|."""
    rows, n = probabilities.shape
    index = _bin_index(probabilities, bins) + bins * np.arange(rows)[:, None]
    gap = np.bincount(index.ravel(), weights=(labels - probabilities).ravel(), minlength=rows * bins)
    return np.abs(gap.reshape(rows, bins)).sum(axis=1) / n


def calibration_error_statistics(labels: Sequence[int], probabilities: Sequence[float], bins: int = 10,
                                 resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """The ECE of binary ``labels`` against ``probabilities``, how precisely the images measure it and whether it
    exceeds what a calibrated model shows on as many images:

    - ``ece``: the plug-in ECE (:func:`expected_calibration_error`, the figure targets are stated in); it is biased
      upwards on small splits (each bin's observed frequency is noisy, and the noise only adds);
    - ``ece_bias_corrected`` and ``ci95``: the bootstrap bias-corrected ECE, 2·ECE − mean of the bootstrap ECEs,
      and its basic bootstrap 95 % interval [2·ECE − q₉₇.₅, 2·ECE − q₂.₅] (images resampled with replacement; Efron &
      Tibshirani 1993 §10.6, Davison & Hinkley 1997 §5.2), clipped at 0 — a percentile interval of the plug-in ECE
      would lie above the estimate itself;
    - ``calibrated_ece``: the median and ``level`` quantile of the ECE when the images are resampled and each label
      is drawn as Bernoulli(P) — what a perfectly calibrated model with these predictions would measure;
    - ``p_value``: the share of those calibrated resamples whose ECE reaches the measured one (small: the
      miscalibration is real, not the noise of a small test split).
    """
    y = np.asarray(labels, dtype=float)
    p = np.clip(np.asarray(probabilities, dtype=float), 0.0, 1.0)
    if y.size == 0:
        nan = float("nan")
        return {"ece": nan, "ece_bias_corrected": nan, "ci95": [nan, nan],
                "calibrated_ece": {"median": nan, "quantile": nan, "level": level}, "p_value": nan, "n": 0}
    observed = float(_binned_ece(y[None, :], p[None, :], bins)[0])
    rng = np.random.default_rng(seed)
    index = rng.integers(0, y.size, size=(resamples, y.size))
    bootstrap = _binned_ece(y[index], p[index], bins)
    drawn = (rng.random(index.shape) < p[index]).astype(float)
    calibrated = _binned_ece(drawn, p[index], bins)
    alpha = (1 - level) / 2
    return {"ece": observed, "ece_bias_corrected": max(0.0, float(2 * observed - bootstrap.mean())),
            "ci95": [max(0.0, float(2 * observed - np.quantile(bootstrap, 1 - alpha))),
                     max(0.0, float(2 * observed - np.quantile(bootstrap, alpha)))],
            "calibrated_ece": {"median": float(np.median(calibrated)),
                               "quantile": float(np.quantile(calibrated, level)), "level": level},
            "p_value": float((calibrated >= observed - 1e-12).mean()), "n": int(y.size)}


def reliability(labels: Sequence[int], probabilities: Sequence[float], bins: int = 10) -> list[dict[str, float]]:
    """Per non-empty bin: mean probability, observed frequency and count (a reliability diagram's points)."""
    y = np.asarray(labels, dtype=float)
    p = np.asarray(probabilities, dtype=float)
    index = _bin_index(p, bins)
    return [{"bin": b, "predicted": float(p[index == b].mean()), "observed": float(y[index == b].mean()),
             "n": int((index == b).sum())} for b in range(bins) if (index == b).any()]


def sensitivity_threshold(labels: Sequence[int], probabilities: Sequence[float], sensitivity: float,
                          fallback: float = 0.5) -> float:
    """The highest threshold t with sensitivity(P ≥ t) ≥ ``sensitivity`` (``fallback`` without positives and
    negatives), kept strictly inside (0, 1)."""
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(probabilities, dtype=float)
    if not y.any() or y.all():
        return fallback
    positives = np.sort(p[y])[::-1]
    needed = int(np.ceil(sensitivity * positives.size))
    threshold = float(positives[needed - 1])
    return float(min(max(threshold, 1e-4), 1 - 1e-4))
