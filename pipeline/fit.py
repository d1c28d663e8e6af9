"""The training core: params and arrays in, a trained model and its per-epoch history out.

No files and no MLflow here, so the `train` stage, `mnist-tune`, the tests and the benchmark all train
through the same code. The default parameters follow the reference program exactly: plain SGD on the
mean sparse softmax cross-entropy; every epoch a fresh permutation of the training set (from a
generator seeded by `train.seed`) array-split into `len(train) // batch_size` nearly equal batches;
the loss and `epoch_metrics()` on the training batches and on the validation set after every epoch.
One epoch runs as a single XLA-compiled TensorFlow function, so Python runs once per epoch, not once per
batch; a network whose gradient XLA cannot compute deterministically (max pooling's), or so deep that
XLA would compile it for minutes, trains through the same function without XLA. docs/performance.md
says why the loop looks as it does, and what the fallback costs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import quiet, timing
from pipeline.config import SIDE, ModelParams, TrainParams
from pipeline.errors import DivergedError, PipelineError, first_line
from pipeline.io import ALIGNMENT, Split

if TYPE_CHECKING:
    import keras

log = logging.getLogger("pipeline.fit")

# XLA's compile time and memory grow faster than the network: past this many weight tensors (about 330
# hidden layers of the MLP) the plain graph reaches its first epoch sooner and in less memory
# (docs/performance.md, "Very deep networks").
DEEP_WEIGHTS = 2_000


def epoch_metrics() -> list[keras.metrics.Metric]:
    """What every epoch reports besides the loss, as `train_<name>` and `val_<name>`: Keras metrics of
    (labels, logits). A new per-epoch figure is one more line here."""
    import keras

    return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


@dataclass(frozen=True)
class EpochResult:
    """One epoch's figures by name (`train_loss`, `train_accuracy`, `val_loss`, ...): train figures are
    averaged over the epoch's batches, as Keras reports them."""

    epoch: int
    metrics: dict[str, float]


def final_figures(history: list[EpochResult]) -> dict[str, float]:
    """The last epoch's figures that runs are compared by: metrics/train.json, a run's and a trial's
    final metrics (MLflow's columns), a trial's objective."""
    return {name: history[-1].metrics[name] for name in ("val_accuracy", "val_loss")}


@dataclass(frozen=True)
class Fitted:
    """A trained model, its history, and the seconds the epochs took (compilation included)."""

    model: keras.Model
    history: list[EpochResult]
    train_seconds: float


def batch_layout(n: int, batch_size: int) -> list[tuple[int, int]]:
    """`(count, size)` groups of `np.array_split(range(n), n // batch_size)`: sizes differ by at most one.

    array_split gives the first `n % k` batches one extra row, so an epoch is at most two runs of
    equal-sized batches, each a static shape the compiler can specialise.
    """
    k = n // batch_size
    if k < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} training rows")
    size, extra = divmod(n, k)
    return [(count, rows) for count, rows in ((extra, size + 1), (k - extra, size)) if count]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, and make TensorFlow's kernels deterministic."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def make_optimizer(params: TrainParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer of params.yaml; `sgd` with no momentum is plain gradient descent, as in the reference.
    Its rate is constant, or decays along a cosine to zero after a linear warm-up from zero."""
    import keras

    rate: float | keras.optimizers.schedules.LearningRateSchedule = params.learning_rate
    if params.schedule == "cosine":
        warmup = params.warmup_epochs * steps_per_epoch
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else params.learning_rate,
            decay_steps=params.epochs * steps_per_epoch - warmup,
            warmup_target=params.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    decay = params.weight_decay or None  # None, not 0: no decay step in the graph at all
    if params.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=params.momentum, nesterov=params.nesterov, weight_decay=decay)
    if params.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(rate, momentum=params.momentum, weight_decay=decay)
    if params.optimizer == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=params.weight_decay)
    return keras.optimizers.Adam(rate, weight_decay=decay)


def shift_images(x: Any, shifts: Any) -> Any:
    """Translate each flattened 28x28 image by its own `(rows, columns)` in `shifts`, filling with black.

    A shift is a product with a 0/1 matrix on each side (`S_rows @ image @ S_columns^T`), so the
    whole batch is two batched matrix products: cheap, exact and compiled with the training step.
    """
    import tensorflow as tf

    images = tf.reshape(x, (-1, SIDE, SIDE))
    positions = tf.range(SIDE)[None, :]
    rows = tf.one_hot(positions - shifts[:, :1], SIDE)  # rows[b, i, j] = 1 where j == i - shift
    columns = tf.one_hot(positions - shifts[:, 1:], SIDE)
    moved = tf.matmul(tf.matmul(rows, images), columns, transpose_b=True)
    return tf.reshape(moved, (-1, SIDE * SIDE))


class Trainer:
    """One XLA-compiled call per epoch (a plain graph where XLA refuses the network) and a plain-graph
    validation pass, both traced up front."""

    def __init__(self, model: keras.Model, params: TrainParams, train: Split, validation: Split) -> None:
        import keras
        import tensorflow as tf

        self.model, self.params = model, params
        self.n = len(train.x)
        self.layout = batch_layout(self.n, params.batch_size)
        self.optimizer = make_optimizer(params, sum(count for count, _ in self.layout))
        self.optimizer.build(model.trainable_variables)
        if params.label_smoothing:
            smoothed = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=params.label_smoothing)
            self.loss_fn = lambda labels, logits: smoothed(tf.one_hot(labels, logits.shape[-1]), logits)
        else:
            self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        # validation reports the plain cross-entropy, comparable across label_smoothing values
        self.val_loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.metrics = [keras.metrics.Mean(name="loss"), *epoch_metrics()]
        self.x, self.y = as_tensor(train.x), as_tensor(train.y)
        self.x_val, self.y_val = as_tensor(validation.x), as_tensor(validation.y)
        self.rng = np.random.default_rng(params.seed)
        # The data are arguments, not captures: TensorFlow keeps every traced epoch graph for good (the
        # optimizer's all-reduce registers a custom gradient that is never dropped), with what it captures.
        data = [tf.TensorSpec.from_tensor(self.x), tf.TensorSpec.from_tensor(self.y)]
        signature = [tf.TensorSpec((self.n,), tf.int32), *data]
        self._epoch = tf.function(self._epoch_body, jit_compile=True, input_signature=signature)
        self._plain_epoch = tf.function(self._epoch_body, jit_compile=False, input_signature=signature)
        if len(model.weights) > DEEP_WEIGHTS:
            log.info(
                "a network of %d weight tensors: training without XLA, which compiles it for minutes",
                len(model.weights),
            )
            self._epoch = self._plain_epoch
        self._validate = tf.function(self._validate_body, jit_compile=False, input_signature=[])
        self._epoch.get_concrete_function()  # trace only; XLA compiles on the first call
        self._validate.get_concrete_function()

    def _augment(self, xb: Any) -> Any:
        import tensorflow as tf

        limit = self.params.shift_pixels
        seed = tf.stack([tf.constant(self.params.seed, tf.int64), tf.cast(self.optimizer.iterations, tf.int64)])
        shifts = tf.random.stateless_uniform((tf.shape(xb)[0], 2), seed, -limit, limit + 1, dtype=tf.int32)
        return shift_images(xb, shifts)

    def _measure(self, loss: Any, labels: Any, logits: Any, rows: Any) -> None:
        self.metrics[0].update_state(loss, sample_weight=rows)
        for metric in self.metrics[1:]:
            metric.update_state(labels, logits)

    def _results(self) -> dict[str, Any]:
        """Each metric's value, then the metrics reset (in the graph, in that order) for the next pass."""
        results = {metric.name: metric.result() for metric in self.metrics}
        for metric in self.metrics:
            metric.reset_state()
        return results

    def _step(self, x: Any, y: Any, idx: Any) -> None:
        import tensorflow as tf

        xb, yb = tf.gather(x, idx), tf.gather(y, idx)
        if self.params.shift_pixels:
            xb = self._augment(xb)
        with tf.GradientTape() as tape:
            logits = self.model(xb, training=True)
            loss = self.loss_fn(yb, logits)
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables, strict=True))
        self._measure(loss, yb, logits, tf.cast(tf.shape(idx)[0], tf.float32))

    def _epoch_body(self, permutation: Any, x: Any, y: Any) -> dict[str, Any]:
        import tensorflow as tf

        start = 0
        for count, size in self.layout:
            batches = tf.reshape(permutation[start : start + count * size], (count, size))
            start += count * size
            for i in tf.range(count):
                self._step(x, y, batches[i])
        return self._results()

    def _validate_body(self) -> dict[str, Any]:
        logits = self.model(self.x_val, training=False)
        self._measure(self.val_loss_fn(self.y_val, logits), self.y_val, logits, None)
        return self._results()

    def _train(self, permutation: np.ndarray) -> dict[str, Any]:
        """The epoch's XLA call. If XLA refuses the network before anything ran (it has no deterministic
        gradient for max pooling, no kernel for some ops), this and every later epoch run as a plain graph,
        still deterministic; if that is refused too, one line says so."""
        import tensorflow as tf

        try:
            return self._epoch(permutation, self.x, self.y)
        except tf.errors.UnimplementedError as error:  # XLA refuses a layer (a damaged cache entry is not that)
            if self._epoch is not self._plain_epoch and not int(self.optimizer.iterations):
                log.info("XLA cannot compile this network (%s): training without XLA", first_line(error))
                self._epoch = self._plain_epoch
                return self._train(permutation)
            raise PipelineError(
                f"no deterministic way to train this network here ({first_line(error)}); replace that "
                "layer in pipeline/model.py build_model."
            ) from None

    def run_epoch(self, epoch: int) -> EpochResult:
        """One pass over a fresh permutation of the training set, then validation."""
        train, val = self._train(self.rng.permutation(self.n).astype(np.int32)), self._validate()
        figures = {f"train_{name}": value for name, value in train.items()} | {f"val_{n}": v for n, v in val.items()}
        return EpochResult(epoch, {name: float(value) for name, value in figures.items()})


def as_tensor(array: np.ndarray) -> Any:
    """A constant tensor of `array`, sharing its memory when it is aligned as TensorFlow requires (as
    `io.load_split` makes it) instead of copying it: the training images alone are 172 MB, and a search
    worker trains on them once per trial. Nothing writes a split after loading it."""
    import tensorflow as tf

    # numpy exports only writable arrays through DLPack; others are copied
    if array.flags.c_contiguous and array.flags.writeable and array.ctypes.data % ALIGNMENT == 0 and array.size:
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    return tf.constant(array)


def fit(
    model_params: ModelParams,
    train_params: TrainParams,
    train: Split,
    validation: Split,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> Fitted:
    """Seed, build and train the network; `on_epoch` sees each epoch's result (progress, pruning).

    Raises `DivergedError` at the first epoch whose loss is not finite.
    """
    from pipeline.model import network

    with timing.phase("build the network, trace the graphs"):
        seed_everything(train_params.seed)
        model = network(model_params)
        trainer = Trainer(model, train_params, train, validation)
    history: list[EpochResult] = []
    seconds = 0.0
    for epoch in range(1, train_params.epochs + 1):
        started = time.perf_counter()
        # the first call compiles the epoch or loads it from runtime's XLA cache: C++ noise on stderr
        with quiet.filtered_stderr() if epoch == 1 else contextlib.nullcontext():
            result = trainer.run_epoch(epoch)
        elapsed = time.perf_counter() - started
        seconds += elapsed
        timing.record("first epoch (XLA compilation or its cache)" if epoch == 1 else "other epochs", elapsed)
        train_loss, val_loss = result.metrics["train_loss"], result.metrics["val_loss"]
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):  # the weights are ruined: never hand them on
            raise DivergedError(
                f"training diverged: the loss is {train_loss} (validation {val_loss}) after epoch "
                f"{epoch}; lower train.learning_rate (now {train_params.learning_rate}), or use fewer or smaller "
                "hidden layers. Nothing was saved or registered."
            )
        history.append(result)
        if on_epoch:
            on_epoch(result)
    return Fitted(model, history, seconds)
