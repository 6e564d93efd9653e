"""Field of view: mask, crop-and-centre to a square working image, and the µm-per-pixel scale.

A colour fundus photograph is a bright disc (the field of view, FOV) on a dark surround. The FOV is found by
thresholding the brightest channel against the dark surround (a fraction of the in-image bright level, so dim
cameras work), keeping the largest connected component and filling holes. The image is cropped to the FOV's
bounding square (padding where the FOV is cut by the frame), so the FOV is centred, then resized to the
working size.

Scale: DICOM Pixel Spacing (PS3.3 C.8.17.2, Ophthalmic Photography Image Module) when given; otherwise an
estimate from the FOV diameter and the camera's field angle, using the Gullstrand schematic eye's
≈ 291 µm of retina per degree of visual angle (Bennett, Rudnicka & Edgar 1994, the conversion of the
Littmann/Bennett method without refraction): µm/px = field_angle × 291 / FOV diameter in px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from model.analysis.filters import separable_linear
from model.schema import ScaleSource

UM_PER_DEGREE = 291.0
"""Retinal distance per degree of visual angle in the Gullstrand–Bennett schematic eye (µm)."""


def fov_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean field-of-view mask of an RGB fundus photograph (H, W, 3) uint8."""
    bright = rgb.max(axis=2).astype(np.float32)
    small = bright[:: max(1, bright.shape[0] // 256), :: max(1, bright.shape[1] // 256)]
    dark = float(np.percentile(small, 2))
    lit = float(np.percentile(small, 90))
    threshold = dark + max(0.15 * (lit - dark), 4.0)
    mask = ndi.uniform_filter(bright, size=5) > threshold
    labels, count = ndi.label(mask)
    if count == 0:
        return np.ones(bright.shape, dtype=bool)
    sizes = ndi.sum_labels(mask, labels, index=np.arange(1, count + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    mask = ndi.binary_fill_holes(mask)
    mask = ndi.binary_opening(mask, structure=np.ones((5, 5), bool))
    return mask if mask.any() else np.ones(bright.shape, dtype=bool)


def fov_diameter(mask: np.ndarray) -> float:
    """FOV diameter in px: the wider of the mask's horizontal extent and its equal-area circle diameter
    (the horizontal extent is robust to FOVs clipped at top and bottom by the frame)."""
    cols = np.nonzero(mask.any(axis=0))[0]
    width = float(cols[-1] - cols[0] + 1) if cols.size else float(mask.shape[1])
    return max(width, 2.0 * float(np.sqrt(mask.sum() / np.pi)))


@dataclass(frozen=True)
class Framing:
    """How the working image was cut from the source: working pixel i covers source pixels
    offset + i·factor … offset + (i + 1)·factor along each axis."""

    offset_x: float
    offset_y: float
    factor: float
    size: int
    source_shape: tuple[int, int]

    def to_source(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Source-image coordinates of working-image coordinates (pixel centres at integers in both)."""
        return (
            (np.asarray(x, dtype=np.float64) + 0.5) * self.factor + self.offset_x - 0.5,
            (np.asarray(y, dtype=np.float64) + 0.5) * self.factor + self.offset_y - 0.5,
        )

    def map_to_source(self, values: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample a working-image map onto the source pixel grid (nearest for ``order`` 0, else bilinear;
        0 outside the working square). The grid is separable, so rows and columns are interpolated in turn."""
        h, w = self.source_shape
        v = (np.arange(h, dtype=np.float64) + 0.5 - self.offset_y) / self.factor - 0.5
        u = (np.arange(w, dtype=np.float64) + 0.5 - self.offset_x) / self.factor - 0.5
        values = values.astype(np.float32)
        n = values.shape[0]
        inside_v = (v > -0.5) & (v < n - 0.5)
        inside_u = (u > -0.5) & (u < n - 0.5)
        if order == 0:
            out = values[np.clip(np.round(v).astype(int), 0, n - 1)][
                :, np.clip(np.round(u).astype(int), 0, n - 1)
            ]
        else:
            out = separable_linear(values, v, u)
        return out * (inside_v[:, None] & inside_u[None, :])


@dataclass(frozen=True)
class WorkingImage:
    """The FOV-centred square image the pipeline measures on."""

    rgb: np.ndarray
    """(size, size, 3) float32 in 0–1."""
    fov: np.ndarray
    """(size, size) bool."""
    framing: Framing
    fov_diameter_px: float
    """FOV diameter in working-image pixels."""
    source_fov: np.ndarray
    """FOV mask of the source image."""


def frame(rgb: np.ndarray, size: int) -> WorkingImage:
    """Crop the FOV's bounding square (centred on the FOV, padded black where outside the frame) and resize it
    to ``size`` × ``size``."""
    mask = fov_mask(rgb)
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    cy = (rows[0] + rows[-1] + 1) / 2.0
    cx = (cols[0] + cols[-1] + 1) / 2.0
    side = round(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) * 1.02)
    x0, y0 = round(cx - side / 2.0), round(cy - side / 2.0)
    h, w = mask.shape
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    canvas_mask = np.zeros((side, side), dtype=np.uint8)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
    canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    canvas_mask[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = mask[sy0:sy1, sx0:sx1] * 255
    factor = side / size
    # Pillow's bilinear resize widens its kernel when shrinking, i.e. it is anti-aliased
    work = (
        np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.BILINEAR), np.float32)
        / 255.0
    )
    fov = np.asarray(Image.fromarray(canvas_mask).resize((size, size), Image.Resampling.BILINEAR)) > 127
    framing = Framing(offset_x=float(x0), offset_y=float(y0), factor=factor, size=size, source_shape=(h, w))
    return WorkingImage(
        rgb=np.clip(work, 0.0, 1.0).astype(np.float32),
        fov=fov,
        framing=framing,
        fov_diameter_px=fov_diameter(mask) / factor,
        source_fov=mask,
    )


def pixel_spacing(
    source_fov_diameter_px: float, field_angle_degrees: float, dicom_spacing_um: float | None
) -> tuple[float, ScaleSource]:
    """µm per source pixel and how it was obtained (DICOM Pixel Spacing wins over the FOV estimate)."""
    if dicom_spacing_um is not None and dicom_spacing_um > 0:
        return float(dicom_spacing_um), ScaleSource.PIXEL_SPACING
    return field_angle_degrees * UM_PER_DEGREE / source_fov_diameter_px, ScaleSource.FIELD_OF_VIEW
