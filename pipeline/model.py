"""The network of the reference program, as a Keras 3 functional model.

Each hidden layer is a dense layer WITHOUT activation, then batch normalization, then the activation
(ELU by default); the output is a dense layer of 10 logits. The reference also builds a batch-norm
layer on the logits but never uses its output, so the effective model has raw logits; set
`model.batch_norm_logits: true` to train the variant that does use it.
"""

from __future__ import annotations

import keras

from pipeline.config import ModelParams

N_FEATURES = 28 * 28
N_CLASSES = 10
BN_EPSILON = 1e-3  # the TF1 default that the reference uses


def build_model(params: ModelParams) -> keras.Model:
    """Dense -> BatchNorm -> activation for each hidden layer, then dense logits."""
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
    probabilities = keras.layers.Softmax(name="probabilities")(model.output)
    return keras.Model(model.input, probabilities, name="mnist_bn_mlp_probabilities")
