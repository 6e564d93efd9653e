"""Vessel segmentation: a trained small U-Net (default) or a classical multi-scale ridge filter.

Both work at a reference scale: the image is resized so that its field of view is
:data:`REFERENCE_FOV_DIAMETER` px across (the DRIVE FOV diameter the network was trained at), which makes vessel
calibres in pixels comparable across cameras; the probability map is resized back to the caller's grid.

Input normalisation (both methods): the green channel, where vessel contrast is highest, is standardised by its
local mean and standard deviation inside the FOV (normalised convolution with a Gaussian window of
1/40 FOV diameter, Knutsson & Westin 1993), which removes illumination gradients and camera-specific contrast;
pixels outside the FOV are set to 0 so the FOV border produces no ridge response.

Classical fallback: Sato et al. 1998 multi-scale Hessian line filter for dark ridges on the normalised green
channel, turned into a 0–1 score by a logistic on its in-FOV distribution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import sato
from skimage.measure import regionprops
from skimage.morphology import disk
from skimage.transform import resize

REFERENCE_FOV_DIAMETER = 540.0
MAX_VESSEL_WIDTH = 15.0
"""Thickest plausible vessel at the reference scale (px; DRIVE's widest vessels near the disc are ≈ 10–12 px)."""
"""FOV diameter (px) at which vessels are segmented: DRIVE's (565 × 584 images, FOV ≈ 540 px)."""

WEIGHTS = Path(__file__).with_name("vesselnet.safetensors")


def normalised_green(rgb: np.ndarray, fov: np.ndarray, fov_diameter: float) -> np.ndarray:
    """Network input (2, H, W) float32: locally standardised green channel and locally centred green channel
    divided by the global in-FOV standard deviation; 0 outside the FOV."""
    green = rgb[..., 1].astype(np.float32)
    if green.max() > 1.5:
        green = green / 255.0
    weight = fov.astype(np.float32)
    sigma = fov_diameter / 40.0
    norm = np.maximum(ndi.gaussian_filter(weight, sigma), 1e-3)
    mean = ndi.gaussian_filter(green * weight, sigma) / norm
    centred = (green - mean) * weight
    var = ndi.gaussian_filter(centred * centred, sigma) / norm
    global_std = float(centred[fov].std()) + 1e-4
    local = centred / (np.sqrt(var) + 0.5 * global_std)
    return np.stack([np.clip(local, -6, 6), np.clip(centred / global_std, -6, 6)]).astype(np.float32) * weight


def to_reference(
    rgb: np.ndarray, fov: np.ndarray, fov_diameter: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Resize image and FOV mask so that the FOV diameter is :data:`REFERENCE_FOV_DIAMETER`."""
    scale = REFERENCE_FOV_DIAMETER / fov_diameter
    if abs(scale - 1.0) < 0.02:
        return rgb, fov, 1.0
    shape = (max(8, round(rgb.shape[0] * scale)), max(8, round(rgb.shape[1] * scale)))
    small = resize(rgb, shape + rgb.shape[2:], order=1, anti_aliasing=scale < 1, preserve_range=True)
    small_fov = resize(fov.astype(np.float32), shape, order=1, preserve_range=True) > 0.5
    return small.astype(np.float32), small_fov, scale


class VesselSegmenter(Protocol):
    name: str

    def probability(self, rgb: np.ndarray, fov: np.ndarray, fov_diameter: float) -> np.ndarray:
        """Vessel probability (H, W) float32 on the caller's grid."""


class _ReferenceScale:
    """Shared resizing around a reference-scale scorer."""

    threshold: float = 0.5

    def probability(self, rgb: np.ndarray, fov: np.ndarray, fov_diameter: float) -> np.ndarray:
        small, small_fov, scale = to_reference(rgb, fov, fov_diameter)
        prob = self._score(normalised_green(small, small_fov, REFERENCE_FOV_DIAMETER), small_fov)
        if scale != 1.0:
            prob = resize(prob, fov.shape, order=1, preserve_range=True).astype(np.float32)
        return np.where(fov, prob, 0.0).astype(np.float32)

    def segment(self, rgb: np.ndarray, fov: np.ndarray, fov_diameter: float) -> tuple[np.ndarray, np.ndarray]:
        """(probability, binary mask) with the method's operating threshold. Blobs thicker than any retinal
        vessel (:data:`MAX_VESSEL_WIDTH` px at the reference scale) go — a dark fovea, haemorrhages — and so do
        isolated fragments that are too small or too compact to be vessel (:func:`_drop_compact_fragments`)."""
        prob = self.probability(rgb, fov, fov_diameter)
        mask = prob >= self.threshold
        radius = max(2, round(MAX_VESSEL_WIDTH / 2 * fov_diameter / REFERENCE_FOV_DIAMETER))
        blobs = ndi.binary_opening(mask, structure=disk(radius))
        if blobs.any():
            mask &= ~ndi.binary_dilation(blobs, iterations=2)
        return prob, _drop_compact_fragments(mask, float(fov.sum()))

    def _score(self, features: np.ndarray, fov: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _drop_compact_fragments(mask: np.ndarray, fov_area: float) -> np.ndarray:
    """Remove isolated components under 0.01 % of the FOV, and components under 0.25 % of the FOV that are not
    elongated (second-moment axis ratio < 3): vessel fragments are thin and long, lesion and noise blobs are not."""
    labels, count = ndi.label(mask, structure=np.ones((3, 3), int))
    if count == 0:
        return mask
    keep = np.ones(count + 1, dtype=bool)
    keep[0] = False
    for region in regionprops(labels):
        if region.area < max(4.0, 1e-4 * fov_area):
            keep[region.label] = False
        elif region.area < 2.5e-3 * fov_area:
            major, minor = region.axis_major_length, max(region.axis_minor_length, 1.0)
            keep[region.label] = major / minor >= 3.0
    return keep[labels]


class ClassicalVessels(_ReferenceScale):
    """Sato multi-scale dark-ridge filter (σ = 1, 2, 3 px at the reference scale) on the normalised green."""

    name = "classical-sato"
    threshold = 0.5

    def _score(self, features: np.ndarray, fov: np.ndarray) -> np.ndarray:
        inner = ndi.binary_erosion(fov, iterations=6)
        # only darker-than-background structure can be vessel: clipping the bright side stops the dark gaps
        # between bright lesions (exudates, drusen) from responding as ridges
        darker = np.minimum(features[0], 0.3)
        ridge = sato(darker, sigmas=(1.0, 2.0, 3.0), black_ridges=True, mode="reflect")
        ridge = np.where(inner, ridge, 0.0)
        values = ridge[inner]
        if values.size == 0:
            return np.zeros_like(ridge, dtype=np.float32)
        centre = float(np.percentile(values, CLASSICAL_PERCENTILE))
        spread = float(np.percentile(values, 95) - np.percentile(values, 50)) / 4.0 + 1e-6
        return (1.0 / (1.0 + np.exp(-(ridge - centre) / spread))).astype(np.float32)


CLASSICAL_PERCENTILE = 87.0
"""In-FOV percentile of the ridge response that maps to score 0.5 (≈ 13 % of the FOV is vessel in DRIVE)."""


class NetworkVessels(_ReferenceScale):
    """The committed U-Net (:mod:`model.analysis.vesselnet`), weights from ``vesselnet.safetensors``.
    Inference is thread-safe: the module is read-only in eval mode and calls run under ``torch.no_grad``."""

    name = "unet"

    def __init__(self, weights: Path = WEIGHTS, threads: int | None = None) -> None:
        import torch
        from safetensors.torch import load_file

        from model.analysis.vesselnet import MULTIPLE, VesselUNet

        state = load_file(str(weights))
        threshold = state.pop("threshold", None)
        self.threshold = float(threshold.item()) if threshold is not None else 0.5
        net = VesselUNet()
        net.load_state_dict(state)
        net.eval()
        self._net = net
        self._torch = torch
        self._multiple = MULTIPLE
        self._threads = threads

    def _score(self, features: np.ndarray, fov: np.ndarray) -> np.ndarray:
        torch = self._torch
        _, h, w = features.shape
        m = self._multiple
        ph, pw = (-h) % m, (-w) % m
        padded = np.pad(features, ((0, 0), (0, ph), (0, pw)))
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        with torch.inference_mode():
            logits = self._net(torch.from_numpy(padded)[None])[0, 0, :h, :w]
            prob = torch.sigmoid(logits).numpy()
        return prob.astype(np.float32)


def make_segmenter(method: str) -> _ReferenceScale:
    """``network`` (the committed U-Net weights) or ``classical`` (Sato filter, no torch)."""
    if method == "network":
        if not WEIGHTS.is_file():
            raise FileNotFoundError(
                f"vessel network weights {WEIGHTS} are missing; use vessel_method 'classical'"
            )
        return NetworkVessels()
    if method == "classical":
        return ClassicalVessels()
    raise ValueError(f"unknown vessel method {method!r} (network or classical)")
