"""Evaluation metrics against values computed by hand on a made-up prediction set."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training import metrics


def test_accuracy_and_confusion() -> None:
    truth, predicted = [0, 1, 2, 2, 4], [0, 2, 2, 2, 3]
    assert metrics.accuracy(truth, predicted) == pytest.approx(0.6)
    matrix = metrics.confusion_matrix(truth, predicted, 5)
    assert matrix[2, 2] == 2 and matrix[1, 2] == 1 and matrix[4, 3] == 1 and matrix.sum() == 5


def test_quadratic_weighted_kappa_by_hand() -> None:
    # 3 classes, truth [0,0,1,2], predicted [0,1,1,2]. Observed O: (0,0)=1, (0,1)=1, (1,1)=1, (2,2)=1.
    # Weights w_ij = (i-j)^2/4. Σ w·O = 1/4. Marginals rows [2,1,1], cols [1,2,1]; E = outer/4:
    # Σ w·E = (1/4)[w01*2*2 + w02*2*1 + w10*1*1 + w12*1*1 + w20*1*1 + w21*1*2]
    #       = (1/4)[0.25*4 + 1*2 + 0.25*1 + 0.25*1 + 1*1 + 0.25*2] = (1/4)(5) = 1.25. κ = 1 - 0.25/1.25 = 0.8
    assert metrics.quadratic_weighted_kappa([0, 0, 1, 2], [0, 1, 1, 2], 3) == pytest.approx(0.8)
    assert metrics.quadratic_weighted_kappa([0, 1, 2], [0, 1, 2], 3) == pytest.approx(1.0)


def test_roc_auc_by_hand() -> None:
    # positives 0.9, 0.4; negatives 0.5, 0.1, 0.4. Pairs: (0.9>all)=3, (0.4>0.1)=1, (0.4=0.4)=0.5 → 4.5/6
    truth, scores = [1, 0, 0, 1, 0], [0.9, 0.5, 0.1, 0.4, 0.4]
    assert metrics.roc_auc(truth, scores) == pytest.approx(0.75)
    assert math.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))
    fpr, tpr = metrics.roc_curve(truth, scores)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_iou_and_average_precision_by_hand() -> None:
    assert metrics.iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    truths = [("a", (0.0, 0.0, 0.2, 0.2)), ("a", (0.5, 0.5, 0.7, 0.7)), ("b", (0.1, 0.1, 0.3, 0.3))]
    predictions = [
        ("a", (0.0, 0.0, 0.2, 0.2), 0.9),   # TP
        ("b", (0.6, 0.6, 0.8, 0.8), 0.8),   # FP
        ("a", (0.5, 0.5, 0.7, 0.68), 0.7),  # TP (IoU 0.9)
        ("a", (0.0, 0.0, 0.2, 0.2), 0.6),   # FP (duplicate of a matched truth)
    ]
    # precision/recall after each: (1, 1/3), (1/2, 1/3), (2/3, 2/3), (1/2, 2/3); interpolated AP
    # = 1/3 * 1 + 1/3 * 2/3 = 5/9
    assert metrics.average_precision(predictions, truths) == pytest.approx(5 / 9)
    assert metrics.average_precision([], truths) == 0.0


def test_mae_distance_and_failure_rate() -> None:
    assert metrics.mean_absolute_error([1.0, 2.0, 4.0], [1.5, 2.0, 3.0]) == pytest.approx(0.5)
    assert metrics.centre_distance((0.0, 0.0, 0.2, 0.2), (0.4, 0.1)) == pytest.approx(0.3)
    assert metrics.failure_rate([True, True, False, True]) == pytest.approx(0.25)
    assert metrics.failure_rate([]) == 0.0
