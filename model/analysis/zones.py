"""Peripapillary measurement zones (Knudtson et al. 2003; AutoMorph): distances from the optic-disc margin in
disc diameters (DD). Zone B spans 0.5–1.0 DD from the margin, zone C 0.5–2.0 DD; with disc radius r
(DD = 2r) these are the annuli r + DD/2 … r + DD (= 2r … 3r) and 2r … 5r around the disc centre."""

from __future__ import annotations

import numpy as np

from model.schema import Zone

ZONE_LIMITS_DD: dict[Zone, tuple[float, float]] = {Zone.B: (0.5, 1.0), Zone.C: (0.5, 2.0)}
"""Inner and outer distance from the disc margin, in disc diameters."""


def zone_radii(zone: Zone, disc_radius: float) -> tuple[float, float]:
    """Inner and outer radius (px) of ``zone`` around the disc centre."""
    inner, outer = ZONE_LIMITS_DD[zone]
    return disc_radius + inner * 2 * disc_radius, disc_radius + outer * 2 * disc_radius


def zone_mask(
    shape: tuple[int, int], centre: tuple[float, float], disc_radius: float, zone: Zone
) -> np.ndarray:
    """Boolean mask of ``zone`` (the whole image for :attr:`Zone.WHOLE`); ``centre`` is (x, y) in px."""
    if zone == Zone.WHOLE:
        return np.ones(shape, dtype=bool)
    inner, outer = zone_radii(zone, disc_radius)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    distance = np.hypot(xx - centre[0], yy - centre[1])
    return (distance >= inner) & (distance <= outer)
