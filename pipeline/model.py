"""The network of the reference program, as a Keras 3 functional model.

Each hidden layer is a dense layer WITHOUT activation, then batch normalization, then the activation
(ELU by default); the output is a dense layer of 10 logits. The reference also builds a batch-norm
layer on the logits but never uses its output, so the effective model has raw logits; set
`model.batch_norm_logits: true` to train the variant that does use it.

`build_model` is the one place that says what the network is: replace its body with any Keras model
from rows of `PIXELS` (or images of shape `IMAGE`) to `CLASSES` logits, a convnet for instance, and
the stages train, evaluate, register and serve it unchanged. Keras is imported inside the functions,
so that `load` reports a missing file before paying for TensorFlow's start-up.
"""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil

from pipeline.config import CLASSES, MODEL_FILE, PIXELS, ModelParams
from pipeline.errors import ConfigError, DataError, ResourceError, chain

if TYPE_CHECKING:
    import keras

BN_EPSILON = 1e-3  # the TF1 default that the reference uses


def build_model(params: ModelParams) -> keras.Model:
    """Dense -> BatchNorm -> activation for each hidden layer, then dense logits."""
    import keras

    inputs = keras.Input(shape=(PIXELS,), name="pixels")
    x = inputs
    for i, units in enumerate(params.hidden_units, start=1):
        x = keras.layers.Dense(units, name=f"hidden{i}")(x)
        x = keras.layers.BatchNormalization(momentum=params.batch_norm_momentum, epsilon=BN_EPSILON, name=f"bn{i}")(x)
        x = keras.layers.Activation(params.activation, name=f"{params.activation}{i}")(x)
        if params.dropout:
            x = keras.layers.Dropout(params.dropout, name=f"dropout{i}")(x)
    logits = keras.layers.Dense(CLASSES, name="logits")(x)
    if params.batch_norm_logits:
        logits = keras.layers.BatchNormalization(
            momentum=params.batch_norm_momentum, epsilon=BN_EPSILON, name="bn_logits"
        )(logits)
    return keras.Model(inputs, logits, name="mnist_bn_mlp")


def network(params: ModelParams) -> keras.Model:
    """`build_model`'s network, fed the rows of `PIXELS` that the data and the served model hold: one that
    declares another input shape (`IMAGE`) gets a Reshape in front."""
    import keras

    deep_enough(4 * len(params.hidden_units) + 4)
    model = build_model(params)
    inner = tuple(model.input_shape[1:])
    if inner == (PIXELS,):
        return model
    rows = keras.Input(shape=(PIXELS,), name="pixels")
    return keras.Model(rows, model(keras.layers.Reshape(inner, name="image")(rows)), name=model.name)


def _shape_only(params: ModelParams) -> keras.Model:
    """The network with the shapes of its weights but none of their memory: built inside a
    `keras.StatelessScope` in a thread of its own, since Keras keeps the weights it has yet to create per
    thread (and would create them at the next symbolic call of this one). One whose input is not
    `PIXELS` values or whose output is not `CLASSES` logits per image is refused with one line."""
    import keras

    def build() -> keras.Model:
        with keras.StatelessScope(initialize_variables=False):
            return build_model(params)

    deep_enough(4 * len(params.hidden_units) + 4)
    with ThreadPoolExecutor(1) as thread:
        probe = thread.submit(build).result()
    takes, gives = tuple(probe.input_shape[1:]), tuple(probe.output_shape[1:])
    if math.prod(takes) != PIXELS or gives != (CLASSES,):
        raise ConfigError(
            f"the network of pipeline/model.py build_model takes {takes} and outputs {gives} per image; it must "
            f"take {PIXELS} pixels (any shape of that size) and output {CLASSES} logits."
        )
    return probe


def deep_enough(layers: int) -> None:
    """Keras walks a network's graph recursively (to build, save and load it), a frame or two per layer:
    past a few hundred hidden layers Python's default limit of 1,000 frames ends in a RecursionError."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000 + 4 * layers))


def parameter_count(params: ModelParams) -> int:
    """Weights of the network `build_model` makes (trainable or not: batch norm's moving statistics count)."""
    return int(_shape_only(params).count_params())


def check_fits_in_memory(params: ModelParams, batch_size: int, slots: int = 2) -> None:
    """Fail before building a network whose training cannot fit in this machine's free memory.

    Training holds each weight about (2 + `slots`) times in float32 (the weight, its gradient and the
    optimizer's slots), plus a batch of every layer's outputs and their gradients for the backward pass.
    The sizes come from the network itself, built without its weights' memory (`_shape_only`).
    """
    import keras

    probe = _shape_only(params)
    weights = probe.count_params()
    outputs = sum(math.prod(out.shape[1:]) for layer in probe.layers for out in keras.tree.flatten(layer.output))
    needed = 4 * ((2 + slots) * weights + 2 * batch_size * outputs)
    available = psutil.virtual_memory().available  # what can be had without swapping (Linux's MemAvailable)
    if needed > available:
        raise ResourceError(
            f"the network needs about {needed / 1e9:.1f} GB to train ({weights:,} weights), but this machine has "
            f"{available / 1e9:.1f} GB free; use fewer or smaller hidden layers (model.hidden_units is "
            f"{params.hidden_units}), or a smaller network in pipeline/model.py build_model."
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
    entries["config.json"] = canonical_ids(entries["config.json"].decode()).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def canonical_ids(config: str) -> str:
    """`config` (the JSON text Keras writes) with every `shared_object_id` (a memory address) replaced by
    1, 2, ... in order of first appearance: the same sharing, the same numbers in every process."""
    ids: dict[str, int] = {}
    return re.sub(
        r'"shared_object_id": (\d+)',
        lambda found: f'"shared_object_id": {ids.setdefault(found[1], len(ids) + 1)}',
        config,
    )


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
