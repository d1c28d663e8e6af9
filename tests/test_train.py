"""Stage `train`: the reference's batching, learning on small data, and bit-identical reruns."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import ModelParams, TrainParams
from pipeline.model import build_model
from pipeline.train import Trainer, batch_layout, seed_everything

MODEL = ModelParams(hidden_units=[32, 16], activation="elu", batch_norm_momentum=0.9, batch_norm_logits=False)
TRAIN = TrainParams(optimizer="sgd", learning_rate=0.1, epochs=3, batch_size=50, seed=7)


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


def blobs(n: int, seed: int) -> dict[str, np.ndarray]:
    """Ten well-separated Gaussian clusters in 784 dimensions: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).random((10, 784), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    x = np.clip(centers[y] + rng.normal(0, 0.3, (n, 784)).astype(np.float32), 0, 1)
    return {"x": x.astype(np.float32), "y": y}


def train_weights(params: TrainParams, train: dict, validation: dict) -> tuple[list[np.ndarray], list]:
    """Train a fresh model as the stage does and return its weights (trainable and moving stats)."""
    seed_everything(params.seed)
    model = build_model(MODEL)
    trainer = Trainer(model, params, train, validation)
    results = [trainer.run_epoch(epoch) for epoch in range(1, params.epochs + 1)]
    return [np.array(w) for w in model.get_weights()], results


@pytest.fixture(scope="module")
def data() -> tuple[dict, dict]:
    return blobs(1_030, seed=1), blobs(200, seed=2)  # 1030 / 50 -> 20 batches of 51 or 52 rows


def test_training_learns_small_data(data: tuple[dict, dict]) -> None:
    _, results = train_weights(TRAIN, *data)
    assert [r.epoch for r in results] == [1, 2, 3]
    assert results[-1].train_loss < results[0].train_loss
    assert results[-1].val_accuracy > 0.9  # chance is 0.1


def test_same_seed_gives_bit_identical_weights(data: tuple[dict, dict]) -> None:
    first, first_results = train_weights(TRAIN, *data)
    second, second_results = train_weights(TRAIN, *data)
    assert len(first) == len(second) == 14  # 3 dense x (kernel, bias) + 2 batch norms x (gamma, beta, mean, var)
    for a, b in zip(first, second, strict=True):
        assert a.tobytes() == b.tobytes()
    assert first_results == second_results


def test_different_seed_gives_different_weights(data: tuple[dict, dict]) -> None:
    first, _ = train_weights(TRAIN, *data)
    other, _ = train_weights(TRAIN.model_copy(update={"seed": 8}), *data)
    assert any(a.tobytes() != b.tobytes() for a, b in zip(first, other, strict=True))


def test_batch_norm_moving_averages_are_updated_by_training(data: tuple[dict, dict]) -> None:
    weights, _ = train_weights(TRAIN.model_copy(update={"epochs": 1}), *data)
    moving_mean, moving_var = weights[4], weights[5]  # hidden1 kernel, bias, bn1 gamma, beta, mean, var
    assert np.abs(moving_mean).max() > 0
    assert not np.allclose(moving_var, 1.0)
