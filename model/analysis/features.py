"""Vascular feature definitions, as pure functions of masks and centreline coordinates.

Two definition modes (:class:`Definitions`):

``standard`` — the textbook definitions:
  * fractal dimension: classic box counting (Mandelbrot; boxes of side 2^k that contain vessel), the slope of
    log N(s) against log(1/s);
  * vessel density: vessel area / region area (region = FOV ∩ zone);
  * distance tortuosity: Hart et al. 1999 arc length / chord length per segment;
  * squared-curvature tortuosity: Hart et al. 1999 ∫κ² ds / L per segment (κ of the smoothed centreline);
  * tortuosity density: Grisan et al. 2008, (n−1)/n · (1/L) · Σᵢ (Lᵢ/χᵢ − 1) over the n constant-curvature-sign
    pieces of a segment of length L (arc Lᵢ, chord χᵢ).
``automorph`` — AutoMorph's variants (Zhou et al. 2022), so values match RetinalGPT's training targets:
  * fractal dimension counts only boxes that are neither empty nor full;
  * vessel density divides by the whole square image area;
  * squared-curvature tortuosity is |Σᵢ κᵢ| summed over point index;
  * tortuosity density is (n−1)/n + mean over pieces of (Lᵢ/χᵢ − 1).
Image-level tortuosities are means over segments.

Central retinal equivalents (CRAE/CRVE) combine the six widest vessels iteratively, largest with smallest
(the median carried over when the count is odd), until one remains:
  * Knudtson et al. 2003: arterioles 0.88 (w₁² + w₂²)^½, venules 0.95 (w₁² + w₂²)^½;
  * Hubbard et al. 1999 (µm only, the constants assume µm): arterioles
    (0.87 w_s² + 1.01 w_l² − 0.22 w_s w_l − 10.76)^½, venules (0.72 w_s² + 0.91 w_l² + 450.05)^½, w_s the smaller
    and w_l the larger width.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from enum import StrEnum

import numpy as np
from scipy import ndimage as ndi


class Definitions(StrEnum):
    STANDARD = "standard"
    AUTOMORPH = "automorph"


def box_counting_dimension(mask: np.ndarray, definitions: Definitions = Definitions.STANDARD) -> float:
    """Box-counting (Minkowski–Bouligand) dimension of a binary mask.

    Box sides are powers of two from 2 px up to a quarter of the padded side; the mask is zero-padded to a
    power-of-two square so every box is whole. ``automorph`` counts only partly filled boxes."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0.0
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    side = 1 << int(np.ceil(np.log2(max(mask.shape))))
    padded = np.zeros((side, side), dtype=np.int64)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    sizes, counts = [], []
    size = 2
    while size <= side // 4 or (size == 2 and side < 8):
        blocks = padded.reshape(side // size, size, side // size, size).sum(axis=(1, 3))
        if definitions == Definitions.AUTOMORPH:
            n = int(((blocks > 0) & (blocks < size * size)).sum())
        else:
            n = int((blocks > 0).sum())
        if n > 0:
            sizes.append(size)
            counts.append(n)
        size *= 2
    if len(sizes) < 2:
        return 0.0
    slope, _ = np.polyfit(np.log(1.0 / np.asarray(sizes, float)), np.log(np.asarray(counts, float)), 1)
    return float(slope)


def vessel_density(vessels: np.ndarray, region: np.ndarray, definitions: Definitions) -> float:
    """Fraction of vessel pixels: of the region (standard) or of the whole square image (automorph)."""
    inside = np.asarray(vessels, bool) & np.asarray(region, bool)
    denominator = region.sum() if definitions == Definitions.STANDARD else region.size
    return float(inside.sum() / denominator) if denominator else 0.0


def arc_length(points: np.ndarray) -> float:
    """Polyline length of (N, 2) points."""
    return float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum()) if len(points) > 1 else 0.0


def chord_length(points: np.ndarray) -> float:
    return float(np.linalg.norm(points[-1] - points[0])) if len(points) > 1 else 0.0


DISTANCE_SIGMA = 2.0
"""Gaussian σ (points) smoothing a centreline before arc length: removes the skeleton's pixel staircase."""
CURVATURE_SIGMA = 4.0
"""Gaussian σ (points) before curvature: the staircase's κ noise is gone while a 30-px radius keeps its κ."""
STRAIGHT_CURVATURE = 2e-3
"""|κ| (1/px) below which a centreline counts as straight when looking for inflection points (radius > 500 px)."""
MIN_BEND_POINTS = 8
"""A run of one curvature sign shorter than this (points, ≈ 2σ) is staircase noise, not a bend."""


def smooth_centreline(points: np.ndarray, sigma: float = DISTANCE_SIGMA) -> np.ndarray:
    """Gaussian-smoothed centreline (ends kept by nearest-value padding)."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) < 5 or sigma <= 0:
        return points
    return ndi.gaussian_filter1d(points, sigma, axis=0, mode="nearest")


def distance_tortuosity(points: np.ndarray) -> float:
    """Hart's arc/chord ratio of the smoothed centreline (1 for a straight segment)."""
    smooth = smooth_centreline(points)
    chord = chord_length(smooth)
    return arc_length(smooth) / chord if chord > 0 else float("nan")


def curvature(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed curvature κ at each point of a polyline and the arc-length step ds around it (central differences)."""
    d1 = np.gradient(points, axis=0)
    d2 = np.gradient(d1, axis=0)
    speed = np.linalg.norm(d1, axis=1)
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    kappa = np.where(speed > 1e-9, cross / np.maximum(speed, 1e-9) ** 3, 0.0)
    return kappa, speed


def centreline_curvature(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(κ, ds, smoothed points) of a centreline smoothed with :data:`CURVATURE_SIGMA`, with 2σ trimmed off each
    end where the smoothing is one-sided (kept whole when the centreline is too short to trim)."""
    smooth = smooth_centreline(points, CURVATURE_SIGMA)
    kappa, ds = curvature(smooth)
    trim = int(2 * CURVATURE_SIGMA)
    if len(smooth) > 4 * trim + 4:
        return kappa[trim:-trim], ds[trim:-trim], smooth[trim:-trim]
    return kappa, ds, smooth


def squared_curvature_tortuosity(points: np.ndarray, definitions: Definitions) -> float:
    """Standard: ∫κ² ds / L (units 1/length², in the points' units). AutoMorph: |Σ κᵢ| over point index."""
    if len(points) < 5:
        return float("nan")
    kappa, ds, _ = centreline_curvature(points)
    if definitions == Definitions.AUTOMORPH:
        return float(abs(kappa.sum()))
    length = ds.sum()
    return float((kappa**2 * ds).sum() / length) if length > 0 else float("nan")


def inflection_pieces(points: np.ndarray) -> list[np.ndarray]:
    """Split a centreline where its curvature changes sign (Grisan 2008), on the curvature-smoothed centreline;
    stretches with |κ| < :data:`STRAIGHT_CURVATURE` or shorter than :data:`MIN_BEND_POINTS` have no sign."""
    if len(points) < 5:
        return [np.asarray(points, dtype=np.float64)]
    kappa, _, smooth = centreline_curvature(points)
    sign = np.sign(np.where(np.abs(kappa) > STRAIGHT_CURVATURE, kappa, 0.0))
    edges = np.flatnonzero(np.diff(sign)) + 1
    for start, stop in zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(sign)]]), strict=True):
        if stop - start < MIN_BEND_POINTS:
            sign[start:stop] = 0.0
    cuts, current = [], 0.0
    for i, s in enumerate(sign):
        if s == 0:
            continue
        if current != 0 and s != current:
            cuts.append(i)
        current = s
    bounds = [0, *cuts, len(smooth) - 1]
    return [smooth[a : b + 1] for a, b in itertools.pairwise(bounds) if b > a]


def tortuosity_density(points: np.ndarray, definitions: Definitions) -> float:
    """Grisan 2008 tortuosity density of one segment (standard: 1/length, in the points' units; AutoMorph:
    dimensionless (n−1)/n + mean(Lᵢ/χᵢ − 1))."""
    pieces = [p for p in inflection_pieces(points) if chord_length(p) > 0]
    length = sum(arc_length(p) for p in pieces)
    if not pieces or length == 0:
        return float("nan")
    n = len(pieces)
    excess = np.array([arc_length(p) / chord_length(p) - 1.0 for p in pieces])
    if definitions == Definitions.AUTOMORPH:
        return float((n - 1) / n + excess.mean())
    return float((n - 1) / n * excess.sum() / length)


def knudtson_pair(a: float, b: float, artery: bool) -> float:
    """Knudtson 2003 branch-to-trunk formula."""
    return (0.88 if artery else 0.95) * float(np.hypot(a, b))


def hubbard_pair(a: float, b: float, artery: bool) -> float:
    """Hubbard 1999 branch-to-trunk formula, widths in µm."""
    small, large = min(a, b), max(a, b)
    if artery:
        value = 0.87 * small**2 + 1.01 * large**2 - 0.22 * small * large - 10.76
    else:
        value = 0.72 * small**2 + 0.91 * large**2 + 450.05
    return float(np.sqrt(max(value, 0.0)))


def central_equivalent(
    widths: list[float] | np.ndarray,
    combine: Callable[[float, float, bool], float],
    artery: bool,
    count: int = 6,
) -> float:
    """Iterative central retinal equivalent of the ``count`` widest vessels: each round pairs the largest with the
    smallest, the second largest with the second smallest, …, and carries the median forward when the number is
    odd, until one value remains (Knudtson et al. 2003)."""
    values = sorted((float(w) for w in widths if np.isfinite(w) and w > 0), reverse=True)[:count]
    if not values:
        return float("nan")
    while len(values) > 1:
        values.sort(reverse=True)
        half = len(values) // 2
        merged = [combine(values[i], values[-1 - i], artery) for i in range(half)]
        if len(values) % 2:
            merged.append(values[half])
        values = merged
    return values[0]
