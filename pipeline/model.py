"""The network of the reference program, as a Keras 3 functional model.

Each hidden layer is a dense layer WITHOUT activation, then batch normalization, then the activation
(ELU by default); the output is a dense layer of 10 logits. The reference also builds a batch-norm
layer on the logits but never uses its output, so the effective model has raw logits; set
`model.batch_norm_logits: true` to train the variant that does use it.

Keras is imported inside the functions, so that `load` can report a missing file before paying for
TensorFlow's start-up (seconds) and `mnist-predict` fails fast on a wrong path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import MODEL_FILE, ModelParams
from pipeline.errors import DataError

if TYPE_CHECKING:
    import keras

N_FEATURES = 28 * 28
N_CLASSES = 10
BN_EPSILON = 1e-3  # the TF1 default that the reference uses


def build_model(params: ModelParams) -> keras.Model:
    """Dense -> BatchNorm -> activation for each hidden layer, then dense logits."""
    import keras

    inputs = keras.Input(shape=(N_FEATURES,), name="pixels")
    x = inputs
    for i, units in enumerate(params.hidden_units, start=1):
        x = keras.layers.Dense(units, name=f"hidden{i}")(x)
        x = keras.layers.BatchNormalization(momentum=params.batch_norm_momentum, epsilon=BN_EPSILON, name=f"bn{i}")(x)
        x = keras.layers.Activation(params.activation, name=f"{params.activation}{i}")(x)
    logits = keras.layers.Dense(N_CLASSES, name="logits")(x)
    if params.batch_norm_logits:
        logits = keras.layers.BatchNormalization(
            momentum=params.batch_norm_momentum, epsilon=BN_EPSILON, name="bn_logits"
        )(logits)
    return keras.Model(inputs, logits, name="mnist_bn_mlp")


def with_softmax(model: keras.Model) -> keras.Model:
    """The served form: same weights, ten class probabilities instead of logits."""
    import keras

    probabilities = keras.layers.Softmax(name="probabilities")(model.output)
    return keras.Model(model.input, probabilities, name="mnist_bn_mlp_probabilities")


def load(path: Path = MODEL_FILE) -> keras.Model:
    """Load a model saved by `train` in Keras' safe mode: stored code (lambdas) is never executed."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; run `dvc repro train` to train the model.")
    import keras

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for a damaged zip or config
        raise DataError(
            f"{path} cannot be loaded ({type(error).__name__}); run `dvc repro -f train` to rebuild it."
        ) from None


def probabilities(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Class probabilities of a logits model: softmax computed in float64, for a stable log loss."""
    from scipy.special import softmax

    logits = np.asarray(model(x, training=False), dtype=np.float64)
    return softmax(logits, axis=1)
