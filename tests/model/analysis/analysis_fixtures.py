"""Helpers shared by the measurement-pipeline tests."""

from __future__ import annotations

import numpy as np
from skimage.transform import resize


def rescaled(rgb: np.ndarray, side: int) -> np.ndarray:
    """``rgb`` resized so its longer side is ``side`` px (uint8)."""
    scale = side / max(rgb.shape[:2])
    shape = (round(rgb.shape[0] * scale), round(rgb.shape[1] * scale), 3)
    return (resize(rgb, shape, anti_aliasing=True) * 255).round().astype(np.uint8)
