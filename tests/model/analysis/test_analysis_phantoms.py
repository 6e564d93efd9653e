"""Analytic phantoms for the feature definitions (issue 3): fractal dimension, tortuosity, calibres, CRAE/CRVE
recursion, zones and CDR, each against a closed-form value."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from skimage.draw import line

from model.analysis.disc import DiscCup, Ellipse, cdr_from_masks
from model.analysis.features import (
    Definitions,
    box_counting_dimension,
    central_equivalent,
    distance_tortuosity,
    hubbard_pair,
    knudtson_pair,
    squared_curvature_tortuosity,
    tortuosity_density,
    vessel_density,
)
from model.analysis.segments import measure_widths, skeleton_segments
from model.analysis.zones import zone_mask, zone_radii
from model.schema import Zone


def sierpinski_carpet(level: int) -> np.ndarray:
    carpet = np.ones((1, 1), dtype=bool)
    for _ in range(level):
        hole = np.zeros_like(carpet)
        carpet = np.block([[carpet, carpet, carpet], [carpet, hole, carpet], [carpet, carpet, carpet]])
    return carpet


def koch_curve(level: int, size: int) -> np.ndarray:
    points = np.array([[0.0, 0.0], [1.0, 0.0]])
    rot = np.array([[0.5, -math.sqrt(3) / 2], [math.sqrt(3) / 2, 0.5]])
    for _ in range(level):
        new = [points[0]]
        for a, b in itertools.pairwise(points):
            d = (b - a) / 3
            p1, p3 = a + d, a + 2 * d
            p2 = p1 + rot @ d
            new.extend([p1, p2, p3, b])
        points = np.array(new)
    canvas = np.zeros((size // 3 + 4, size + 4), dtype=bool)
    scaled = points * (size - 1)
    for a, b in itertools.pairwise(scaled):
        rr, cc = line(round(a[1]) + 2, round(a[0]) + 2, round(b[1]) + 2, round(b[0]) + 2)
        canvas[rr, cc] = True
    return canvas


class TestFractalDimension:
    @pytest.mark.parametrize(
        ("end", "tolerance"), [((10, 500), 0.01), ((500, 500), 0.07), ((400, 500), 0.07)]
    )
    def test_line_is_one(self, end: tuple[int, int], tolerance: float) -> None:
        # oblique digital lines undercount the smallest boxes (Bresenham staircase), hence the wider tolerance
        mask = np.zeros((512, 512), dtype=bool)
        rr, cc = line(10, 5, *end)
        mask[rr, cc] = True
        assert box_counting_dimension(mask) == pytest.approx(1.0, abs=tolerance)

    def test_filled_square_is_two_classic(self) -> None:
        assert box_counting_dimension(np.ones((512, 512), dtype=bool)) == pytest.approx(2.0, abs=0.01)

    def test_filled_square_automorph_counts_only_partial_boxes(self) -> None:
        mask = np.zeros((520, 520), dtype=bool)
        mask[3:503, 7:507] = True  # boxes along the edges are partly filled; the inside ones are full
        assert box_counting_dimension(mask, Definitions.AUTOMORPH) == pytest.approx(1.0, abs=0.1)

    def test_sierpinski_carpet(self) -> None:
        expected = math.log(8) / math.log(3)  # 1.893
        assert box_counting_dimension(sierpinski_carpet(6)) == pytest.approx(expected, abs=0.05)

    def test_koch_curve(self) -> None:
        expected = math.log(4) / math.log(3)  # 1.262
        assert box_counting_dimension(koch_curve(6, 2048)) == pytest.approx(expected, abs=0.06)

    def test_empty_is_zero(self) -> None:
        assert box_counting_dimension(np.zeros((64, 64), bool)) == 0.0


def _rasterised_centreline(mask: np.ndarray) -> np.ndarray:
    segments, _ = skeleton_segments(mask, 5)
    assert len(segments) == 1
    return segments[0].points


class TestTortuosity:
    @pytest.mark.parametrize("angle", [0, 13, 30, 45, 72, 90])
    def test_straight_lines_are_one(self, angle: float) -> None:
        mask = np.zeros((300, 300), dtype=bool)
        t = math.radians(angle)
        rr, cc = line(
            150 - int(120 * math.sin(t)),
            150 - int(120 * math.cos(t)),
            150 + int(120 * math.sin(t)),
            150 + int(120 * math.cos(t)),
        )
        mask[rr, cc] = True
        points = _rasterised_centreline(mask)
        assert distance_tortuosity(points) == pytest.approx(1.0, abs=0.01)
        assert tortuosity_density(points, Definitions.STANDARD) == pytest.approx(0.0, abs=1e-3)
        assert tortuosity_density(points, Definitions.AUTOMORPH) == pytest.approx(0.0, abs=0.01)

    @pytest.mark.parametrize("theta_deg", [60, 120, 180, 270])
    def test_circular_arcs(self, theta_deg: float) -> None:
        theta = math.radians(theta_deg)
        radius = 120.0
        t = np.linspace(0, theta, 4000)
        mask = np.zeros((300, 300), dtype=bool)
        mask[
            np.round(150 + radius * np.sin(t)).astype(int), np.round(150 + radius * np.cos(t)).astype(int)
        ] = True
        from skimage.morphology import skeletonize

        points = _rasterised_centreline(skeletonize(mask))
        expected = theta / (2 * math.sin(theta / 2))
        assert distance_tortuosity(points) == pytest.approx(expected, rel=0.02)
        # ∫κ² ds / L of a circle is 1/R²
        assert squared_curvature_tortuosity(points, Definitions.STANDARD) == pytest.approx(
            1 / radius**2, rel=0.15
        )
        # one constant-sign piece: Grisan's (n−1)/n factor is 0
        assert tortuosity_density(points, Definitions.STANDARD) == pytest.approx(0.0, abs=1e-6)

    def test_s_curve_tortuosity_density_by_hand(self) -> None:
        radius = 50.0
        t = np.linspace(0, np.pi, 400)
        first = np.stack([radius - radius * np.cos(t), radius * np.sin(t)], axis=1)
        second = np.stack([3 * radius - radius * np.cos(t), -radius * np.sin(t)], axis=1)
        points = np.concatenate([first, second[1:]])
        excess = (np.pi * radius) / (2 * radius) - 1  # each half circle: arc/chord − 1
        length = 2 * np.pi * radius
        # 5 %: the curvature smoothing trims 2σ off each end, shortening L and the end pieces
        assert tortuosity_density(points, Definitions.STANDARD) == pytest.approx(
            0.5 * 2 * excess / length, rel=0.05
        )
        assert tortuosity_density(points, Definitions.AUTOMORPH) == pytest.approx(0.5 + excess, rel=0.05)
        # AutoMorph's squared curvature: |Σ κ| over point index — opposite halves cancel
        assert squared_curvature_tortuosity(points, Definitions.AUTOMORPH) < 0.05 * np.abs(
            squared_curvature_tortuosity(first, Definitions.AUTOMORPH)
        )


def _tube(width: float, angle_deg: float, size: int = 160) -> np.ndarray:
    """Anti-aliased straight tube (coverage of each pixel by the tube), thresholded at half coverage."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    t = math.radians(angle_deg)
    distance = np.abs(-(xx - size / 2) * math.sin(t) + (yy - size / 2 - 0.3) * math.cos(t))
    coverage = np.clip(width / 2 - distance + 0.5, 0, 1)
    return coverage > 0.5


@pytest.mark.parametrize("width", [2.5, 3.0, 4.0, 5.5, 7.0, 9.0, 12.0])
@pytest.mark.parametrize("angle", [0, 17, 30, 45, 60, 90])
def test_tube_widths_within_one_pixel(width: float, angle: float) -> None:
    mask = _tube(width, angle)
    segments, _ = skeleton_segments(mask, 10)
    measure_widths(mask, segments)
    longest = max(segments, key=lambda s: len(s.points))
    assert abs(longest.width - width) <= 1.0


class TestCentralEquivalents:
    def test_knudtson_recursion_by_hand(self) -> None:
        # round 1: (10, 3), (8, 4), (6, 5); round 2: the 3 results sorted, (largest, smallest) + median carried
        r1 = sorted(
            [0.88 * math.sqrt(100 + 9), 0.88 * math.sqrt(64 + 16), 0.88 * math.sqrt(36 + 25)], reverse=True
        )
        r2 = [0.88 * math.sqrt(r1[0] ** 2 + r1[2] ** 2), r1[1]]
        expected = 0.88 * math.sqrt(r2[0] ** 2 + r2[1] ** 2)
        assert expected == pytest.approx(11.2661, abs=1e-3)
        assert central_equivalent([3, 10, 4, 8, 6, 5], knudtson_pair, artery=True) == pytest.approx(expected)

    def test_knudtson_uses_six_widest_and_vein_constant(self) -> None:
        widths = [20, 18, 16, 14, 12, 10, 2, 1]
        r1 = sorted(
            [0.95 * math.hypot(20, 10), 0.95 * math.hypot(18, 12), 0.95 * math.hypot(16, 14)], reverse=True
        )
        r2 = [0.95 * math.hypot(r1[0], r1[2]), r1[1]]
        assert central_equivalent(widths, knudtson_pair, artery=False) == pytest.approx(
            0.95 * math.hypot(*r2)
        )

    def test_hubbard_formulas(self) -> None:
        a, b = 80.0, 100.0
        assert hubbard_pair(a, b, True) == pytest.approx(
            math.sqrt(0.87 * a * a + 1.01 * b * b - 0.22 * a * b - 10.76)
        )
        assert hubbard_pair(b, a, False) == pytest.approx(math.sqrt(0.72 * a * a + 0.91 * b * b + 450.05))

    def test_no_vessels_is_nan_and_one_vessel_is_itself(self) -> None:
        assert math.isnan(central_equivalent([], knudtson_pair, True))
        assert central_equivalent([7.5], knudtson_pair, True) == 7.5


class TestZonesAndDisc:
    @pytest.mark.parametrize("radius", [20.0, 35.0, 50.0])
    def test_zone_radii_scale_with_disc_size(self, radius: float) -> None:
        assert zone_radii(Zone.B, radius) == pytest.approx((2 * radius, 3 * radius))
        assert zone_radii(Zone.C, radius) == pytest.approx((2 * radius, 5 * radius))
        area_b = zone_mask((600, 600), (300, 300), radius, Zone.B).sum()
        assert area_b == pytest.approx(math.pi * ((3 * radius) ** 2 - (2 * radius) ** 2), rel=0.03)

    def test_zone_masks_double_with_disc(self) -> None:
        small = zone_mask((800, 800), (400, 400), 30, Zone.C).sum()
        large = zone_mask((800, 800), (400, 400), 60, Zone.C).sum()
        assert large / small == pytest.approx(4.0, rel=0.02)

    @pytest.mark.parametrize(("cup_a", "cup_b"), [(20, 30), (40, 50), (33, 21)])
    def test_ellipse_cdr_exact(self, cup_a: int, cup_b: int) -> None:
        disc = Ellipse(200, 200, 60.0, 70.0, 0.0)
        cup = Ellipse(200, 200, float(cup_a), float(cup_b), 0.0)
        result = DiscCup(disc=disc, cup=cup, confidence=1.0)
        assert result.cdr_vertical == pytest.approx(cup_b / 70.0)
        assert result.cdr_horizontal == pytest.approx(cup_a / 60.0)
        vertical, horizontal = cdr_from_masks(disc.mask((400, 400)), cup.mask((400, 400)))
        assert vertical == pytest.approx((2 * cup_b + 1) / (2 * 70 + 1))
        assert horizontal == pytest.approx((2 * cup_a + 1) / (2 * 60 + 1))

    def test_rotated_ellipse_extents(self) -> None:
        e = Ellipse(0, 0, 50.0, 20.0, math.pi / 2)
        assert e.height == pytest.approx(100.0)
        assert e.width == pytest.approx(40.0)


def test_vessel_density_definitions() -> None:
    vessels = np.zeros((100, 100), bool)
    vessels[10:20, :] = True
    region = np.zeros((100, 100), bool)
    region[:50, :] = True
    assert vessel_density(vessels, region, Definitions.STANDARD) == pytest.approx(0.2)
    assert vessel_density(vessels, region, Definitions.AUTOMORPH) == pytest.approx(0.1)
