"""The network: layer order and sizes of the reference, the normalized-logits variant, safe loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from pipeline.config import ModelParams
from pipeline.errors import ConfigError, DataError, ResourceError
from pipeline.model import (
    build_model,
    canonical_ids,
    check_fits_in_memory,
    load,
    parameter_count,
    probabilities,
    save,
    with_softmax,
)

if TYPE_CHECKING:
    import keras

REFERENCE = ModelParams(
    hidden_units=[300, 100], activation="elu", batch_norm_momentum=0.9, batch_norm_logits=False, dropout=0.0
)
SMALL = REFERENCE.model_copy(update={"hidden_units": [8]})


def test_reference_architecture() -> None:
    model = build_model(REFERENCE)
    kinds = [(layer.__class__.__name__, layer.name) for layer in model.layers[1:]]
    assert kinds == [
        ("Dense", "hidden1"),
        ("BatchNormalization", "bn1"),
        ("Activation", "elu1"),
        ("Dense", "hidden2"),
        ("BatchNormalization", "bn2"),
        ("Activation", "elu2"),
        ("Dense", "logits"),
    ]
    # dense layers carry no activation of their own; batch norm has the reference's momentum and epsilon
    assert all(model.get_layer(n).activation.__name__ == "linear" for n in ("hidden1", "hidden2", "logits"))
    assert model.get_layer("bn1").momentum == 0.9
    assert model.get_layer("bn1").epsilon == 1e-3
    # 784*300+300 + 4*300 (bn) + 300*100+100 + 4*100 + 100*10+10
    assert model.count_params() == 235_500 + 1_200 + 30_100 + 400 + 1_010


def test_biases_start_at_zero_and_kernels_are_glorot_uniform() -> None:
    model = build_model(REFERENCE)
    kernel, bias = model.get_layer("hidden1").get_weights()
    assert not bias.any()
    limit = np.sqrt(6 / (784 + 300))
    assert np.abs(kernel).max() <= limit
    assert np.abs(kernel).max() > 0.9 * limit  # spread over the whole glorot-uniform range


def test_normalized_logits_variant_adds_a_batch_norm_on_the_output() -> None:
    model = build_model(REFERENCE.model_copy(update={"batch_norm_logits": True, "hidden_units": [8]}))
    assert model.layers[-1].name == "bn_logits"
    assert model.output.shape == (None, 10)


def test_served_model_outputs_probabilities() -> None:
    served = with_softmax(build_model(REFERENCE.model_copy(update={"hidden_units": [16]})))
    probabilities = np.asarray(served(np.random.default_rng(0).random((5, 784), dtype=np.float32)))
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_probabilities_are_softmax_of_logits() -> None:
    model = build_model(SMALL)
    x = np.random.default_rng(0).random((6, 784), dtype=np.float32)
    result = probabilities(model, x)
    logits = np.asarray(model(x, training=False), dtype=np.float64)
    np.testing.assert_allclose(result.sum(axis=1), 1.0)
    np.testing.assert_array_equal(result.argmax(axis=1), logits.argmax(axis=1))


def test_missing_model_names_the_stage_to_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dvc repro train"):
        load(tmp_path / "model.keras")


def test_corrupt_model_is_reported_not_raised(tmp_path: Path) -> None:
    broken = tmp_path / "model.keras"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="cannot be loaded"):
        load(broken)


def test_saved_model_loads_in_safe_mode(tmp_path: Path) -> None:
    model = build_model(SMALL.model_copy(update={"batch_norm_logits": True}))
    save(model, tmp_path / "model.keras")
    loaded = load(tmp_path / "model.keras")
    x = np.ones((2, 784), np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


def test_same_weights_give_the_same_bytes(tmp_path: Path) -> None:
    """Keras stamps the save time into the archive; `save` leaves it out, so DVC sees only real changes."""
    import time

    model = build_model(SMALL)
    save(model, tmp_path / "a.keras")
    time.sleep(1.1)  # the zip and metadata clocks tick in seconds
    save(model, tmp_path / "b.keras")
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    model.get_layer("logits").bias.assign(np.ones(10, np.float32))
    save(model, tmp_path / "c.keras")
    assert (tmp_path / "c.keras").read_bytes() != (tmp_path / "a.keras").read_bytes()


def test_dropout_follows_each_hidden_block_and_adds_no_weights() -> None:
    model = build_model(REFERENCE.model_copy(update={"dropout": 0.1}))
    names = [layer.name for layer in model.layers[1:]]
    assert names.index("dropout1") == names.index("elu1") + 1
    assert names.index("dropout2") == names.index("elu2") + 1
    assert model.count_params() == build_model(REFERENCE).count_params()


@pytest.mark.parametrize("variant", [{}, {"hidden_units": [7, 5, 3]}, {"batch_norm_logits": True}])
def test_parameter_count_matches_keras(variant: dict[str, object]) -> None:
    params = REFERENCE.model_copy(update=variant)
    assert parameter_count(params) == build_model(params).count_params()


def test_shared_object_ids_are_numbered_in_order_not_by_address() -> None:
    config = {
        "a": {"shared_object_id": 140032288147280},
        "b": [{"shared_object_id": 99}, {"x": 1}],
        "c": {"shared_object_id": 140032288147280},
    }
    assert json.loads(canonical_ids(json.dumps(config))) == {
        "a": {"shared_object_id": 1},
        "b": [{"shared_object_id": 2}, {"x": 1}],
        "c": {"shared_object_id": 1},
    }


@pytest.mark.e2e  # runs the real command in a process of its own
def test_a_model_saved_by_two_processes_is_the_same_archive(tmp_path: Path) -> None:
    """Object addresses differ between processes; the saved archive must not."""
    import subprocess
    import sys

    code = (
        "import sys, keras; from pathlib import Path; from pipeline.config import ModelParams; "
        "from pipeline.model import build_model, save; keras.utils.set_random_seed(1); "
        "save(build_model(ModelParams(hidden_units=[8], activation='elu', batch_norm_momentum=0.9, "
        "batch_norm_logits=False, dropout=0.0)), Path(sys.argv[1]))"
    )
    for name in ("a.keras", "b.keras"):
        subprocess.run([sys.executable, "-c", code, tmp_path / name], check=True, capture_output=True, timeout=300)
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()


def small_convnet(params: ModelParams) -> keras.Model:
    """A `build_model` replaced by a convnet on 28x28x1 images, as a user would write it."""
    import keras

    from pipeline.config import CLASSES, IMAGE

    return keras.Sequential(
        [
            keras.Input(shape=IMAGE),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(CLASSES),
        ]
    )


def test_a_network_of_images_is_fed_the_rows_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import model

    monkeypatch.setattr(model, "build_model", small_convnet)
    net = model.network(REFERENCE)
    assert net.input_shape == (None, 784) and net.output_shape == (None, 10)
    x = np.random.default_rng(0).random((3, 784), dtype=np.float32)
    inner = net.layers[-1]  # the convnet itself, behind the Reshape
    np.testing.assert_array_equal(np.asarray(net(x)), np.asarray(inner(x.reshape(3, 28, 28, 1))))
    assert model.parameter_count(REFERENCE) == net.count_params() == (9 * 4 + 4) + (13 * 13 * 4 * 10 + 10)
    model.check_fits_in_memory(REFERENCE, batch_size=250)  # sized from the network itself: it fits


def test_a_network_that_does_not_fit_mnist_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    from pipeline import model

    def three_channels(params: ModelParams) -> keras.Model:
        inputs = keras.Input(shape=(28, 28, 3))
        return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))

    monkeypatch.setattr(model, "build_model", three_channels)
    with pytest.raises(ConfigError, match=r"takes \(28, 28, 3\) and outputs \(10,\) per image; it must take 784"):
        model.check_fits_in_memory(REFERENCE, batch_size=250)


def test_counting_a_large_network_takes_no_memory_for_its_weights() -> None:
    """The probe's weights are never made: not while counting, nor when a network is built afterwards with a
    layer whose output shape Keras finds by running it (a Lambda): that closes a StatelessScope of Keras' own,
    which makes every pending weight of its thread (5 GB here, were the probe built in this thread)."""
    import keras
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    large = REFERENCE.model_copy(update={"hidden_units": [20_000, 20_000]})  # 416 M weights: 1.7 GB of float32
    dense = 784 * 20_000 + 20_000 + 20_000 * 20_000 + 20_000 + 20_000 * 10 + 10
    assert parameter_count(large) == dense + 2 * 4 * 20_000
    inputs = keras.Input(shape=(8,))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    assert process.memory_info().rss - before < 500e6


@pytest.mark.e2e  # building, saving and loading 2,800 Keras layers takes a minute or two on 2 cores
def test_a_network_of_700_hidden_layers_builds_saves_and_loads(tmp_path: Path) -> None:
    """Past about 250 hidden layers, Keras' recursive walks of the graph exceeded Python's default limit of
    1,000 frames (RecursionError); the limit now follows the depth. A fresh process, at the default limit."""
    script = (
        "import sys; from pathlib import Path; from pipeline.config import ModelParams; "
        "from pipeline.model import check_fits_in_memory, load, network, save, with_softmax; "
        "assert sys.getrecursionlimit() == 1000; "
        "p = ModelParams(hidden_units=[2] * 700, activation='elu', batch_norm_momentum=0.9, "
        "batch_norm_logits=False, dropout=0.0); check_fits_in_memory(p, 250); m = network(p); "
        "with_softmax(m); save(m, Path(sys.argv[1])); "
        "sys.setrecursionlimit(1000); print(len(load(Path(sys.argv[1])).layers))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, tmp_path / "deep.keras"], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == 1 + 3 * 700 + 1  # input, dense-bn-elu per hidden layer, logits


def test_a_network_larger_than_memory_is_refused_before_building() -> None:
    """The train stage (before its MLflow run) and each search trial (before `fit`) run this check."""
    huge = REFERENCE.model_copy(update={"hidden_units": [100_000, 100_000]})
    with pytest.raises(ResourceError, match=r"needs about \d+\.\d GB .* GB free; use fewer or smaller hidden layers"):
        check_fits_in_memory(huge, batch_size=50)
    check_fits_in_memory(REFERENCE, batch_size=50)  # the reference network passes
