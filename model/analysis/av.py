"""Unsupervised artery/vein classification of vessel segments.

No labelled A/V data is available, so segments are split into two clusters by their colour and calibre, the
cues graders use: retinal arterioles carry oxygenated blood and are lighter (higher red and green reflectance
relative to the surrounding fundus, often with a central light reflex) and narrower than their companion venules
(Hubbard 1999: AVR ≈ 0.7). For every segment the red and green channels on its centreline are divided by the
local vessel-free background (normalised convolution of the image with the vessel pixels excluded, σ = ¼ DD), so
illumination gradients cancel; because thin vessels look lighter whatever their type, each colour ratio is
replaced by its residual after a linear fit on log calibre. Two-means clustering (Lloyd) on the standardised
features [red residual, green residual, 0.3 · log width] of the segments between the disc margin and 2 DD beyond it
(where A/V colour contrast is best), weighted by segment length, defines the two classes; the lighter cluster is
arterial. Every segment is then assigned to the nearer centroid; its confidence is the relative margin
|d_v − d_a| / (d_v + d_a).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from model.analysis.filters import gaussian
from model.analysis.segments import Segment

WIDTH_WEIGHT = 0.3
"""Weight of standardised log calibre against the two standardised colour residuals in the clustering."""


def _background(channel: np.ndarray, keep: np.ndarray, sigma: float) -> np.ndarray:
    weight = keep.astype(np.float32)
    return gaussian(channel * weight, sigma) / np.maximum(gaussian(weight, sigma), 1e-3)


def segment_features(
    rgb: np.ndarray, fov: np.ndarray, vessels: np.ndarray, segments: list[Segment], disc_diameter: float
) -> np.ndarray:
    """(N, 3) features: red ratio, green ratio, 0.5·log width."""
    grown = ndi.binary_dilation(vessels, iterations=2)
    keep = fov & ~grown
    sigma = max(disc_diameter / 4, 4.0)
    ratios = []
    for c in (0, 1):
        bg = _background(rgb[..., c], keep, sigma)
        ratios.append(rgb[..., c] / np.maximum(bg, 1e-3))
    feats = np.zeros((len(segments), 3))
    for i, s in enumerate(segments):
        pts = s.points[2:-2] if len(s.points) > 6 else s.points
        ys = np.clip(np.round(pts[:, 1]).astype(int), 0, fov.shape[0] - 1)
        xs = np.clip(np.round(pts[:, 0]).astype(int), 0, fov.shape[1] - 1)
        feats[i, 0] = np.median(ratios[0][ys, xs])
        feats[i, 1] = np.median(ratios[1][ys, xs])
        width = s.width
        feats[i, 2] = 0.5 * np.log(width if np.isfinite(width) and width > 0 else 1.0)
    return feats


def two_means(
    features: np.ndarray, weights: np.ndarray, iterations: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted 2-means; initial centroids at the weighted 25th/75th percentile along the first feature axis
    of greatest variance. Returns (centroids (2, d), labels)."""
    axis = int(np.argmax(features.var(axis=0)))
    order = np.argsort(features[:, axis])
    cum = np.cumsum(weights[order]) / weights.sum()
    lo = features[order[np.searchsorted(cum, 0.25)]]
    hi = features[order[min(np.searchsorted(cum, 0.75), len(order) - 1)]]
    centroids = np.stack([lo, hi]).astype(np.float64)
    labels = np.zeros(len(features), dtype=int)
    for _ in range(iterations):
        d = np.linalg.norm(features[:, None] - centroids[None], axis=2)
        new = np.argmin(d, axis=1)
        for k in (0, 1):
            members = new == k
            if members.any():
                centroids[k] = np.average(features[members], axis=0, weights=weights[members])
        if np.array_equal(new, labels):
            break
        labels = new
    return centroids, labels


def classify(
    rgb: np.ndarray,
    fov: np.ndarray,
    vessels: np.ndarray,
    segments: list[Segment],
    disc_xy: tuple[float, float],
    disc_radius: float,
) -> float:
    """Set ``kind`` and ``confidence`` on every segment; return the length-weighted mean confidence (0–1)."""
    if len(segments) < 2:
        return 0.0
    raw = segment_features(rgb, fov, vessels, segments, 2 * disc_radius)
    lengths = np.array([max(len(s.points), 1) for s in segments], dtype=float)
    # thin vessels look lighter whatever their type (partial volume): compare colour at equal calibre by taking
    # the residual of each colour ratio after a length-weighted linear fit on log width
    design = np.stack([np.ones(len(raw)), raw[:, 2]], axis=1)
    sw = np.sqrt(lengths)[:, None]
    for c in (0, 1):
        coef, *_ = np.linalg.lstsq(design * sw, raw[:, c] * sw[:, 0], rcond=None)
        raw[:, c] = raw[:, c] - design @ coef
    mean, std = raw.mean(axis=0), raw.std(axis=0) + 1e-6
    feats = (raw - mean) / std
    feats[:, 2] *= WIDTH_WEIGHT
    centres = np.array([s.points[len(s.points) // 2] for s in segments])
    dist = np.hypot(centres[:, 0] - disc_xy[0], centres[:, 1] - disc_xy[1])
    near = (dist >= disc_radius) & (dist <= 5 * disc_radius)
    if near.sum() < 4:
        near = np.ones(len(segments), dtype=bool)
    centroids, _ = two_means(feats[near], lengths[near])
    # arterial cluster: lighter (larger red + green ratios)
    artery = int(np.argmax(centroids[:, 0] + centroids[:, 1]))
    d = np.linalg.norm(feats[:, None] - centroids[None], axis=2)
    margin = np.abs(d[:, 0] - d[:, 1]) / np.maximum(d.sum(axis=1), 1e-9)
    for s, dk, m in zip(segments, d, margin, strict=True):
        s.kind = "artery" if int(np.argmin(dk)) == artery else "vein"
        s.confidence = float(m)
    return float(np.average(margin, weights=lengths))


def label_pixels(
    vessels: np.ndarray, segment_labels: np.ndarray, segments: list[Segment]
) -> tuple[np.ndarray, np.ndarray]:
    """Artery and vein pixel masks: each vessel pixel takes the class of the nearest classified centreline pixel."""
    kinds = np.zeros(len(segments) + 1, dtype=np.int8)
    for s in segments:
        kinds[s.index + 1] = 1 if s.kind == "artery" else 2 if s.kind == "vein" else 0
    classified = np.where(segment_labels > 0, kinds[np.maximum(segment_labels, 0)], 0)
    if not classified.any():
        empty = np.zeros_like(vessels, dtype=bool)
        return empty, empty
    _, (iy, ix) = ndi.distance_transform_edt(classified == 0, return_indices=True)
    nearest = classified[iy, ix]
    return vessels & (nearest == 1), vessels & (nearest == 2)
