"""Lesion masks to normalised boxes.

Each connected component (8-connectivity) of a binary mask is a candidate lesion; its bounding box is enlarged
into groups by merging boxes whose gap is at most ``merge_gap`` (fraction of the longer image side), then
boxes smaller than ``min_side`` pixels on both sides are dropped, and boxes wholly contained in another box are
removed. Boxes are returned normalised to 0–1 of the width and height, ``[x0, y0, x1, y1]`` with exclusive
right/bottom pixel edges, origin top-left (the RetinalGPT box convention, DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PixelBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class BoxOptions:
    merge_gap: float = 0.02
    """Boxes whose horizontal and vertical gaps are both at most this fraction of the longer side merge."""
    min_side: int = 3
    """A box whose width and height are both below this many pixels is dropped (noise, stray pixels)."""
    max_boxes: int = 12
    """Keep at most this many boxes per lesion type, largest first."""


def _gap(a: PixelBox, b: PixelBox) -> tuple[int, int]:
    gx = max(a[0], b[0]) - min(a[2], b[2])
    gy = max(a[1], b[1]) - min(a[3], b[3])
    return max(gx, 0), max(gy, 0)


def merge_nearby(boxes: list[PixelBox], gap_px: float) -> list[PixelBox]:
    """Merge boxes until no two are within ``gap_px`` of each other on both axes."""
    merged = list(boxes)
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                gx, gy = _gap(merged[i], merged[j])
                if gx <= gap_px and gy <= gap_px:
                    a, b = merged[i], merged[j]
                    merged[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    del merged[j]
                    changed = True
                    break
            if changed:
                break
    return merged


def drop_contained(boxes: list[PixelBox]) -> list[PixelBox]:
    """Remove every box lying wholly inside another (distinct) box."""
    keep: list[PixelBox] = []
    for i, a in enumerate(boxes):
        inside = any(
            j != i and b != a and b[0] <= a[0] and b[1] <= a[1] and a[2] <= b[2] and a[3] <= b[3]
            for j, b in enumerate(boxes)
        )
        if not inside and a not in keep:
            keep.append(a)
    return keep


def mask_to_pixel_boxes(mask: np.ndarray, options: BoxOptions = BoxOptions()) -> list[PixelBox]:
    """Pixel boxes ``(x0, y0, x1, y1)`` (exclusive ends) of the lesions in a binary mask."""
    binary = np.asarray(mask) > 0
    if binary.ndim == 3:
        binary = binary.any(axis=2)
    labelled, _ = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    boxes = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labelled) if s is not None]
    boxes = merge_nearby(boxes, options.merge_gap * max(binary.shape))
    boxes = [b for b in boxes if (b[2] - b[0]) >= options.min_side or (b[3] - b[1]) >= options.min_side]
    boxes = drop_contained(boxes)
    boxes.sort(key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
    return sorted(boxes[: options.max_boxes], key=lambda b: (b[1], b[0]))


def normalise(box: PixelBox, width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel box to ``[x0, y0, x1, y1]`` in 0–1 of width and height."""
    x0, y0, x1, y1 = box
    return (x0 / width, y0 / height, x1 / width, y1 / height)


def mask_to_boxes(mask: np.ndarray, options: BoxOptions = BoxOptions()) -> list[tuple[float, float, float, float]]:
    """Normalised lesion boxes of a binary mask (see module docstring for the rules)."""
    height, width = np.asarray(mask).shape[:2]
    return [normalise(b, width, height) for b in mask_to_pixel_boxes(mask, options)]


def yolo_to_box(cx: float, cy: float, w: float, h: float) -> tuple[float, float, float, float]:
    """A YOLO ``cx cy w h`` (normalised) box as ``[x0, y0, x1, y1]`` clipped to the unit square."""

    def clip(v: float) -> float:
        return min(max(v, 0.0), 1.0)

    return (clip(cx - w / 2), clip(cy - h / 2), clip(cx + w / 2), clip(cy + h / 2))
