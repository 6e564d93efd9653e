"""Validation against labelled public data in ../shared/data/fundus (skipped without it): DRIVE vessel metrics,
ODOC cup-to-disc ratio error, CODRAS optic-disc localisation, HEI-MED quality and disc centres.

The DRIVE targets are the issue's (Dice ≥ 0.81, AUC ≥ 0.975 on the 20 test images, 1st observer, inside the FOV)
and are asserted as such: if the committed network misses them, this test fails."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.analysis.disc import DISC_FOV_RATIO, cdr_from_masks, locate_disc, segment_disc_cup
from model.analysis.evaluation import drive_metrics, drive_samples, roc_auc
from model.analysis.fov import frame
from model.analysis.pipeline import MeasurementPipeline
from model.analysis.vessels import ClassicalVessels, NetworkVessels


def _rows(folder: Path, split: str | None = None) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open() as fh:
        return [r for r in csv.DictReader(fh) if split is None or r["split"] == split]


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_roc_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 300).astype(float)
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        pos.size * neg.size
    )
    assert roc_auc(scores, labels) == pytest.approx(pairwise)


def test_drive_network_meets_target(shared_fundus: Path) -> None:
    """The issue's target, computed for real and not loosened (committed weights, 2026-11-30: Dice 0.820,
    AUC 0.978 after 21 420 CPU training steps in four runs)."""
    metrics = drive_metrics(NetworkVessels(), drive_samples(shared_fundus / "DRIVE", "test"))
    print(f"DRIVE test (network): {metrics}")
    assert metrics.images == 20
    assert metrics.dice >= 0.81, f"Dice {metrics.dice:.4f} below the 0.81 target"
    assert metrics.auc >= 0.975, f"AUC {metrics.auc:.4f} below the 0.975 target"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_drive_classical_fallback(shared_fundus: Path) -> None:
    metrics = drive_metrics(ClassicalVessels(), drive_samples(shared_fundus / "DRIVE", "test"))
    print(f"DRIVE test (classical): {metrics}")
    assert metrics.auc >= 0.90 and metrics.dice >= 0.65


def test_odoc_cdr_error(shared_fundus: Path) -> None:
    """Disc/cup on the ODOC crops (disc-centred, disc ≈ 0.3–0.6 of the crop): vertical CDR error."""
    folder = shared_fundus / "ODOC_samples"
    errors, disc_dice = [], []
    for row in _rows(folder):
        rgb = _rgb(folder / row["file"]).astype(np.float32) / 255.0
        truth = np.asarray(Image.open(folder / row["mask"]))
        h, w = truth.shape
        result = segment_disc_cup(rgb, w / 2, h / 2, 0.25 * min(h, w))
        errors.append(abs(result.cdr_vertical - float(row["vertical_cdr"])))
        disc = result.disc.mask(truth.shape)
        disc_dice.append(2 * (disc & (truth > 0)).sum() / (disc.sum() + (truth > 0).sum()))
        assert cdr_from_masks(truth > 0, truth > 200)[0] == pytest.approx(
            float(row["vertical_cdr"]), abs=0.01
        )
    mae = float(np.mean(errors))
    print(f"ODOC vertical CDR MAE {mae:.3f} (n={len(errors)}), disc Dice {np.mean(disc_dice):.3f}")
    assert mae <= 0.15
    assert np.mean(disc_dice) >= 0.75


def _codras_disc_boxes(folder: Path, split: str) -> list[tuple[str, tuple[float, float, float, float]]]:
    out = []
    for row in _rows(folder, split):
        label = folder / row["yolo_labels"]
        if not label.is_file():
            continue
        boxes = [line.split() for line in label.read_text().splitlines() if line.strip()]
        disc = [tuple(map(float, b[1:5])) for b in boxes if b[0] == "0"]
        if disc:
            out.append((row["file"], disc[0]))
    return out


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_codras_disc_localisation(shared_fundus: Path) -> None:
    """Predicted disc centre inside the ground-truth optic-disc box (YOLO class 0) on the CODRAS test split."""
    folder = shared_fundus / "CODRAS"
    segmenter = NetworkVessels()
    hits, misses = 0, []
    cases = _codras_disc_boxes(folder, "test")
    for name, (cx, cy, bw, bh) in cases:
        rgb = _rgb(folder / name)
        work = frame(rgb, 384)
        _, vessels = segmenter.segment(work.rgb, work.fov, work.fov_diameter_px)
        location = locate_disc(work.rgb, work.fov, vessels, work.fov_diameter_px)
        sx, sy = work.framing.to_source(location.x, location.y)
        h, w = rgb.shape[:2]
        if abs(float(sx) / w - cx) <= bw / 2 and abs(float(sy) / h - cy) <= bh / 2:
            hits += 1
        else:
            misses.append(name)
    rate = hits / len(cases)
    print(f"CODRAS test disc localisation {hits}/{len(cases)} = {rate:.3f}; misses {misses}")
    assert rate >= 0.98


HEIMED_QUALITY_RHO = 0.087
"""Spearman correlation of our quality score with HEI-MED's ELVD quality values, measured 2026-12-03."""
RHO_MARGIN = 0.03


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_heimed_quality_and_disc(shared_fundus: Path) -> None:
    """HEI-MED (evaluation only): quality scores against the dataset's ELVD quality values, disc centres against
    its optic-disc annotations."""
    folder = shared_fundus / "HEI-MED"
    pipeline = MeasurementPipeline()
    ours, theirs, disc_hits = [], [], 0
    rows = _rows(folder, "test")
    for row in rows:
        rgb = _rgb(folder / row["file"])
        result = pipeline.analyze(rgb, file_path=row["file"])
        ours.append(result.image.quality.score)
        theirs.append(float(row["quality_elvd"]))
        centre = result.image.landmarks[0].center
        h, w = rgb.shape[:2]
        dd = DISC_FOV_RATIO * w
        disc_hits += (
            np.hypot(centre[0] * w - float(row["od_col"]), centre[1] * h - float(row["od_row"])) < dd / 2
        )
    rho = float(np.corrcoef(np.argsort(np.argsort(ours)), np.argsort(np.argsort(theirs)))[0, 1])
    print(
        f"HEI-MED test: Spearman(quality score, ELVD) = {rho:.3f}; disc within ½ DD {disc_hits}/{len(rows)}"
    )
    # measured 2026-11-23 (classical vessels): Spearman 0.09, and 0.087 on 2026-12-03 (56 test images) — the
    # score saturates on HEI-MED's mostly good images (median ELVD 0.94); its brightness (0.46) and
    # vessel-fraction (0.38) metrics rank better. The pipeline is deterministic: hold it to that level less a
    # margin for platform arithmetic, so a regression toward no correlation fails (issue 19).
    bar = HEIMED_QUALITY_RHO - RHO_MARGIN
    assert rho >= bar, f"Spearman {rho:.3f} below {bar:.3f}"
    assert disc_hits / len(rows) >= 0.95
