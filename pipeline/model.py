"""The network of the reference program, as a Keras 3 functional model.

Each hidden layer is a dense layer WITHOUT activation, then batch normalization, then the activation
(ELU by default); the output is a dense layer of 10 logits. The reference also builds a batch-norm
layer on the logits but never uses its output, so the effective model has raw logits; set
`model.batch_norm_logits: true` to train the variant that does use it.

Keras is imported inside the functions, so that `load` can report a missing file before paying for
TensorFlow's start-up and `mnist-predict` fails fast on a wrong path.
"""

from __future__ import annotations

import json
import sys
import warnings
import zipfile
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from pipeline.config import MODEL_FILE, ModelParams
from pipeline.errors import DataError, ResourceError, chain

if TYPE_CHECKING:
    import keras

N_FEATURES = 28 * 28
N_CLASSES = 10
BN_EPSILON = 1e-3  # the TF1 default that the reference uses


def build_model(params: ModelParams) -> keras.Model:
    """Dense -> BatchNorm -> activation for each hidden layer, then dense logits."""
    import keras

    deep_enough(4 * len(params.hidden_units) + 4)
    inputs = keras.Input(shape=(N_FEATURES,), name="pixels")
    x = inputs
    for i, units in enumerate(params.hidden_units, start=1):
        x = keras.layers.Dense(units, name=f"hidden{i}")(x)
        x = keras.layers.BatchNormalization(momentum=params.batch_norm_momentum, epsilon=BN_EPSILON, name=f"bn{i}")(x)
        x = keras.layers.Activation(params.activation, name=f"{params.activation}{i}")(x)
        if params.dropout:
            x = keras.layers.Dropout(params.dropout, name=f"dropout{i}")(x)
    logits = keras.layers.Dense(N_CLASSES, name="logits")(x)
    if params.batch_norm_logits:
        logits = keras.layers.BatchNormalization(
            momentum=params.batch_norm_momentum, epsilon=BN_EPSILON, name="bn_logits"
        )(logits)
    return keras.Model(inputs, logits, name="mnist_bn_mlp")


def deep_enough(layers: int) -> None:
    """Keras walks a network's graph recursively (to build, save and load it), a frame or two per layer:
    past a few hundred hidden layers Python's default limit of 1,000 frames ends in a RecursionError."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000 + 4 * layers))


def parameter_count(params: ModelParams) -> int:
    """Weights of the network (dense kernels and biases, batch-norm scale, offset and moving stats)."""
    sizes = [N_FEATURES, *params.hidden_units, N_CLASSES]
    dense = sum(n_in * n_out + n_out for n_in, n_out in pairwise(sizes))
    return dense + 4 * sum(params.hidden_units) + (4 * N_CLASSES if params.batch_norm_logits else 0)


def check_fits_in_memory(params: ModelParams, batch_size: int, slots: int = 2) -> None:
    """Fail before building a network whose training cannot fit in this machine's free memory.

    Training holds each weight about (2 + `slots`) times in float32 (the weight, its gradient and the
    optimizer's slots), plus a batch of activations of every layer kept for the backward pass.
    """
    floats = (2 + slots) * parameter_count(params) + 3 * batch_size * sum(params.hidden_units)
    needed = 4 * floats
    available = psutil.virtual_memory().available  # what can be had without swapping (Linux's MemAvailable)
    if needed > available:
        raise ResourceError(
            f"model.hidden_units {params.hidden_units} needs about {needed / 1e9:.1f} GB to train "
            f"({parameter_count(params):,} weights), but this machine has {available / 1e9:.1f} GB free; "
            "use fewer or smaller hidden layers."
        )


def save(model: keras.Model, path: Path) -> None:
    """Save in the native .keras format to `path`, byte-identical for identical weights.

    Keras writes the save time into the archive (metadata.json, the zip entries' dates) and numbers the
    objects that layers share by their memory address (`shared_object_id` in config.json): the time is
    left out and the numbers made sequential, so `dvc status` sees a change only when the model changed.
    """
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    metadata = json.loads(entries["metadata.json"])
    metadata.pop("date_saved", None)
    entries["metadata.json"] = json.dumps(metadata, sort_keys=True).encode()
    entries["config.json"] = json.dumps(canonical_ids(json.loads(entries["config.json"]))).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def canonical_ids(config: Any, ids: dict[int, int] | None = None) -> Any:
    """`config` with every `shared_object_id` (a memory address) replaced by 1, 2, ... in order of first
    appearance: the same sharing, the same numbers in every process."""
    ids = {} if ids is None else ids
    if isinstance(config, dict):
        return {
            key: ids.setdefault(value, len(ids) + 1) if key == "shared_object_id" else canonical_ids(value, ids)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [canonical_ids(value, ids) for value in config]
    return config


def with_softmax(model: keras.Model) -> keras.Model:
    """The served form: same weights, ten class probabilities instead of logits."""
    import keras

    probabilities = keras.layers.Softmax(name="probabilities")(model.output)
    return keras.Model(model.input, probabilities, name="mnist_bn_mlp_probabilities")


def load(path: Path = MODEL_FILE) -> keras.Model:
    """Load a model saved by `train` in Keras' safe mode: stored code (lambdas) is never executed."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; run `dvc repro train` to train the model.")
    from pipeline import runtime

    runtime.import_tensorflow()
    import keras

    try:
        with zipfile.ZipFile(path) as archive:
            deep_enough(archive.read("config.json").count(b'"class_name"'))
        with warnings.catch_warnings():  # members outside the archive ("../x") are skipped; no need to say
            warnings.filterwarnings("ignore", "Skipping invalid path", UserWarning)
            return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for a damaged zip or config
        if holds_code(error):
            raise DataError(f"{path} {HOLDS_CODE}; use a model trained by `dvc repro train`.") from None
        raise DataError(
            f"{path} cannot be loaded ({type(error).__name__}); run `dvc repro -f train` to rebuild it."
        ) from None


HOLDS_CODE = "holds code (a Lambda layer or another stored Python function), which the pipeline never runs"


def holds_code(error: BaseException) -> bool:
    """Whether Keras' safe mode refused to load a model because it holds code (its errors all say how to
    allow it: `safe_mode=False`)."""
    return any("safe_mode=False" in str(found) for found in chain(error))


def probabilities(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Class probabilities of a logits model: softmax computed in float64, for a stable log loss."""
    from scipy.special import softmax

    logits = np.asarray(model(x, training=False), dtype=np.float64)
    return softmax(logits, axis=1)
