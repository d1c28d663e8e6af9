"""The training core: the reference's batching, learning on small data, bit-identical reruns, the knobs
beyond the tutorial, and divergence stopping the training."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, strategies as st
from workspace import REPO

from pipeline.config import ModelParams, TrainParams, load_params
from pipeline.errors import DivergedError
from pipeline.fit import EpochResult, batch_layout, epoch_metrics, fit, shift_images
from pipeline.io import Split

DEFAULTS = load_params(REPO / "params.yaml")
MODEL = DEFAULTS.model.model_copy(update={"hidden_units": [32, 16]})
TRAIN = DEFAULTS.train.model_copy(update={"learning_rate": 0.1, "epochs": 3, "batch_size": 50, "seed": 7})


@given(n=st.integers(1, 5_000), batch_size=st.integers(1, 5_000))
def test_batch_layout_matches_numpy_array_split(n: int, batch_size: int) -> None:
    if batch_size > n:
        with pytest.raises(ValueError, match="larger than"):
            batch_layout(n, batch_size)
        return
    expected = [len(part) for part in np.array_split(np.arange(n), n // batch_size)]
    layout = batch_layout(n, batch_size)
    assert [size for count, size in layout for _ in range(count)] == expected


def test_reference_layout_is_220_batches_of_250() -> None:
    assert batch_layout(55_000, 250) == [(220, 250)]


def blobs(n: int, seed: int) -> Split:
    """Ten well-separated Gaussian clusters in 784 dimensions: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).random((10, 784), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    x = np.clip(centers[y] + rng.normal(0, 0.3, (n, 784)).astype(np.float32), 0, 1)
    return Split(x.astype(np.float32), y)


def train_weights(
    params: TrainParams, train: Split, validation: Split, model: ModelParams = MODEL
) -> tuple[list[np.ndarray], list[EpochResult]]:
    """Train a fresh model with the core every caller uses; its weights (trainable and moving stats)."""
    fitted = fit(model, params, train, validation)
    return [np.array(w) for w in fitted.model.get_weights()], fitted.history


@pytest.fixture(scope="module")
def data() -> tuple[Split, Split]:
    return blobs(1_030, seed=1), blobs(200, seed=2)  # 1030 / 50 -> 20 batches of 51 or 52 rows


@pytest.fixture(scope="module")
def even() -> tuple[Split, Split]:
    """20 batches of 50 rows: an epoch of one batch shape compiles in about half the time of two."""
    return blobs(1_000, seed=1), blobs(200, seed=2)


@pytest.fixture(scope="module")
def baseline(data: tuple[Split, Split]) -> tuple[list[np.ndarray], list[EpochResult]]:
    """One training with TRAIN, shared by the tests that learn from it or compare against it."""
    return train_weights(TRAIN, *data)


def test_training_learns_small_data(baseline: tuple[list[np.ndarray], list[EpochResult]]) -> None:
    _, results = baseline
    assert [r.epoch for r in results] == [1, 2, 3]
    assert results[-1].metrics["train_loss"] < results[0].metrics["train_loss"]
    assert results[-1].metrics["val_accuracy"] > 0.9  # chance is 0.1


def test_same_seed_gives_bit_identical_weights(
    data: tuple[Split, Split], baseline: tuple[list[np.ndarray], list[EpochResult]]
) -> None:
    first, first_results = baseline
    second, second_results = train_weights(TRAIN, *data)
    assert len(first) == len(second) == 14  # 3 dense x (kernel, bias) + 2 batch norms x (gamma, beta, mean, var)
    for a, b in zip(first, second, strict=True):
        assert a.tobytes() == b.tobytes()
    assert first_results == second_results


def test_batch_norm_moving_averages_are_updated_by_training(
    baseline: tuple[list[np.ndarray], list[EpochResult]],
) -> None:
    weights, _ = baseline
    moving_mean, moving_var = weights[4], weights[5]  # hidden1 kernel, bias, bn1 gamma, beta, mean, var
    assert np.abs(moving_mean).max() > 0
    assert not np.allclose(moving_var, 1.0)


MODERN = TRAIN.model_copy(
    update={
        "optimizer": "adamw",
        "learning_rate": 0.01,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup_epochs": 1,
        "label_smoothing": 0.1,
        "shift_pixels": 2,
        "epochs": 2,
    }
)


def assert_learns_and_is_deterministic(model: ModelParams, even: tuple[Split, Split]) -> None:
    """Two trainings with the modern knobs on: the same weights and history, and better than chance."""
    first, results = train_weights(MODERN, *even, model=model)
    second, again = train_weights(MODERN, *even, model=model)
    assert results == again
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second, strict=True))
    assert results[-1].metrics["val_accuracy"] > 0.5  # chance is 0.1; shifts blur these non-spatial blobs


def test_modern_recipe_learns_and_is_deterministic(even: tuple[Split, Split]) -> None:
    assert_learns_and_is_deterministic(MODEL, even)


@pytest.mark.e2e  # dropout doubles the compilation time: in the full run, not the inner loop
def test_modern_recipe_with_dropout_learns_and_is_deterministic(even: tuple[Split, Split]) -> None:
    assert_learns_and_is_deterministic(MODEL.model_copy(update={"dropout": 0.1}), even)


@pytest.mark.parametrize(
    "update",
    [
        {"optimizer": "sgd", "momentum": 0.9, "nesterov": True},
        {"optimizer": "rmsprop", "learning_rate": 0.001, "momentum": 0.5},
        {"optimizer": "adam", "learning_rate": 0.001, "weight_decay": 0.001},
    ],
    ids=["nesterov", "rmsprop", "adam"],
)
@pytest.mark.e2e  # three more trainings: in the full run, not the inner loop
def test_every_optimizer_learns(even: tuple[Split, Split], update: dict[str, object]) -> None:
    _, results = train_weights(TRAIN.model_copy(update=update), *even)
    assert results[-1].metrics["val_accuracy"] > 0.9


@pytest.mark.e2e  # six trainings: in the full run; the inner loop trains with all knobs on (test_modern_recipe_...)
def test_the_seed_and_each_knob_change_the_result(even: tuple[Split, Split]) -> None:
    plain, _ = train_weights(TRAIN, *even)
    knobs = ({"label_smoothing": 0.1}, {"shift_pixels": 1}, {"schedule": "cosine"}, {"weight_decay": 0.01})
    for update in ({"seed": 8}, *knobs):
        changed, _ = train_weights(TRAIN.model_copy(update=update), *even)
        assert any(a.tobytes() != b.tobytes() for a, b in zip(plain, changed, strict=True)), update


def test_shift_moves_pixels_and_fills_with_black() -> None:
    image = np.zeros((2, 28, 28), np.float32)
    image[:, 10, 12] = 1.0
    moved = np.asarray(shift_images(image.reshape(2, 784), np.array([[2, -3], [-1, 0]], np.int32))).reshape(2, 28, 28)
    assert moved[0, 12, 9] == 1.0 and moved[1, 9, 12] == 1.0
    assert moved.sum() == 2.0
    edge = np.zeros((1, 28, 28), np.float32)
    edge[0, 27, :] = 1.0  # a bottom row shifted down falls off the image
    assert np.asarray(shift_images(edge.reshape(1, 784), np.array([[1, 0]], np.int32))).sum() == 0.0


def test_divergence_stops_training_with_a_clear_error(even: tuple[Split, Split]) -> None:
    wild = TRAIN.model_copy(update={"learning_rate": 100.0, "epochs": 5})
    deep = MODEL.model_copy(update={"hidden_units": [300, 100, 100, 100]})
    seen: list[EpochResult] = []
    expected = r"training diverged: .* lower train\.learning_rate \(now 100\.0\)"
    with pytest.raises(DivergedError, match=expected) as raised:
        fit(deep, wild, *even, on_epoch=seen.append)
    # it stops at the end of the first epoch whose loss is not finite (here the first), reporting none of it
    assert "after epoch 1;" in str(raised.value)
    assert seen == []


def assert_trains_without_xla_deterministically(
    even: tuple[Split, Split], caplog: pytest.LogCaptureFixture, said: str
) -> None:
    """Two trainings with TRAIN: the first logs `said` (the plain graph's line); the same weights and
    history both times, and well above chance."""
    with caplog.at_level(logging.INFO, logger="pipeline.fit"):
        first, results = train_weights(TRAIN, *even)
    assert said in caplog.text
    second, again = train_weights(TRAIN, *even)
    assert results == again
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second, strict=True))
    assert results[-1].metrics["val_accuracy"] > 0.9


def test_a_network_xla_refuses_trains_without_it_deterministically(
    even: tuple[Split, Split], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Max pooling has no deterministic gradient in XLA: the same training runs as a plain graph."""
    from test_model import small_convnet

    from pipeline import model

    monkeypatch.setattr(model, "build_model", small_convnet)
    assert_trains_without_xla_deterministically(even, caplog, "training without XLA")


def test_a_very_deep_network_trains_as_a_plain_graph_deterministically(
    even: tuple[Split, Split], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past DEEP_WEIGHTS weight tensors XLA would compile for minutes: the plain graph trains it, the
    same twice (here a [32, 16] network, with the bound lowered below its 14 tensors)."""
    from pipeline import fit as core

    monkeypatch.setattr(core, "DEEP_WEIGHTS", 10)
    assert_trains_without_xla_deterministically(even, caplog, "weight tensors: training without XLA")


def test_every_epoch_reports_the_loss_and_each_metric_for_both_sets(
    baseline: tuple[list[np.ndarray], list[EpochResult]],
) -> None:
    _, results = baseline
    names = ["loss", *(metric.name for metric in epoch_metrics())]
    assert list(results[0].metrics) == [f"train_{n}" for n in names] + [f"val_{n}" for n in names]
