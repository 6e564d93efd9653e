"""The measurement pipeline: one photograph in, an :class:`~model.schema.ImageAnalysis` and masks out.

Steps: field of view and FOV-centred working image (:mod:`.fov`), vessel segmentation (:mod:`.vessels`),
quality (:mod:`.quality`), optic disc, cup and fovea (:mod:`.disc`), centreline segments and calibres
(:mod:`.segments`), artery/vein classification (:mod:`.av`), features (:mod:`.measure`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from pydicom.uid import generate_uid

from model.analysis import av, overlay
from model.analysis.disc import DISC_FOV_RATIO, Ellipse, locate_disc, locate_fovea, segment_disc_cup
from model.analysis.features import Definitions
from model.analysis.fov import Framing, frame, pixel_spacing
from model.analysis.measure import AUTOMORPH_SIZE, FeatureSet, Geometry
from model.analysis.quality import assess, field_coverage
from model.analysis.segments import measure_widths, skeleton_segments
from model.analysis.vessels import WEIGHTS, make_segmenter
from model.analysis.zones import ZONE_LIMITS_DD, zone_radii
from model.schema import (
    ImageAnalysis,
    Landmark,
    LandmarkType,
    Laterality,
    ModelIdentity,
    Source,
    VesselType,
)

PIPELINE_NAME = "retinalgpt-measurement-pipeline"
PIPELINE_VERSION = "1.0.0"
MIN_SEGMENT_LENGTH_912 = 15.0
"""Shortest skeleton segment measured, in px of a 912-px FOV image (AutoMorph's rule, used in both modes)."""


@dataclass(frozen=True)
class AnalysisOptions:
    """Parameters of the pipeline (built by :mod:`worker` from ``[analysis]`` settings)."""

    vessel_method: str = "network"
    definitions: str = "standard"
    field_angle_degrees: float = 45.0
    working_size: int = 768


def _weights_sha256() -> str | None:
    return hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() if WEIGHTS.is_file() else None


def pipeline_identity(vessel_method: str = "network") -> ModelIdentity:
    """Identity of the pipeline for TID 4019 / ContributingEquipmentSequence; the device UID is derived from the
    name, version and vessel-network weights hash, so it changes with any of them."""
    sha = _weights_sha256() if vessel_method == "network" else None
    version = PIPELINE_VERSION if vessel_method == "network" else f"{PIPELINE_VERSION}-classical"
    uid = generate_uid(entropy_srcs=[PIPELINE_NAME, version, sha or "no-weights"])
    return ModelIdentity(name=PIPELINE_NAME, version=version, device_uid=uid, checkpoint_sha256=sha)


PIPELINE_IDENTITY = pipeline_identity()


def _normalised(x: float, y: float, w: int, h: int) -> tuple[float, float]:
    return float(np.clip((x + 0.5) / w, 0, 1)), float(np.clip((y + 0.5) / h, 0, 1))


@dataclass
class MeasurementResult:
    """Result of :meth:`MeasurementPipeline.analyze`; masks are boolean at the input size."""

    image: ImageAnalysis
    vessels: np.ndarray
    arteries: np.ndarray
    veins: np.ndarray
    disc: np.ndarray
    cup: np.ndarray
    source_rgb: np.ndarray = field(repr=False)
    geometry: overlay.OverlayGeometry = field(repr=False)

    def overlay(self) -> np.ndarray:
        """Clinician-facing RGB uint8 overlay at the input size."""
        return self._overlay

    @cached_property
    def _overlay(self) -> np.ndarray:
        return overlay.render(self.source_rgb, self.vessels, self.arteries, self.veins, self.geometry)


class MeasurementPipeline:
    """Deterministic measurement pipeline; construct once per process (loads the vessel network), then call
    :meth:`analyze` from any thread."""

    def __init__(self, options: AnalysisOptions | None = None) -> None:
        self.options = options or AnalysisOptions()
        self.definitions = Definitions(self.options.definitions)
        self.segmenter = make_segmenter(self.options.vessel_method)
        self.identity = pipeline_identity(self.options.vessel_method)

    def analyze(
        self,
        rgb: np.ndarray,
        *,
        pixel_spacing_um: float | None = None,
        sop_instance_uid: str | None = None,
        file_path: str | None = None,
        laterality: Laterality = Laterality.UNKNOWN,
    ) -> MeasurementResult:
        """Measure one colour fundus photograph (H, W, 3) uint8 (grey (H, W) is accepted and replicated)."""
        rgb = np.asarray(rgb)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        if rgb.ndim != 3 or rgb.shape[2] < 3 or min(rgb.shape[:2]) < 32:
            raise ValueError(f"expected an (H, W, 3) image of at least 32 px, got shape {rgb.shape}")
        rgb = np.ascontiguousarray(rgb[..., :3])
        if rgb.dtype != np.uint8:
            top = 255.0 if rgb.max() > 1.0 else 1.0
            rgb = np.clip(rgb.astype(np.float64) * (255.0 / top), 0, 255).astype(np.uint8)
        h, w = rgb.shape[:2]
        size = self.options.working_size
        work = frame(rgb, size)
        fr = work.framing
        diameter = work.fov_diameter_px
        prob, vessels = self.segmenter.segment(work.rgb, work.fov, diameter)
        vessels &= work.fov

        coverage = field_coverage(work.source_fov)
        quality = assess(
            work.rgb, work.fov, float(vessels[work.fov].mean()) if work.fov.any() else 0.0, coverage
        )

        location = locate_disc(work.rgb, work.fov, vessels, diameter)
        expected_radius = DISC_FOV_RATIO * diameter / 2.0
        disc_cup = segment_disc_cup(work.rgb, location.x, location.y, expected_radius)
        disc_radius = float(np.sqrt(disc_cup.disc.a * disc_cup.disc.b))
        disc_xy = (disc_cup.disc.cx, disc_cup.disc.cy)
        fovea_x, fovea_y, fovea_score = locate_fovea(work.rgb, work.fov, vessels, *disc_xy, 2 * disc_radius)

        min_run = MIN_SEGMENT_LENGTH_912 * size / AUTOMORPH_SIZE
        segments, segment_labels = skeleton_segments(vessels, min_run)
        measure_widths(vessels, segments)
        av_confidence = av.classify(work.rgb, work.fov, vessels, segments, disc_xy, disc_radius)
        arteries, veins = av.label_pixels(vessels, segment_labels, segments)

        spacing, scale_source = pixel_spacing(
            diameter * fr.factor, self.options.field_angle_degrees, pixel_spacing_um
        )
        geometry = Geometry(
            size=size,
            fov=work.fov,
            disc_xy=disc_xy,
            disc_radius=disc_radius,
            um_per_px=spacing * fr.factor,
            scale_source=scale_source,
            min_run=min_run,
        )
        features = FeatureSet(geometry, self.definitions)
        masks = {VesselType.ALL: vessels, VesselType.ARTERY: arteries, VesselType.VEIN: veins}
        features.vessel_features(masks, segments)
        features.calibre_features(masks, segments)
        features.disc_features(disc_cup)
        features.add("", av_confidence, "1", key="Artery_vein_confidence")

        landmarks = self._landmarks(
            fr,
            disc_cup.disc,
            disc_cup.cup,
            (fovea_x, fovea_y),
            w,
            h,
            location.score * disc_cup.confidence,
            fovea_score,
        )
        analysis = ImageAnalysis(
            sop_instance_uid=sop_instance_uid,
            file_path=file_path,
            laterality=laterality,
            width=w,
            height=h,
            pixel_spacing_um=spacing,
            scale_source=scale_source,
            quality=quality,
            landmarks=landmarks,
            measurements=features.items,
        )
        source_vessels = (fr.map_to_source(prob) >= self.segmenter.threshold) & (
            fr.map_to_source(vessels) > 0.5
        )
        source_arteries = source_vessels & (fr.map_to_source(arteries, order=0) > 0.5)
        source_veins = source_vessels & (fr.map_to_source(veins, order=0) > 0.5)
        disc_src = self._ellipse_to_source(fr, disc_cup.disc)
        cup_src = self._ellipse_to_source(fr, disc_cup.cup)
        centre = fr.to_source(*disc_xy)
        geometry_src = overlay.OverlayGeometry(
            disc_contour=disc_src.contour(96),
            cup_contour=cup_src.contour(96),
            disc_centre=(float(centre[0]), float(centre[1])),
            zone_radii={
                z.value: tuple(r * fr.factor for r in zone_radii(z, disc_radius)) for z in ZONE_LIMITS_DD
            },
            fovea=tuple(float(v) for v in fr.to_source(fovea_x, fovea_y)) if fovea_score > 0 else None,
        )
        return MeasurementResult(
            image=analysis,
            vessels=source_vessels,
            arteries=source_arteries,
            veins=source_veins,
            disc=disc_src.mask((h, w)),
            cup=cup_src.mask((h, w)),
            source_rgb=rgb,
            geometry=geometry_src,
        )

    @staticmethod
    def _ellipse_to_source(fr: Framing, e: Ellipse) -> Ellipse:
        cx, cy = fr.to_source(e.cx, e.cy)
        return Ellipse(float(cx), float(cy), e.a * fr.factor, e.b * fr.factor, e.theta)

    def _landmarks(
        self,
        fr: Framing,
        disc: Ellipse,
        cup: Ellipse,
        fovea: tuple[float, float],
        w: int,
        h: int,
        disc_score: float,
        fovea_score: float,
    ) -> list[Landmark]:
        out = []
        for kind, ellipse in ((LandmarkType.OPTIC_DISC, disc), (LandmarkType.OPTIC_CUP, cup)):
            src = self._ellipse_to_source(fr, ellipse)
            contour = [_normalised(x, y, w, h) for x, y in src.contour(48)]
            xs, ys = [c[0] for c in contour], [c[1] for c in contour]
            out.append(
                Landmark(
                    type=kind,
                    center=_normalised(src.cx, src.cy, w, h),
                    box=(min(xs), min(ys), max(xs), max(ys)),
                    contour=contour,
                    score=float(np.clip(disc_score, 0, 1)),
                    source=Source.MEASURED,
                )
            )
        fx, fy = fr.to_source(*fovea)
        out.append(
            Landmark(
                type=LandmarkType.FOVEA,
                center=_normalised(float(fx), float(fy), w, h),
                score=float(np.clip(fovea_score, 0, 1)),
                source=Source.MEASURED,
            )
        )
        return out
