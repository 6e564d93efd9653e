"""Vascular and optic-disc measurements of one analysed image (see :mod:`model.analysis.features`).

Units. ``standard`` definitions report lengths in µm (widths, CRAE/CRVE, disc and cup sizes), curvature in
mm⁻² and tortuosity density in mm⁻¹, using the image's µm-per-pixel scale (DICOM Pixel Spacing or the
field-of-view estimate, stated in every measurement's ``scale_source``). ``automorph`` definitions report lengths
in px of AutoMorph's 912 × 912 FOV-centred image (its training targets are in those pixels); Hubbard CRAE/CRVE
are always in µm (the formulas' constants assume µm). Dimensionless features have unit ``1``.

Zone features use the vessel pixels and the centreline points inside the zone; centreline runs are clipped to
the zone. CRAE/CRVE take the six widest vessels of a zone: in ``standard`` mode a vessel is a connected piece of
the artery (vein) mask inside the zone, with the calibre of its widest centreline run; in ``automorph`` mode the
candidates are the segments themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from model.analysis.disc import DiscCup
from model.analysis.features import (
    Definitions,
    arc_length,
    box_counting_dimension,
    central_equivalent,
    distance_tortuosity,
    hubbard_pair,
    knudtson_pair,
    squared_curvature_tortuosity,
    tortuosity_density,
    vessel_density,
)
from model.analysis.segments import Segment
from model.analysis.zones import zone_mask
from model.schema import Measurement, ScaleSource, Source, VesselType, Zone, automorph_key

AUTOMORPH_SIZE = 912
"""Side of AutoMorph's FOV-centred working image (px)."""


@dataclass(frozen=True)
class Geometry:
    """What the features need to know about the working image."""

    size: int
    fov: np.ndarray
    disc_xy: tuple[float, float]
    disc_radius: float
    um_per_px: float
    """µm per working-image pixel."""
    scale_source: ScaleSource
    min_run: float
    """Shortest centreline run measured (working px)."""


def _runs(points: np.ndarray, inside: np.ndarray, min_run: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Contiguous stretches of a centreline inside a region, as (points, index range mask)."""
    if not inside.any():
        return
    edges = np.flatnonzero(np.diff(np.concatenate([[0], inside.astype(np.int8), [0]])))
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        piece = points[start:stop]
        if len(piece) > 1 and arc_length(piece) >= min_run:
            selector = np.zeros(len(points), dtype=bool)
            selector[start:stop] = True
            yield piece, selector


class FeatureSet:
    """Builds the measurement list for one image."""

    def __init__(self, geometry: Geometry, definitions: Definitions) -> None:
        self.g = geometry
        self.defs = definitions
        self.method = definitions.value
        self.items: list[Measurement] = []

    # unit conversions --------------------------------------------------------------------------------------
    @property
    def _px_mm(self) -> float:
        return self.g.um_per_px / 1000.0

    def _length(self, px: float) -> tuple[float, str]:
        if self.defs == Definitions.AUTOMORPH:
            return px * AUTOMORPH_SIZE / self.g.size, "px"
        return px * self.g.um_per_px, "um"

    def add(
        self,
        feature: str,
        value: float,
        unit: str,
        vessel: VesselType = VesselType.ALL,
        zone: Zone = Zone.WHOLE,
        key: str | None = None,
    ) -> None:
        if value is None or not np.isfinite(value):
            return
        scale = self.g.scale_source if unit in {"um", "mm-1", "mm-2"} else None
        self.items.append(
            Measurement(
                key=key or automorph_key(feature, vessel, zone),
                value=float(value),
                unit=unit,
                zone=zone,
                vessel=vessel,
                source=Source.MEASURED,
                method=self.method,
                scale_source=scale,
            )
        )

    # features ----------------------------------------------------------------------------------------------
    def vessel_features(self, masks: dict[VesselType, np.ndarray], segments: list[Segment]) -> None:
        shape = self.g.fov.shape
        for zone in (Zone.WHOLE, Zone.B, Zone.C):
            region = self.g.fov & zone_mask(shape, self.g.disc_xy, self.g.disc_radius, zone)
            if not region.any():
                continue
            for vessel, mask in masks.items():
                chosen = [s for s in segments if vessel == VesselType.ALL or s.kind == vessel.value]
                self._zone_vessel(zone, vessel, mask & region, region, chosen)

    def _zone_vessel(
        self, zone: Zone, vessel: VesselType, mask: np.ndarray, region: np.ndarray, segments: list[Segment]
    ) -> None:
        self.add("Fractal_dimension", box_counting_dimension(mask, self.defs), "1", vessel, zone)
        self.add("Vessel_density", vessel_density(mask, region, self.defs), "1", vessel, zone)
        widths, dist, curv, dens = [], [], [], []
        for s in segments:
            ys = np.clip(np.round(s.points[:, 1]).astype(int), 0, region.shape[0] - 1)
            xs = np.clip(np.round(s.points[:, 0]).astype(int), 0, region.shape[1] - 1)
            inside = region[ys, xs]
            for piece, selector in _runs(s.points, inside, self.g.min_run):
                w = s.widths[selector]
                widths.append(w[np.isfinite(w)])
                dist.append(distance_tortuosity(piece))
                curv.append(squared_curvature_tortuosity(piece, self.defs))
                dens.append(tortuosity_density(piece, self.defs))
        if widths:
            all_w = np.concatenate(widths)
            if all_w.size:
                self.add("Average_width", *self._length(float(all_w.mean())), vessel=vessel, zone=zone)
        if dist:
            self.add("Distance_tortuosity", float(np.nanmean(dist)), "1", vessel, zone)
            curvature = float(np.nanmean(curv))
            density = float(np.nanmean(dens))
            if self.defs == Definitions.STANDARD:
                self.add("Squared_curvature_tortuosity", curvature / self._px_mm**2, "mm-2", vessel, zone)
                self.add("Tortuosity_density", density / self._px_mm, "mm-1", vessel, zone)
            else:
                self.add("Squared_curvature_tortuosity", curvature, "1", vessel, zone)
                self.add("Tortuosity_density", density, "1", vessel, zone)

    def calibre_features(self, masks: dict[VesselType, np.ndarray], segments: list[Segment]) -> None:
        shape = self.g.fov.shape
        for zone in (Zone.B, Zone.C):
            region = self.g.fov & zone_mask(shape, self.g.disc_xy, self.g.disc_radius, zone)
            equivalents: dict[tuple[str, VesselType], float] = {}
            for vessel, name in ((VesselType.ARTERY, "CRAE"), (VesselType.VEIN, "CRVE")):
                widths_px = self._candidate_widths(
                    masks[vessel] & region, region, [s for s in segments if s.kind == vessel.value]
                )
                artery = vessel == VesselType.ARTERY
                knudtson_px = central_equivalent(widths_px, knudtson_pair, artery)
                value, unit = self._length(knudtson_px)
                self.add("", value, unit, vessel, zone, key=f"{name}_Knudtson_zone_{zone.value.lower()}")
                widths_um = [w * self.g.um_per_px for w in widths_px]
                hubbard = central_equivalent(widths_um, hubbard_pair, artery)
                self.add("", hubbard, "um", vessel, zone, key=f"{name}_Hubbard_zone_{zone.value.lower()}")
                equivalents[("Knudtson", vessel)] = knudtson_px * self.g.um_per_px
                equivalents[("Hubbard", vessel)] = hubbard
            for formula in ("Knudtson", "Hubbard"):
                crae, crve = (
                    equivalents[(formula, VesselType.ARTERY)],
                    equivalents[(formula, VesselType.VEIN)],
                )
                if np.isfinite(crae) and np.isfinite(crve) and crve > 0:
                    self.add(
                        "",
                        crae / crve,
                        "1",
                        VesselType.ALL,
                        zone,
                        key=f"AVR_{formula}_zone_{zone.value.lower()}",
                    )

    def _candidate_widths(self, mask: np.ndarray, region: np.ndarray, segments: list[Segment]) -> list[float]:
        runs: list[tuple[float, tuple[int, int]]] = []
        for s in segments:
            ys = np.clip(np.round(s.points[:, 1]).astype(int), 0, region.shape[0] - 1)
            xs = np.clip(np.round(s.points[:, 0]).astype(int), 0, region.shape[1] - 1)
            for piece, selector in _runs(s.points, region[ys, xs], self.g.min_run):
                w = s.widths[selector]
                w = w[np.isfinite(w)]
                if w.size:
                    mid = piece[len(piece) // 2]
                    runs.append((float(np.median(w)), (round(mid[1]), round(mid[0]))))
        if self.defs == Definitions.AUTOMORPH:
            return [w for w, _ in runs]
        labels, _ = ndi.label(mask, structure=np.ones((3, 3), int))
        widest: dict[int, float] = {}
        for w, (y, x) in runs:
            lab = int(labels[y, x]) or -(len(widest) + 1)
            widest[lab] = max(widest.get(lab, 0.0), w)
        return list(widest.values())

    def disc_features(self, disc_cup: DiscCup) -> None:
        for name, ellipse in (("Disc", disc_cup.disc), ("Cup", disc_cup.cup)):
            self.add(f"{name}_height", *self._length(ellipse.height))
            self.add(f"{name}_width", *self._length(ellipse.width))
        self.add("CDR_vertical", disc_cup.cdr_vertical, "1")
        self.add("CDR_horizontal", disc_cup.cdr_horizontal, "1")
