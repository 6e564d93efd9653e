"""Vessel centreline segments and calibres.

The vessel mask is thinned to a one-pixel skeleton (Zhang–Suen via :func:`skimage.morphology.skeletonize`);
pixels with three or more 8-neighbours are branch points (bifurcations and crossings). Removing the branch
points cuts the skeleton into segments, each ordered end to end. A segment's calibre at each centreline point
is the length of the vessel run along the normal to the local centreline direction, measured on the bilinearly
interpolated mask at ¼-px steps (the run is where the interpolated mask ≥ ½, which places each edge half-way
between the last vessel and the first background pixel, so a tube's width is recovered to within a pixel at
any orientation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

_NEIGHBOURS = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]])


@dataclass
class Segment:
    """One skeleton run between branch points or ends; ``points`` are (x, y) pixel centres in order."""

    index: int
    points: np.ndarray
    widths: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kind: str = "unknown"
    """``artery``, ``vein`` or ``unknown``."""
    confidence: float = 0.0

    @property
    def width(self) -> float:
        """Median calibre over the segment's interior points (px)."""
        inner = self.widths[2:-2] if len(self.widths) > 6 else self.widths
        inner = inner[np.isfinite(inner)]
        return float(np.median(inner)) if inner.size else float("nan")


def skeleton_segments(vessels: np.ndarray, min_length: float) -> tuple[list[Segment], np.ndarray]:
    """Segments of the skeleton of ``vessels`` at least ``min_length`` px long, and the label image
    (0 background, i + 1 for ``segments[i]``, -1 for branch points and short runs)."""
    skeleton = skeletonize(np.asarray(vessels, bool))
    neighbours = ndi.convolve(skeleton.astype(np.int32), _NEIGHBOURS, mode="constant")
    branch = skeleton & (neighbours >= 3)
    runs = skeleton & ~branch
    labels, count = ndi.label(runs, structure=np.ones((3, 3), int))
    out = np.where(skeleton, -1, 0).astype(np.int32)
    segments: list[Segment] = []
    if count == 0:
        return segments, out
    slices = ndi.find_objects(labels)
    for lab, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        local = labels[sl] == lab
        ys, xs = np.nonzero(local)
        if len(ys) < 2 and min_length > 1:
            continue
        ordered = _order(ys + sl[0].start, xs + sl[1].start)
        points = np.stack([ordered[1], ordered[0]], axis=1).astype(np.float64)
        length = float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum()) if len(points) > 1 else 0.0
        if length < min_length:
            continue
        segment = Segment(index=len(segments), points=points)
        segments.append(segment)
        out[ordered[0], ordered[1]] = segment.index + 1
    return segments, out


def _order(ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order the pixels of an 8-connected simple path from one end to the other (a loop from any pixel)."""
    coords = {(int(y), int(x)) for y, x in zip(ys, xs, strict=True)}

    def neighbours(p: tuple[int, int]) -> list[tuple[int, int]]:
        y, x = p
        return [
            (y + dy, x + dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if (dy or dx) and (y + dy, x + dx) in coords
        ]

    start = next((p for p in coords if len(neighbours(p)) <= 1), next(iter(coords)))
    path = [start]
    seen = {start}
    current = start
    while True:
        options = [q for q in neighbours(current) if q not in seen]
        if not options:
            break
        # prefer 4-neighbours so diagonal shortcuts do not skip pixels
        options.sort(key=lambda q: abs(q[0] - current[0]) + abs(q[1] - current[1]))
        current = options[0]
        seen.add(current)
        path.append(current)
    arr = np.array(path)
    return arr[:, 0], arr[:, 1]


def directions(points: np.ndarray, half_window: int = 3) -> np.ndarray:
    """Unit tangent (x, y) at each point from the chord over ± ``half_window`` points."""
    n = len(points)
    idx = np.arange(n)
    ahead = points[np.minimum(idx + half_window, n - 1)]
    behind = points[np.maximum(idx - half_window, 0)]
    tangent = ahead - behind
    norm = np.linalg.norm(tangent, axis=1, keepdims=True)
    return np.where(norm > 0, tangent / np.maximum(norm, 1e-9), np.array([1.0, 0.0]))


def normal_widths(
    mask: np.ndarray, points: np.ndarray, tangents: np.ndarray, max_width: float = 40.0, step: float = 0.25
) -> np.ndarray:
    """Calibre (px) at each point: length of the contiguous run of the interpolated mask ≥ ½ along the normal."""
    if len(points) == 0:
        return np.zeros(0)
    offsets = np.arange(-max_width / 2, max_width / 2 + step / 2, step)
    normals = np.stack([-tangents[:, 1], tangents[:, 0]], axis=1)
    xs = points[:, 0:1] + normals[:, 0:1] * offsets[None]
    ys = points[:, 1:2] + normals[:, 1:2] * offsets[None]
    values = ndi.map_coordinates(mask.astype(np.float32), [ys.ravel(), xs.ravel()], order=1, mode="constant")
    inside = values.reshape(xs.shape) >= 0.5
    centre = len(offsets) // 2
    right = np.cumprod(inside[:, centre:], axis=1).sum(axis=1)
    left = np.cumprod(inside[:, centre::-1], axis=1).sum(axis=1)
    run = np.maximum(right + left - 1, 0) * step
    return np.where(run > 0, run, np.nan)


def measure_widths(mask: np.ndarray, segments: list[Segment]) -> None:
    """Fill ``segment.widths`` (px) for every segment."""
    if not segments:
        return
    points = np.concatenate([s.points for s in segments])
    tangents = np.concatenate([directions(s.points) for s in segments])
    widths = normal_widths(mask, points, tangents)
    start = 0
    for s in segments:
        s.widths = widths[start : start + len(s.points)]
        start += len(s.points)
