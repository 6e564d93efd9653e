"""Optic disc, optic cup and fovea (classical image analysis on the FOV-centred working image).

Disc localisation: the optic disc is the largest bright, vessel-converging spot. Each pixel is scored by its
local brightness contrast (mean of the red-free luminance in a disc-sized window minus the mean of the
surrounding annulus, after closing away dark vessels) plus the density of large vessels around it (Gaussian of
the vessel mask, σ ≈ one disc diameter), both z-scored inside the FOV; the disc centre is the best-scoring pixel
at least one disc radius inside the FOV, then moved to the contrast peak within one disc diameter. The expected
disc diameter is 0.14 FOV diameters (≈ 1.8 mm of a 45° field; Jonas et al. 1988 disc size).

Disc and cup outlines: around the centre the vessel-free (grey-closed) red and green channels are sampled on
rays; on each ray the disc margin is the strongest falling edge of red within 0.5–1.6 expected radii and the
cup margin is where green has fallen 65 % of the way from the pale cup's level to the rim's (:data:`CUP_LEVEL`).
Edge radii are median-filtered over angle and an ellipse is fitted to each boundary (least squares, Fitzgibbon 1999), giving masks, heights, widths and CDRs.

Fovea: the darkest, vessel-free point 2–3 disc diameters from the disc centre (Gaussian-smoothed green,
σ ≈ ¼ DD), on the side of the disc facing the FOV centre, within 35° of the horizontal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import EllipseModel
from skimage.morphology import disk
from skimage.transform import resize

from model.analysis.filters import gaussian

DISC_FOV_RATIO = 0.14
"""Expected optic-disc diameter as a fraction of the FOV diameter (45° camera)."""
DENSITY_WEIGHT = 0.7
"""Weight of the vessel-density cue against the brightness-contrast cue when locating the disc, chosen on the
CODRAS train split (grid over this weight and an absolute-brightness term, whose best weight there was 0)."""
REFINE_RADIUS_DD = 1.0
"""The centre is refined to the brightness-contrast peak within this many disc diameters of the combined
optimum: vessel density peaks on the arcade next to a very bright disc (seen on HEI-MED), brightness does not."""


@dataclass(frozen=True)
class Ellipse:
    """Centre (x, y), semi-axes a, b and rotation θ (rad, of a from the x axis), in px."""

    cx: float
    cy: float
    a: float
    b: float
    theta: float

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
        c, s = np.cos(self.theta), np.sin(self.theta)
        u = (xx - self.cx) * c + (yy - self.cy) * s
        v = -(xx - self.cx) * s + (yy - self.cy) * c
        return (u / self.a) ** 2 + (v / self.b) ** 2 <= 1.0

    @property
    def height(self) -> float:
        """Vertical extent 2·√(a² sin²θ + b² cos²θ)."""
        return 2.0 * float(np.hypot(self.a * np.sin(self.theta), self.b * np.cos(self.theta)))

    @property
    def width(self) -> float:
        """Horizontal extent 2·√(a² cos²θ + b² sin²θ)."""
        return 2.0 * float(np.hypot(self.a * np.cos(self.theta), self.b * np.sin(self.theta)))

    def contour(self, n: int = 64) -> np.ndarray:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        c, s = np.cos(self.theta), np.sin(self.theta)
        x = self.cx + self.a * np.cos(t) * c - self.b * np.sin(t) * s
        y = self.cy + self.a * np.cos(t) * s + self.b * np.sin(t) * c
        return np.stack([x, y], axis=1)


def _zscore(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    inside = values[where]
    return (values - inside.mean()) / (inside.std() + 1e-9)


@dataclass(frozen=True)
class DiscLocation:
    x: float
    y: float
    score: float
    """0–1: how far the winning score stands above the runner-up elsewhere in the image."""


def locate_disc(rgb: np.ndarray, fov: np.ndarray, vessels: np.ndarray, fov_diameter: float) -> DiscLocation:
    """Disc centre (x, y) in working-image px."""
    factor = max(1, round(fov.shape[0] / 192))
    small_shape = (fov.shape[0] // factor, fov.shape[1] // factor)
    lum = resize(0.6 * rgb[..., 0] + 0.4 * rgb[..., 1], small_shape, anti_aliasing=True)
    sfov = resize(fov.astype(np.float32), small_shape) > 0.5
    svessels = resize(vessels.astype(np.float32), small_shape, anti_aliasing=True)
    dd = DISC_FOV_RATIO * fov_diameter / factor
    lum = ndi.grey_closing(lum, footprint=disk(max(1, round(dd / 8))))
    weight = sfov.astype(np.float32)
    fill = lum[sfov].mean()
    lum = np.where(sfov, lum, fill)
    inner = ndi.gaussian_filter(lum, dd / 4)
    outer = ndi.gaussian_filter(lum, dd)
    contrast = inner - outer
    density = ndi.gaussian_filter(svessels, dd / 2) / np.maximum(ndi.gaussian_filter(weight, dd / 2), 1e-3)
    allowed = ndi.binary_erosion(sfov, iterations=max(1, int(dd / 6)))
    if not allowed.any():
        allowed = sfov
    contrast_z = _zscore(contrast, sfov)
    score = np.where(allowed, contrast_z + DENSITY_WEIGHT * _zscore(density, sfov), -np.inf)
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    best = score[y, x]
    yy, xx = np.mgrid[0 : score.shape[0], 0 : score.shape[1]]
    distance = np.hypot(xx - x, yy - y)
    elsewhere = score[distance > 1.5 * dd]
    runner = float(elsewhere.max()) if elsewhere.size else best - 1.0
    confidence = float(1.0 - np.exp(-max(best - runner, 0.0)))
    near = allowed & (distance <= REFINE_RADIUS_DD * dd)
    y, x = np.unravel_index(int(np.argmax(np.where(near, contrast_z, -np.inf))), score.shape)
    return DiscLocation(x=(x + 0.5) * factor - 0.5, y=(y + 0.5) * factor - 0.5, score=confidence)


@dataclass(frozen=True)
class DiscCup:
    disc: Ellipse
    cup: Ellipse
    confidence: float
    """0–1: agreement of the ray edges with the fitted disc ellipse."""

    @property
    def cdr_vertical(self) -> float:
        return self.cup.height / self.disc.height

    @property
    def cdr_horizontal(self) -> float:
        return self.cup.width / self.disc.width


_ANGLES = 72


def _ray_profiles(channel: np.ndarray, cx: float, cy: float, radii: np.ndarray) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, _ANGLES, endpoint=False)
    xs = cx + np.cos(t)[:, None] * radii[None]
    ys = cy + np.sin(t)[:, None] * radii[None]
    return ndi.map_coordinates(channel, [ys.ravel(), xs.ravel()], order=1, mode="nearest").reshape(xs.shape)


def _edge_radii(profiles: np.ndarray, radii: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Per ray, the radius of the strongest falling edge between ``lo`` and ``hi``."""
    smooth = ndi.gaussian_filter1d(profiles, 1.5, axis=1)
    slope = -np.gradient(smooth, radii, axis=1)
    window = (radii >= lo) & (radii <= hi)
    slope = np.where(window[None], slope, -np.inf)
    best = np.argmax(slope, axis=1)
    edge = radii[best]
    # circular median over angle removes rays caught on vessels
    padded = np.concatenate([edge[-4:], edge, edge[:4]])
    edge = ndi.median_filter(padded, size=9)[4:-4]
    return edge


CUP_LEVEL = 0.35
"""Cup margin level between rim (0) and pale cup (1); chosen on the 8 ODOC samples (see docs/measurements.md)."""


def _half_level_radii(
    profiles: np.ndarray, radii: np.ndarray, disc_r: np.ndarray, mean_disc: float
) -> np.ndarray:
    """Cup margin per ray: where the green level first falls below :data:`CUP_LEVEL` of the way from the
    neuroretinal rim (the ray's mean at 0.8–0.95 disc radius) to the pale cup (its maximum inside ½ disc radius)."""
    out = np.empty(len(profiles))
    for i, (profile, rim_at) in enumerate(zip(profiles, disc_r, strict=True)):
        core = radii <= 0.5 * rim_at
        rim = (radii >= 0.8 * rim_at) & (radii <= 0.95 * rim_at)
        if not core.any() or not rim.any():
            out[i] = 0.5 * rim_at
            continue
        peak_index = int(np.argmax(np.where(core, profile, -np.inf)))
        level = profile[rim].mean() + CUP_LEVEL * (profile[peak_index] - profile[rim].mean())
        below = np.flatnonzero((profile < level) & (np.arange(len(radii)) > peak_index) & (radii <= rim_at))
        out[i] = radii[below[0]] if below.size else 0.9 * rim_at
    padded = np.concatenate([out[-4:], out, out[:4]])
    return np.clip(ndi.median_filter(padded, size=9)[4:-4], 0.15 * mean_disc, None)


def _fit_ellipse(cx: float, cy: float, radii: np.ndarray) -> Ellipse:
    t = np.linspace(0, 2 * np.pi, _ANGLES, endpoint=False)
    pts = np.stack([cx + np.cos(t) * radii, cy + np.sin(t) * radii], axis=1)
    mean_r = float(np.mean(radii))
    model = EllipseModel.from_estimate(pts)
    if model:
        (xc, yc), (a, b), theta = model.center, model.axis_lengths, float(model.theta)
        xc, yc, a, b = float(xc), float(yc), float(a), float(b)
        if 0.5 * mean_r < min(a, b) and max(a, b) < 1.6 * mean_r and np.hypot(xc - cx, yc - cy) < mean_r:
            return Ellipse(xc, yc, a, b, theta)
    return Ellipse(cx, cy, mean_r, mean_r, 0.0)


def segment_disc_cup(rgb: np.ndarray, cx: float, cy: float, expected_radius: float) -> DiscCup:
    """Disc and cup ellipses around an approximate disc centre (px)."""
    vessel_free = ndi.grey_closing(rgb, size=(max(3, int(expected_radius / 5)) | 1,) * 2 + (1,))
    red = ndi.gaussian_filter(vessel_free[..., 0], 1.0)
    green = ndi.gaussian_filter(vessel_free[..., 1], 1.0)
    radii = np.arange(0.0, 1.8 * expected_radius, max(0.5, expected_radius / 80))
    disc_r = _edge_radii(
        _ray_profiles(red, cx, cy, radii), radii, 0.5 * expected_radius, 1.6 * expected_radius
    )
    disc = _fit_ellipse(cx, cy, disc_r)
    mean_disc = float(np.mean(disc_r))
    green_profiles = ndi.gaussian_filter1d(_ray_profiles(green, disc.cx, disc.cy, radii), 2.0, axis=1)
    cup_r = _half_level_radii(green_profiles, radii, disc_r, mean_disc)
    cup = _fit_ellipse(disc.cx, disc.cy, np.minimum(cup_r, 0.95 * disc_r))
    cup = Ellipse(cup.cx, cup.cy, min(cup.a, 0.95 * disc.a), min(cup.b, 0.95 * disc.b), cup.theta)
    spread = float(np.median(np.abs(disc_r - np.median(disc_r))) / max(np.median(disc_r), 1e-6))
    return DiscCup(disc=disc, cup=cup, confidence=float(np.clip(1.0 - 4.0 * spread, 0.0, 1.0)))


def locate_fovea(
    rgb: np.ndarray, fov: np.ndarray, vessels: np.ndarray, disc_x: float, disc_y: float, disc_diameter: float
) -> tuple[float, float, float]:
    """Fovea (x, y, score) in px: the locally darkest, vessel-poor point 2–3 DD from the disc towards the FOV
    centre, preferring the disc's horizontal (the fovea lies ≈ 2.5 DD temporal, slightly below the disc)."""
    green = gaussian(rgb[..., 1], disc_diameter / 4)
    surround = gaussian(rgb[..., 1], disc_diameter)
    density = gaussian(vessels.astype(np.float32), disc_diameter / 4)
    h, w = fov.shape
    yy, xx = np.mgrid[0:h, 0:w]
    distance = np.hypot(xx - disc_x, yy - disc_y)
    toward = 1.0 if disc_x < w / 2 else -1.0
    angle = np.degrees(np.arctan2(np.abs(yy - disc_y), toward * (xx - disc_x)))
    allowed = (distance >= 2.0 * disc_diameter) & (distance <= 3.0 * disc_diameter) & (angle <= 35)
    allowed &= ndi.binary_erosion(fov, iterations=max(1, int(disc_diameter / 4)))
    if not allowed.any():
        return w / 2.0, h / 2.0, 0.0
    spread = float((green - surround)[fov].std()) + 1e-6
    darkness = (green - surround) / spread
    score = darkness + 0.5 * density / (float(density[fov].mean()) + 1e-6) + 0.5 * (angle / 35.0) ** 2
    score = np.where(allowed, score, np.inf)
    y, x = np.unravel_index(int(np.argmin(score)), score.shape)
    return float(x), float(y), float(np.clip(-darkness[y, x] / 2.0, 0.0, 1.0))


def cdr_from_masks(disc: np.ndarray, cup: np.ndarray) -> tuple[float, float]:
    """(vertical, horizontal) cup-to-disc ratio from binary masks: ratios of the row and column extents."""

    def extents(mask: np.ndarray) -> tuple[int, int]:
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        return (int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)) if rows.size else (0, 0)

    (dh, dw), (ch, cw) = extents(disc), extents(cup)
    return (ch / dh if dh else float("nan"), cw / dw if dw else float("nan"))
