"""Evaluation metrics, written from their definitions (no scikit-learn dependency).

- accuracy: fraction of exact matches;
- quadratic weighted kappa: Cohen (1968) weighted kappa with weights ``(i - j)² / (K - 1)²``;
- ROC AUC: the Mann–Whitney statistic P(score⁺ > score⁻) + ½ P(tie) (Hanley & McNeil 1982);
- ROC curve points: thresholds at every distinct score;
- box average precision at IoU 0.5: PASCAL VOC 2010+ all-point interpolated AP, greedy matching by score;
- mean absolute error; parse-failure rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Box = tuple[float, float, float, float]


def accuracy(truth: Sequence[int], predicted: Sequence[int]) -> float:
    t, p = np.asarray(truth), np.asarray(predicted)
    if t.size == 0:
        return float("nan")
    return float((t == p).mean())


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int], classes: int) -> np.ndarray:
    """``classes``×``classes`` counts, rows = truth, columns = prediction."""
    matrix = np.zeros((classes, classes), dtype=int)
    for t, p in zip(truth, predicted, strict=True):
        matrix[int(t), int(p)] += 1
    return matrix


def quadratic_weighted_kappa(truth: Sequence[int], predicted: Sequence[int], classes: int) -> float:
    """κ_w = 1 − Σ w·O / Σ w·E, O observed and E expected (outer product of marginals) matrices."""
    observed = confusion_matrix(truth, predicted, classes).astype(float)
    n = observed.sum()
    if n == 0:
        return float("nan")
    i, j = np.indices((classes, classes))
    weights = (i - j) ** 2 / max(classes - 1, 1) ** 2
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / n
    denominator = (weights * expected).sum()
    if denominator == 0:
        return 1.0 if (weights * observed).sum() == 0 else float("nan")
    return float(1.0 - (weights * observed).sum() / denominator)


def roc_auc(truth: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    t = np.asarray(truth).astype(bool)
    s = np.asarray(scores, dtype=float)
    pos, neg = s[t], s[~t]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def roc_curve(truth: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    t = np.asarray(truth).astype(bool)
    s = np.asarray(scores, dtype=float)
    thresholds = np.unique(s)[::-1]
    fpr = [0.0] + [float(((s >= th) & ~t).sum() / max((~t).sum(), 1)) for th in thresholds]
    tpr = [0.0] + [float(((s >= th) & t).sum() / max(t.sum(), 1)) for th in thresholds]
    return np.asarray(fpr), np.asarray(tpr)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def average_precision(predictions: Sequence[tuple[str, Box, float]], truths: Sequence[tuple[str, Box]],
                      iou_threshold: float = 0.5) -> float:
    """AP over a set of images: ``predictions`` are (image id, box, score), ``truths`` (image id, box).

    Predictions are sorted by score and matched greedily to the unmatched truth box of the same image with the
    highest IoU ≥ ``iou_threshold``; precision is made monotone and integrated over every recall step."""
    if not truths:
        return float("nan")
    by_image: dict[str, list[Box]] = {}
    for image, box in truths:
        by_image.setdefault(image, []).append(box)
    used = {image: [False] * len(boxes) for image, boxes in by_image.items()}
    hits = []
    for image, box, _ in sorted(predictions, key=lambda p: -p[2]):
        candidates = by_image.get(image, [])
        best, best_iou = -1, iou_threshold
        for k, truth in enumerate(candidates):
            overlap = iou(box, truth)
            if not used[image][k] and overlap >= best_iou:
                best, best_iou = k, overlap
        if best >= 0:
            used[image][best] = True
        hits.append(best >= 0)
    tp = np.cumsum(hits)
    fp = np.cumsum([not h for h in hits])
    recall = np.concatenate([[0.0], tp / len(truths)])
    precision = np.concatenate([[1.0], tp / np.maximum(tp + fp, 1)])
    for k in range(len(precision) - 2, -1, -1):
        precision[k] = max(precision[k], precision[k + 1])
    return float(np.sum((recall[1:] - recall[:-1]) * precision[1:]))


def mean_absolute_error(truth: Sequence[float], predicted: Sequence[float]) -> float:
    t, p = np.asarray(truth, dtype=float), np.asarray(predicted, dtype=float)
    return float(np.abs(t - p).mean()) if t.size else float("nan")


def centre_distance(box: Box, point: tuple[float, float]) -> float:
    """Euclidean distance (normalised units) from a box centre to a point (optic-disc localisation error)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return float(np.hypot(cx - point[0], cy - point[1]))


def failure_rate(parsed: Sequence[bool]) -> float:
    """Fraction of answers that did not parse."""
    return float(1.0 - np.mean(parsed)) if len(parsed) else 0.0


def bootstrap_auc_ci(truth: Sequence[int], scores: Sequence[float], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the ROC AUC (Efron & Tibshirani 1993): images resampled with
    replacement, resamples holding one class only skipped. AUC per resample from ranks (Mann–Whitney, ties
    averaged)."""
    from scipy.stats import rankdata

    t = np.asarray(truth).astype(bool)
    s = np.asarray(scores, dtype=float)
    if t.all() or not t.any():
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, t.size, size=(resamples, t.size))
    labels = t[index]
    ranks = rankdata(s[index], axis=1)
    positives = labels.sum(axis=1)
    negatives = t.size - positives
    valid = (positives > 0) & (negatives > 0)
    rank_sum = (ranks * labels).sum(axis=1)
    auc = (rank_sum[valid] - positives[valid] * (positives[valid] + 1) / 2) / (positives[valid] * negatives[valid])
    alpha = (1 - level) / 2
    return float(np.quantile(auc, alpha)), float(np.quantile(auc, 1 - alpha))


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927), NaN for no trials."""
    if total == 0:
        return float("nan"), float("nan")
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return float(centre - half), float(centre + half)


def operating_point(truth: Sequence[int], scores: Sequence[float], threshold: float) -> dict[str, float]:
    """Sensitivity and specificity (with Wilson 95 % intervals) of ``score ≥ threshold``."""
    t = np.asarray(truth).astype(bool)
    predicted = np.asarray(scores, dtype=float) >= threshold
    tp, fn = int((predicted & t).sum()), int((~predicted & t).sum())
    tn, fp = int((~predicted & ~t).sum()), int((predicted & ~t).sum())
    sens_ci, spec_ci = wilson_interval(tp, tp + fn), wilson_interval(tn, tn + fp)
    return {"threshold": float(threshold), "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
            "sensitivity_ci": list(sens_ci), "specificity": tn / (tn + fp) if tn + fp else float("nan"),
            "specificity_ci": list(spec_ci), "tp": tp, "fn": fn, "tn": tn, "fp": fp}
