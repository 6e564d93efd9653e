"""The measurement pipeline on real photographs: contract of the result, invariances (µm under rescaling,
flips), definition modes, quality grading of degraded images, the ``measure`` command and the torch-free
classical path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from model.analysis import PIPELINE_IDENTITY, AnalysisOptions, MeasurementPipeline, MeasurementResult
from model.schema import LandmarkType, QualityGrade, Source, VesselType, Zone, automorph_key
from tests.model.analysis.analysis_fixtures import rescaled

FEATURES = [
    "Fractal_dimension",
    "Vessel_density",
    "Average_width",
    "Distance_tortuosity",
    "Squared_curvature_tortuosity",
    "Tortuosity_density",
]


@pytest.fixture(scope="module")
def retina_result(network_pipeline: MeasurementPipeline, retina_small: np.ndarray) -> MeasurementResult:
    return network_pipeline.analyze(retina_small, file_path="retina.png", pixel_spacing_um=12.0)


def value(result: MeasurementResult, key: str) -> float:
    m = result.image.measurement(key)
    assert m is not None, f"{key} missing"
    return m.value


def test_result_contract(retina_result: MeasurementResult, retina_small: np.ndarray) -> None:
    image = retina_result.image
    h, w = retina_small.shape[:2]
    assert (image.width, image.height) == (w, h)
    assert image.pixel_spacing_um == 12.0 and image.scale_source.value == "dicom_pixel_spacing"
    assert image.quality is not None and image.quality.grade == QualityGrade.GRADABLE
    for mask in (
        retina_result.vessels,
        retina_result.arteries,
        retina_result.veins,
        retina_result.disc,
        retina_result.cup,
    ):
        assert mask.shape == (h, w) and mask.dtype == bool
    assert not (retina_result.arteries & retina_result.veins).any()
    assert (retina_result.cup <= retina_result.disc).all()
    assert 0.05 < retina_result.vessels.mean() < 0.2
    assert retina_result.overlay().shape == (h, w, 3)
    kinds = {lm.type for lm in image.landmarks}
    assert kinds == {LandmarkType.OPTIC_DISC, LandmarkType.OPTIC_CUP, LandmarkType.FOVEA}
    disc = image.landmark(LandmarkType.OPTIC_DISC)
    assert disc.box is not None and disc.contour and all(0 <= c <= 1 for p in disc.contour for c in p)
    keys = {m.key for m in image.measurements}
    for vessel in VesselType:
        for zone in Zone:
            for feature in FEATURES:
                assert automorph_key(feature, vessel, zone) in keys
    for zone in ("b", "c"):
        for key in (
            "CRAE_Knudtson",
            "CRVE_Knudtson",
            "AVR_Knudtson",
            "CRAE_Hubbard",
            "CRVE_Hubbard",
            "AVR_Hubbard",
        ):
            assert f"{key}_zone_{zone}" in keys
    for key in ("Disc_height", "Disc_width", "Cup_height", "Cup_width", "CDR_vertical", "CDR_horizontal"):
        assert key in keys
    assert all(
        m.source == Source.MEASURED and m.method == "standard" and np.isfinite(m.value)
        for m in image.measurements
    )
    units = {m.key: m.unit for m in image.measurements}
    assert units["Average_width"] == "um" and units["CRAE_Hubbard_zone_b"] == "um"
    assert units["Fractal_dimension"] == "1" and units["Squared_curvature_tortuosity"] == "mm-2"
    # physiological plausibility on a normal fundus (Knudtson 2003: CRAE ≈ 150 µm, CRVE ≈ 220 µm, AVR < 1)
    assert 1.3 < value(retina_result, "Fractal_dimension") < 1.8
    assert 0.3 < value(retina_result, "CDR_vertical") < 0.9
    assert 60 < value(retina_result, "CRAE_Knudtson_zone_b") < 300
    json.loads(image.model_dump_json())


def test_identity_is_deterministic() -> None:
    from model.analysis import pipeline_identity

    assert pipeline_identity() == PIPELINE_IDENTITY
    assert PIPELINE_IDENTITY.checkpoint_sha256 and len(PIPELINE_IDENTITY.checkpoint_sha256) == 64
    assert pipeline_identity("classical").device_uid != PIPELINE_IDENTITY.device_uid


def test_um_results_unchanged_by_rescaling(
    network_pipeline: MeasurementPipeline, retina_rgb: np.ndarray, retina_result: MeasurementResult
) -> None:
    half = rescaled(retina_rgb, 360)
    other = network_pipeline.analyze(half, file_path="half.png", pixel_spacing_um=24.0)
    for key in ("Disc_height", "Disc_width", "Average_width"):
        assert value(other, key) == pytest.approx(value(retina_result, key), rel=0.12), key
    for key in ("Vessel_density", "Fractal_dimension", "CDR_vertical"):
        assert value(other, key) == pytest.approx(value(retina_result, key), abs=0.05), key


def test_stable_under_flips(
    network_pipeline: MeasurementPipeline, retina_small: np.ndarray, retina_result: MeasurementResult
) -> None:
    flipped = network_pipeline.analyze(retina_small[:, ::-1], file_path="flipped.png", pixel_spacing_um=12.0)
    for key in ("Fractal_dimension", "Vessel_density", "Distance_tortuosity", "CDR_vertical"):
        assert value(flipped, key) == pytest.approx(value(retina_result, key), rel=0.05), key
    for key in ("Average_width", "Disc_height"):
        assert value(flipped, key) == pytest.approx(value(retina_result, key), rel=0.08), key
    cx, cy = retina_result.image.landmark(LandmarkType.OPTIC_DISC).center
    fx, fy = flipped.image.landmark(LandmarkType.OPTIC_DISC).center
    assert fx == pytest.approx(1 - cx, abs=0.02) and fy == pytest.approx(cy, abs=0.02)
    assert (flipped.vessels[:, ::-1] == retina_result.vessels).mean() > 0.97


def test_automorph_mode_units(retina_small: np.ndarray) -> None:
    pipeline = MeasurementPipeline(AnalysisOptions(vessel_method="classical", definitions="automorph"))
    result = pipeline.analyze(retina_small, file_path="retina.png")
    units = {m.key: m.unit for m in result.image.measurements}
    assert units["Average_width"] == "px" and units["CRAE_Knudtson_zone_b"] == "px"
    assert units["CRAE_Hubbard_zone_b"] == "um"  # Hubbard's constants assume µm
    assert units["Squared_curvature_tortuosity"] == "1"
    assert {m.method for m in result.image.measurements} == {"automorph"}
    assert result.image.scale_source.value == "field_of_view_estimate"
    # AutoMorph divides by the whole square image, so its density is below the FOV-based one
    whole = value(result, "Vessel_density")
    assert 0.02 < whole < 0.2


def _grade(pipeline: MeasurementPipeline, rgb: np.ndarray):
    return pipeline.analyze(rgb, file_path="q.png").image.quality


def test_quality_separates_clean_from_degraded(
    classical_pipeline: MeasurementPipeline, retina_small: np.ndarray
) -> None:
    clean = _grade(classical_pipeline, retina_small)
    assert clean.grade == QualityGrade.GRADABLE
    blurred = ndi.gaussian_filter(retina_small.astype(np.float32), (4, 4, 0)).astype(np.uint8)
    dark = (retina_small.astype(np.float32) * 0.12).astype(np.uint8)
    h, w = retina_small.shape[:2]
    cropped = retina_small[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    for degraded, reason in (
        (blurred, "out of focus"),
        (dark, "poor illumination"),
        (cropped, "field of view incomplete or cropped"),
    ):
        quality = _grade(classical_pipeline, degraded)
        assert quality.grade != QualityGrade.GRADABLE, reason
        assert quality.score < clean.score - 0.2, reason
        assert reason in quality.reasons


def test_classical_path_never_imports_torch(tmp_path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from skimage import data\n"
        "from model.analysis import AnalysisOptions, MeasurementPipeline\n"
        "rgb = data.retina()[::4, ::4]\n"
        "r = MeasurementPipeline(AnalysisOptions(vessel_method='classical')).analyze(rgb, file_path='x')\n"
        "assert r.image.measurements\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.getcwd(), timeout=300)


def test_measure_command_writes_outputs(tmp_path, retina_small: np.ndarray) -> None:
    from typer.testing import CliRunner

    from worker.cli.app import app

    src = tmp_path / "eye one.png"
    Image.fromarray(retina_small).save(src)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["measure", str(src), "--out", str(out), "--json"],
        env={"RETINALGPT_ANALYSIS__VESSEL_METHOD": "classical"},
    )
    assert result.exit_code == 0, result.output
    analysis = json.loads((out / "eye one.json").read_text())
    assert analysis["file_path"] == str(src) and analysis["measurements"]
    vessels = np.asarray(Image.open(out / "eye one_vessels.png"))
    assert vessels.shape == retina_small.shape[:2] and set(np.unique(vessels)) <= {0, 255}
    overlay = np.asarray(Image.open(out / "eye one_overlay.png"))
    assert overlay.shape == retina_small.shape
    missing = runner.invoke(app, ["measure", str(tmp_path / "nope.png"), "--out", str(out)])
    assert missing.exit_code == 1 and "no such image file" in missing.output
