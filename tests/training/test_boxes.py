"""Mask → box conversion on drawn masks with known answers."""

from __future__ import annotations

import numpy as np

from training.boxes import (
    BoxOptions,
    drop_contained,
    mask_to_boxes,
    mask_to_pixel_boxes,
    merge_nearby,
    yolo_to_box,
)


def _mask(boxes: list[tuple[int, int, int, int]], shape: tuple[int, int] = (100, 200)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = 1
    return mask


def test_separate_lesions_give_one_box_each() -> None:
    mask = _mask([(10, 10, 20, 30), (100, 50, 140, 60)])
    assert mask_to_pixel_boxes(mask, BoxOptions(merge_gap=0.0)) == [(10, 10, 20, 30), (100, 50, 140, 60)]
    assert mask_to_boxes(mask, BoxOptions(merge_gap=0.0)) == [(0.05, 0.1, 0.1, 0.3), (0.5, 0.5, 0.7, 0.6)]


def test_nearby_lesions_merge() -> None:
    mask = _mask([(10, 10, 20, 20), (23, 12, 30, 18)])  # 3 px apart, merge gap 0.02 * 200 = 4 px
    assert mask_to_pixel_boxes(mask, BoxOptions(merge_gap=0.02)) == [(10, 10, 30, 20)]
    assert mask_to_pixel_boxes(mask, BoxOptions(merge_gap=0.01)) == [(10, 10, 20, 20), (23, 12, 30, 18)]


def test_tiny_specks_are_dropped() -> None:
    mask = _mask([(10, 10, 30, 30), (100, 80, 102, 82)])
    assert mask_to_pixel_boxes(mask, BoxOptions(merge_gap=0.0, min_side=3)) == [(10, 10, 30, 30)]


def test_contained_boxes_are_removed() -> None:
    ring = _mask([(10, 10, 60, 60)])
    ring[15:55, 15:55] = 0
    ring[30:35, 30:35] = 1  # an island inside the ring: its box lies within the ring's box
    assert mask_to_pixel_boxes(ring, BoxOptions(merge_gap=0.0)) == [(10, 10, 60, 60)]
    assert drop_contained([(0, 0, 10, 10), (2, 2, 5, 5), (20, 20, 30, 30)]) == [(0, 0, 10, 10), (20, 20, 30, 30)]


def test_merge_is_transitive() -> None:
    assert merge_nearby([(0, 0, 5, 5), (7, 0, 12, 5), (14, 0, 19, 5)], gap_px=2) == [(0, 0, 19, 5)]


def test_empty_mask_and_box_limit() -> None:
    assert mask_to_boxes(np.zeros((10, 10))) == []
    many = _mask([(x, 10, x + 4, 14) for x in range(0, 200, 10)])
    assert len(mask_to_pixel_boxes(many, BoxOptions(merge_gap=0.0, max_boxes=5))) == 5


def test_yolo_box() -> None:
    assert yolo_to_box(0.5, 0.5, 0.2, 0.4) == (0.4, 0.3, 0.6, 0.7)
    assert yolo_to_box(0.05, 0.5, 0.2, 0.2) == (0.0, 0.4, 0.15000000000000002, 0.6)
