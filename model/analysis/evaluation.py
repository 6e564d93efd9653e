"""Validation of the pipeline's components against labelled public data (../shared/data/fundus).

DRIVE protocol (Staal et al. 2004, as used by the published vessel-segmentation literature): the 20 test images,
1st observer's manual segmentation as ground truth, pixels inside DRIVE's FOV masks only; Dice (= F1) at the
method's operating threshold and the area under the ROC curve of the probability map.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.analysis.fov import fov_diameter, fov_mask


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the Mann–Whitney rank statistic (ties get average ranks)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    average = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(average, ends - starts)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = pred.astype(bool), truth.astype(bool)
    total = pred.sum() + truth.sum()
    return float(2.0 * (pred & truth).sum() / total) if total else 1.0


@dataclass(frozen=True)
class DriveSample:
    name: str
    rgb: np.ndarray
    truth: np.ndarray
    fov: np.ndarray


def drive_samples(drive_dir: Path, split: str) -> list[DriveSample]:
    """DRIVE images of one split with 1st-observer vessel masks and DRIVE's FOV masks."""
    samples = []
    with (drive_dir / "manifest.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["split"] != split:
                continue
            samples.append(
                DriveSample(
                    name=Path(row["file"]).stem,
                    rgb=np.asarray(Image.open(drive_dir / row["file"]).convert("RGB")),
                    truth=np.asarray(Image.open(drive_dir / row["vessel_mask"])) > 0,
                    fov=np.asarray(Image.open(drive_dir / row["fov_mask"])) > 0,
                )
            )
    return samples


@dataclass(frozen=True)
class DriveMetrics:
    dice: float
    auc: float
    accuracy: float
    sensitivity: float
    specificity: float
    images: int


def drive_metrics(segmenter, samples: list[DriveSample]) -> DriveMetrics:
    """Pooled pixel metrics over ``samples`` inside DRIVE's FOV masks. The segmenter sees only the photograph
    (it finds its own FOV, as in production)."""
    scores, truths, preds = [], [], []
    for sample in samples:
        own_fov = fov_mask(sample.rgb)
        prob, mask = segmenter.segment(sample.rgb.astype(np.float32) / 255.0, own_fov, fov_diameter(own_fov))
        scores.append(prob[sample.fov])
        truths.append(sample.truth[sample.fov])
        preds.append(mask[sample.fov])
    score, truth, pred = np.concatenate(scores), np.concatenate(truths), np.concatenate(preds)
    tp = float((pred & truth).sum())
    tn = float((~pred & ~truth).sum())
    return DriveMetrics(
        dice=dice(pred, truth),
        auc=roc_auc(score, truth),
        accuracy=(tp + tn) / truth.size,
        sensitivity=tp / max(truth.sum(), 1),
        specificity=tn / max((~truth).sum(), 1),
        images=len(samples),
    )
