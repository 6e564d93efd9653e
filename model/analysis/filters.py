"""Image filters shared by the pipeline's stages."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of a 2-D map; for σ > 10 px it runs on a block-averaged copy (factor ≈ σ/3) and is
    interpolated back, which changes the result by far less than the smoothing itself and is much faster."""
    image = np.asarray(image, dtype=np.float32)
    factor = int(sigma // 3)
    if sigma <= 10 or factor < 2:
        return ndi.gaussian_filter(image, sigma)
    h, w = image.shape
    ph, pw = (-h) % factor, (-w) % factor
    padded = np.pad(image, ((0, ph), (0, pw)), mode="edge")
    small = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).mean(
        axis=(1, 3)
    )
    small = ndi.gaussian_filter(small, np.sqrt(max(sigma**2 - factor**2 / 4.0, 1.0)) / factor)
    # block centres sit at (i + ½)·factor − ½ in full-resolution coordinates
    ys = (np.arange(h, dtype=np.float64) + 0.5) / factor - 0.5
    xs = (np.arange(w, dtype=np.float64) + 0.5) / factor - 0.5
    return separable_linear(small, ys, xs)


def separable_linear(values: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``values`` on the grid ``ys`` × ``xs`` (edge values beyond the border); interpolating
    rows then columns is much cheaper than a general coordinate map."""
    h, w = values.shape
    y0 = np.clip(np.floor(ys).astype(int), 0, h - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    wy = np.clip(ys - y0, 0.0, 1.0).astype(np.float32)[:, None]
    rows = values[y0] * (1 - wy) + values[y1] * wy
    x0 = np.clip(np.floor(xs).astype(int), 0, w - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wx = np.clip(xs - x0, 0.0, 1.0).astype(np.float32)[None, :]
    return (rows[:, x0] * (1 - wx) + rows[:, x1] * wx).astype(np.float32)
