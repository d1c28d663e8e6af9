"""The tutorial's TF1 graph program, rendered faithfully on TensorFlow 2.21, as the speed and accuracy yardstick.

Why this file exists: the project rebuilds a classic TensorFlow 1 tutorial program (the batch-normalized
300-100 network of Hands-On Machine Learning's chapter 11, trained by plain graph code) as a tracked Keras 3
pipeline, and claims to reproduce its accuracy at a lower training time. A claim like that needs the
original measured on the same machine, with the same prepared data, in the same way. This script is that
original: graph mode through `tf.compat.v1`, the same layers, seeds, optimizer, batching and per-epoch
validation, including the batch-normalization layer on the logits whose output is never used (its only
effect is that its moving averages are updated with every step, which costs time, so it is kept).

`tf.compat.v1.layers` is implemented by the legacy Keras 2 package `tf_keras` (an optional dependency of
the benchmarks only: `pip install tf_keras==2.21.0`), and TensorFlow picks it only when the environment
variable TF_USE_LEGACY_KERAS=1 is set before TensorFlow is imported; this script sets it itself.

Only the training loop is timed (all epochs, each with its validation pass), not graph construction,
session creation, variable initialization or the final test evaluation. The last line on stdout is one
JSON object; everything else goes to stderr.

Usage (from the repository root):
    .venv/bin/python benchmarks/reference_tf1.py [--data data/prepared] [--epochs 25] [--batch-size 250]
        [--seed 42] [--quiet] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
N_INPUTS = 28 * 28
N_HIDDEN1 = 300
N_HIDDEN2 = 100
N_OUTPUTS = 10
LEARNING_RATE = 0.01
BN_MOMENTUM = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the reference program's own settings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO_ROOT / "data" / "prepared",
        help="folder with train.npz, validation.npz, test.npz (default: data/prepared)",
    )
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=42, help="graph-level and NumPy seed")
    parser.add_argument("--quiet", action="store_true", help="print only the final JSON line")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="also save the trained variables to this TF1 checkpoint prefix, as the reference does",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be positive")
    return args


def log(message: str, quiet: bool) -> None:
    """Progress goes to stderr so stdout carries only the JSON result."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def load_split(data_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one prepared split (x float32 (n, 784) in [0, 1], y int32 (n,)) without pickle."""
    path = data_dir / f"{name}.npz"
    try:
        with np.load(path, allow_pickle=False) as archive:
            x, y = archive["x"], archive["y"]
    except FileNotFoundError:
        raise SystemExit(f"error: {path} is missing; run `dvc repro prepare` first.") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise SystemExit(f"error: {path} is unreadable ({error}); run `dvc repro -f prepare`.") from None
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != N_INPUTS or y.shape != (x.shape[0],):
        raise SystemExit(f"error: {path} has unexpected arrays x{x.shape} {x.dtype}, y{y.shape} {y.dtype}.")
    return x, y.astype(np.int32, copy=False)


def shuffle_batch(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The reference's batching: a fresh permutation split into len(x) // batch_size nearly equal parts."""
    rnd_idx = np.random.permutation(len(x))
    n_batches = len(x) // batch_size
    for batch_idx in np.array_split(rnd_idx, n_batches):
        yield x[batch_idx], y[batch_idx]


def import_tf1() -> types.ModuleType:
    """Import TensorFlow with the legacy Keras 2 that `tf.compat.v1.layers` needs, in graph mode."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # must precede the first `import tensorflow`
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide C++ info/warning spam; no effect on speed
    try:
        import tf_keras  # noqa: F401 - only checks that the optional dependency is installed
    except ImportError:
        raise SystemExit("error: tf_keras is missing; run `.venv/bin/pip install tf_keras==2.21.0`.") from None
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # deprecation notices of tf.compat.v1.layers
    warnings.filterwarnings("ignore", message=r"`tf\.layers\.", category=UserWarning)
    tf.compat.v1.disable_eager_execution()
    return tf


def main(argv: list[str] | None = None) -> None:
    """Build the reference graph, train it, and print one JSON line of results."""
    args = parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"error: prepared data folder {args.data} does not exist; run `dvc repro prepare` first.")
    x_train, y_train = load_split(args.data, "train")
    x_valid, y_valid = load_split(args.data, "validation")
    x_test, y_test = load_split(args.data, "test")
    if len(x_train) < args.batch_size:
        raise SystemExit(f"error: {len(x_train)} training samples are fewer than one batch of {args.batch_size}.")
    log(f"data: train {x_train.shape}, validation {x_valid.shape}, test {x_test.shape}", args.quiet)

    tf = import_tf1()
    v1 = tf.compat.v1

    # Graph, exactly in the reference's order (the order of variable creation fixes the per-op seeds).
    v1.reset_default_graph()
    v1.set_random_seed(args.seed)
    np.random.seed(args.seed)

    x = v1.placeholder(tf.float32, shape=(None, N_INPUTS), name="X")
    y = v1.placeholder(tf.int32, shape=(None,), name="y")
    training = v1.placeholder_with_default(False, shape=(), name="training")

    # Dense layers: glorot-uniform kernel, zero bias, no activation. In TF 1.x, tf.layers.dense with no
    # kernel_initializer fell back to get_variable's glorot_uniform_initializer, seeded by the graph seed.
    # tf_keras' default instead draws a seed from Python's unseeded `random` module, so the graph seed would
    # not reach it and every run would start from different weights; passing the TF1 initializer explicitly
    # restores the reference's behaviour (deterministic: graph seed + per-graph op-seed counter).
    hidden1 = v1.layers.dense(x, N_HIDDEN1, name="hidden1", kernel_initializer=v1.glorot_uniform_initializer())
    bn1 = v1.layers.batch_normalization(hidden1, training=training, momentum=BN_MOMENTUM)
    bn1_act = tf.nn.elu(bn1)
    hidden2 = v1.layers.dense(bn1_act, N_HIDDEN2, name="hidden2", kernel_initializer=v1.glorot_uniform_initializer())
    bn2 = v1.layers.batch_normalization(hidden2, training=training, momentum=BN_MOMENTUM)
    bn2_act = tf.nn.elu(bn2)
    logits = v1.layers.dense(bn2_act, N_OUTPUTS, name="outputs", kernel_initializer=v1.glorot_uniform_initializer())
    # The reference normalizes the logits too but never uses the result; its moving-average updates still
    # land in UPDATE_OPS and so run with every training step.
    _unused_bn_logits = v1.layers.batch_normalization(logits, training=training, momentum=BN_MOMENTUM)

    with tf.name_scope("loss"):
        xentropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        loss = tf.reduce_mean(xentropy, name="loss")
    with tf.name_scope("train"):
        optimizer = v1.train.GradientDescentOptimizer(LEARNING_RATE)
        extra_update_ops = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        with tf.control_dependencies(extra_update_ops):
            training_op = optimizer.minimize(loss)
    with tf.name_scope("eval"):
        correct = v1.nn.in_top_k(logits, y, 1)  # TF1 argument order: predictions, targets, k
        accuracy = tf.reduce_mean(tf.cast(correct, tf.float32))

    init = v1.global_variables_initializer()
    saver = v1.train.Saver() if args.checkpoint is not None else None

    val_accuracy = float("nan")
    with v1.Session() as sess:
        sess.run(init)
        start = time.perf_counter()
        for epoch in range(args.epochs):
            for x_batch, y_batch in shuffle_batch(x_train, y_train, args.batch_size):
                sess.run([training_op, extra_update_ops], feed_dict={training: True, x: x_batch, y: y_batch})
            val_accuracy = float(sess.run(accuracy, feed_dict={x: x_valid, y: y_valid}))
            log(
                f"epoch {epoch + 1:3d}/{args.epochs}  validation accuracy {val_accuracy:.4f}"
                f"  ({time.perf_counter() - start:.1f} s)",
                args.quiet,
            )
        train_seconds = time.perf_counter() - start
        test_accuracy = float(sess.run(accuracy, feed_dict={x: x_test, y: y_test}))
        if saver is not None:
            args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            saver.save(sess, str(args.checkpoint))
            log(f"checkpoint saved to {args.checkpoint}", args.quiet)

    log(f"training {train_seconds:.2f} s, validation {val_accuracy:.4f}, test {test_accuracy:.4f}", args.quiet)
    result = {
        "train_seconds": round(train_seconds, 4),
        "val_accuracy": round(val_accuracy, 6),
        "test_accuracy": round(test_accuracy, 6),
        "epochs": args.epochs,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
