"""Stage `evaluate`: scikit-learn metrics and the confusion CSV for DVC."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import evaluate


def test_score_matches_hand_computed_figures() -> None:
    labels = np.array([0, 1, 2, 2])
    probabilities = np.full((4, 10), 0.01)
    probabilities[[0, 1, 2, 3], [0, 1, 2, 1]] = 0.91  # the last one is wrong: 2 predicted as 1
    result = evaluate.score(labels, probabilities)
    assert result["accuracy"] == 0.75
    assert result["log_loss"] == pytest.approx(-(3 * np.log(0.91) + np.log(0.01)) / 4)
    # per class (0, 1, 2): precision 1, 0.5, 1; recall 1, 1, 0.5 -> F1 1, 2/3, 2/3; absent classes count 0
    assert result["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 10)
    assert result["weighted_f1"] == pytest.approx((1 + 2 / 3 + 2 * 2 / 3) / 4)
    assert result["confusion_matrix"][2, 1] == 1
    assert result["confusion_matrix"].trace() == 3
    assert result["report"]["2"]["recall"] == 0.5


def test_confusion_csv_has_one_row_per_image() -> None:
    text = evaluate.confusion_csv(np.array([3, 1]), np.array([3, 7]))
    assert text == "actual,predicted\n3,3\n1,7\n"
