"""Image quality: focus, illumination, field coverage and contrast, each scored 0–1, combined into a grade.

Metrics (on the FOV-centred working image, inside the FOV):
  * ``focus``: high-frequency energy of the green channel — mean |g − G_σ=2(g)| over the mean |g − G_σ=8(g)|
    (the share of detail at the finest scales; blur removes it first), independent of exposure and contrast;
  * ``brightness``: median luminance; ``dark_fraction`` / ``bright_fraction``: share of the FOV under 0.08 or
    over 0.97 (under/over-exposure);
  * ``illumination_uniformity``: 10th / 90th percentile of the heavily smoothed luminance (vignetting, shadows);
  * ``field_coverage``: FOV area as a share of the circle through its visible margin (1 for a full round FOV,
    lower when the frame cuts it, ~0 when the margin is not visible at all, i.e. a cropped photograph);
  * ``contrast``: vessel contrast — the in-FOV standard deviation of the locally normalised green channel's
    dark-ridge response is summarised by the segmented vessel fraction (8–14 % of a good 45° field).

Each metric maps to a 0–1 sub-score by a linear ramp between a "bad" and a "good" level; the score is the mean
of the sub-scores times the worst one's square root, and the grade is ``reject`` when a sub-score is below 0.2,
``usable`` below 0.6, else ``gradable``; the reasons name the failing aspects.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from model.analysis.filters import gaussian
from model.schema import Quality, QualityGrade

_RAMPS: dict[str, tuple[float, float, str]] = {
    "focus": (0.20, 0.36, "out of focus"),
    "illumination": (0.0, 1.0, "poor illumination"),
    "field_coverage": (0.55, 0.8, "field of view incomplete or cropped"),
    "contrast": (0.025, 0.065, "low vessel contrast"),
}


def _ramp(value: float, bad: float, good: float) -> float:
    return float(np.clip((value - bad) / (good - bad), 0.0, 1.0))


def field_coverage(fov: np.ndarray) -> float:
    """FOV area over the area of the circle fitted (Kåsa least squares) to the FOV margin away from the frame."""
    edge = fov & ~ndi.binary_erosion(fov)
    border = np.zeros_like(fov)
    border[:3, :] = border[-3:, :] = border[:, :3] = border[:, -3:] = True
    edge &= ~border
    ys, xs = np.nonzero(edge)
    if len(xs) < 50:
        return 0.0
    a = np.stack([xs, ys, np.ones_like(xs)], axis=1).astype(np.float64)
    b = xs.astype(np.float64) ** 2 + ys.astype(np.float64) ** 2
    (c0, c1, c2), *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = c0 / 2, c1 / 2
    radius2 = c2 + cx**2 + cy**2
    if radius2 <= 0:
        return 0.0
    # the visible margin must span a real arc of the fitted circle
    angles = np.arctan2(ys - cy, xs - cx)
    arc = np.unique(np.floor((angles + np.pi) / (2 * np.pi) * 36).astype(int)).size / 36
    coverage = float(fov.sum() / (np.pi * radius2))
    return float(min(coverage, 1.0) * min(1.0, arc / 0.5))


def assess(rgb: np.ndarray, fov: np.ndarray, vessel_fraction: float, coverage: float) -> Quality:
    """Grade a working image (float RGB 0–1) given its FOV, segmented vessel fraction and field coverage."""
    if fov.sum() < 100:
        return Quality(
            grade=QualityGrade.REJECT,
            score=0.0,
            reasons=["no field of view found"],
            metrics={"field_coverage": 0.0},
        )
    inner = ndi.binary_erosion(fov, iterations=max(1, fov.shape[0] // 50))
    if inner.sum() < 100:
        inner = fov
    green = rgb[..., 1]
    lum = 0.3 * rgb[..., 0] + 0.59 * rgb[..., 1] + 0.11 * rgb[..., 2]
    fine = np.abs(green - ndi.gaussian_filter(green, 2.0))[inner].mean()
    coarse = np.abs(green - ndi.gaussian_filter(green, 8.0))[inner].mean()
    focus = float(fine / max(coarse, 1e-6))
    brightness = float(np.median(lum[inner]))
    dark = float((lum[inner] < 0.08).mean())
    bright = float((lum[inner] > 0.97).mean())
    smooth = gaussian(lum, fov.shape[0] / 16)[inner]
    uniformity = float(np.percentile(smooth, 10) / max(np.percentile(smooth, 90), 1e-6))
    illumination = min(
        _ramp(brightness, 0.06, 0.18),
        _ramp(uniformity, 0.15, 0.45),
        1.0 - _ramp(dark, 0.25, 0.6),
        1.0 - _ramp(bright, 0.1, 0.4),
    )
    metrics = {
        "focus": focus,
        "brightness": brightness,
        "dark_fraction": dark,
        "bright_fraction": bright,
        "illumination_uniformity": uniformity,
        "field_coverage": coverage,
        "vessel_fraction": vessel_fraction,
    }
    values = {
        "focus": focus,
        "illumination": illumination,
        "field_coverage": coverage,
        "contrast": vessel_fraction,
    }
    subs = {name: _ramp(values[name], bad, good) for name, (bad, good, _) in _RAMPS.items()}
    metrics.update({f"{name}_score": v for name, v in subs.items()})
    worst = min(subs.values())
    score = float(np.mean(list(subs.values())) * np.sqrt(worst))
    reasons = [_RAMPS[n][2] for n, v in subs.items() if v < 0.6]
    grade = (
        QualityGrade.REJECT if worst < 0.2 else QualityGrade.USABLE if worst < 0.6 else QualityGrade.GRADABLE
    )
    return Quality(grade=grade, score=float(np.clip(score, 0, 1)), reasons=reasons, metrics=metrics)
