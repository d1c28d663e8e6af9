"""Stage `evaluate`: scikit-learn metrics, the confusion CSV for DVC, and safe model loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import evaluate
from pipeline.config import ModelParams
from pipeline.errors import DataError
from pipeline.model import build_model

SMALL = ModelParams(hidden_units=[8], activation="elu", batch_norm_momentum=0.9, batch_norm_logits=False)


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
    text = evaluate._confusion_csv(np.array([3, 1]), np.array([3, 7]))
    assert text == "actual,predicted\n3,3\n1,7\n"


def test_probabilities_are_softmax_of_logits() -> None:
    model = build_model(SMALL)
    x = np.random.default_rng(0).random((6, 784), dtype=np.float32)
    probabilities = evaluate.predict_probabilities(model, x)
    logits = np.asarray(model(x, training=False), dtype=np.float64)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), logits.argmax(axis=1))


def test_missing_model_names_the_stage_to_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dvc repro train"):
        evaluate.load_model(tmp_path / "model.keras")


def test_corrupt_model_is_reported_not_raised(tmp_path: Path) -> None:
    broken = tmp_path / "model.keras"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="cannot be loaded"):
        evaluate.load_model(broken)


def test_saved_model_loads_in_safe_mode(tmp_path: Path) -> None:
    model = build_model(SMALL.model_copy(update={"batch_norm_logits": True}))
    model.save(tmp_path / "model.keras")
    loaded = evaluate.load_model(tmp_path / "model.keras")
    x = np.ones((2, 784), np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
