"""Fundus-aware input framing for vision towers.

A CLIP-style centre crop of the shortest side cuts the sides of a wide field of view and keeps black frame
elsewhere, and the FOV's size in the crop varies with the camera's sensor. ``fov_square`` instead crops the
field of view's bounding square (:func:`model.analysis.fov.frame`: brightest-channel threshold, largest
component, centred, padded black where the frame cuts the FOV) and resizes it to the tower's input, so every
camera's photograph fills the input the same way.
"""

from __future__ import annotations

import numpy as np

from model.analysis.fov import frame

FRAMINGS = ("centre_crop", "fov_square")
"""Input framings a model directory may name (``retinalgpt.json`` ``image.framing``)."""


def fov_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """The field of view's bounding square of an RGB ``uint8`` photograph, resized (anti-aliased) to
    ``size``×``size``, as ``uint8``."""
    working = frame(np.ascontiguousarray(rgb[:, :, :3]), size)
    return np.clip(np.rint(working.rgb * 255.0), 0, 255).astype(np.uint8)
