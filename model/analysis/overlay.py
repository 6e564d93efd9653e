"""The clinician-facing overlay: vessels coloured artery (red) / vein (blue), optic disc (green) and cup
(yellow) outlines, zone B and C rings (dashed white), the fovea (cross) and a legend."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

ARTERY = (255, 35, 35)
VEIN = (40, 110, 255)
UNCLASSIFIED = (240, 200, 40)
DISC = (60, 230, 90)
CUP = (255, 230, 0)
ZONE = (255, 255, 255)


@dataclass(frozen=True)
class OverlayGeometry:
    """Source-image coordinates (px) of what is drawn besides the masks."""

    disc_contour: np.ndarray | None
    cup_contour: np.ndarray | None
    disc_centre: tuple[float, float] | None
    zone_radii: dict[str, tuple[float, float]]
    fovea: tuple[float, float] | None


def _dashed_circle(
    draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, width: int, dashes: int = 48
) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    step = 360.0 / dashes
    for i in range(dashes):
        draw.arc(box, start=i * step, end=i * step + step * 0.6, fill=ZONE, width=width)


def render(
    rgb: np.ndarray, vessels: np.ndarray, arteries: np.ndarray, veins: np.ndarray, geometry: OverlayGeometry
) -> np.ndarray:
    """RGB uint8 overlay at the source size."""
    base = rgb.astype(np.float32)
    # a dark rim around every vessel keeps red arteries readable on an orange fundus
    rim = ndi.binary_dilation(vessels, iterations=max(1, round(min(vessels.shape) / 700))) & ~vessels
    base[rim] *= 0.35
    colour = np.zeros_like(base)
    colour[vessels] = UNCLASSIFIED
    colour[arteries] = ARTERY
    colour[veins] = VEIN
    alpha = 0.85 * vessels[..., None]
    out = (base * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    h, w = vessels.shape
    line = max(1, round(min(h, w) / 350))
    if geometry.disc_centre is not None:
        cx, cy = geometry.disc_centre
        for name, (_, outer) in sorted(geometry.zone_radii.items()):
            _dashed_circle(draw, cx, cy, outer, line)
            font = ImageFont.load_default(size=max(10, round(min(h, w) / 45)))
            draw.text(
                (cx + outer * 0.71 + 2, cy - outer * 0.71 - 2),
                f"zone {name}",
                fill=ZONE,
                font=font,
                anchor="lb",
                stroke_width=max(1, line // 2),
                stroke_fill=(0, 0, 0),
            )
        inner = min((r for r, _ in geometry.zone_radii.values()), default=None)
        if inner is not None:
            _dashed_circle(draw, cx, cy, inner, line)
    for contour, colour_ in ((geometry.disc_contour, DISC), (geometry.cup_contour, CUP)):
        if contour is not None and len(contour) > 2:
            pts = [tuple(map(float, p)) for p in contour]
            draw.line([*pts, pts[0]], fill=colour_, width=line + 1, joint="curve")
    if geometry.fovea is not None:
        fx, fy = geometry.fovea
        arm = max(6, round(min(h, w) / 60))
        draw.line([(fx - arm, fy), (fx + arm, fy)], fill=CUP, width=line + 1)
        draw.line([(fx, fy - arm), (fx, fy + arm)], fill=CUP, width=line + 1)
    _legend(draw, h, w, line)
    return np.asarray(image)


def _legend(draw: ImageDraw.ImageDraw, h: int, w: int, line: int) -> None:
    size = max(10, round(min(h, w) / 45))
    font = ImageFont.load_default(size=size)
    entries = [("artery", ARTERY), ("vein", VEIN), ("disc", DISC), ("cup", CUP), ("zones B/C", ZONE)]
    x0, y0 = size // 2, size // 2
    box_h = len(entries) * (size + 4) + size // 2
    draw.rectangle((x0 - 4, y0 - 4, x0 + 6 * size, y0 + box_h), fill=(0, 0, 0))
    for i, (label, colour) in enumerate(entries):
        y = y0 + i * (size + 4)
        draw.rectangle((x0, y + 2, x0 + size - 2, y + size - 2), fill=colour)
        draw.text((x0 + size + 4, y), label, fill=(255, 255, 255), font=font)
