"""What the training loop's two paths cost per epoch: the XLA-compiled epoch, and the plain TensorFlow graph
that a network XLA cannot compile deterministically (max pooling's gradient) trains through instead.

    python benchmarks/network_paths.py [--epochs 4] [--rounds 3] [--json results.json]

Trains on the prepared data (`dvc repro prepare` first) with params.yaml's `train` section: the tutorial's
MLP through both paths, the convnet of Keras' MNIST example through the only path it has, and that convnet
with stride-2 convolutions in place of its poolings (which XLA compiles) through both. The variants
alternate, round after round; printed: the median seconds of an epoch after the first (the first
compiles), per network and path. `--only` picks variants by a word of their names.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import model, runtime  # noqa: E402
from pipeline.config import CLASSES, IMAGE, PARAMS_FILE, load_params, prepared_file  # noqa: E402
from pipeline.io import load_split  # noqa: E402


def convnet(params: Any, strided: bool = False) -> Any:
    """The network of https://keras.io/examples/vision/mnist_convnet/, with logits out; `strided`: each
    pooling replaced by a stride of 2 in the convolution before it."""
    import keras

    def block(filters: int) -> list[Any]:
        if strided:
            return [keras.layers.Conv2D(filters, kernel_size=(3, 3), strides=2, activation="relu")]
        return [keras.layers.Conv2D(filters, kernel_size=(3, 3), activation="relu"), keras.layers.MaxPooling2D(2)]

    return keras.Sequential(
        [
            keras.Input(shape=IMAGE),
            *block(32),
            *block(64),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(CLASSES),
        ]
    )


def epoch_seconds(network: str, plain: bool, epochs: int) -> list[float]:
    """Seconds of each epoch after the first of one training, as `fit` runs it."""
    from pipeline.fit import Trainer, seed_everything

    params = load_params(REPO / PARAMS_FILE)
    train, validation = (load_split(REPO / prepared_file(split)) for split in ("train", "validation"))
    original = model.build_model
    networks = {"convnet": convnet, "strided": lambda params: convnet(params, strided=True), "mlp": original}
    model.build_model = networks[network]
    try:
        seed_everything(params.train.seed)
        trainer = Trainer(model.network(params.model), params.train, train, validation)
    finally:
        model.build_model = original
    if plain:
        trainer._epoch = trainer._plain_epoch
    seconds = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        trainer.run_epoch(epoch)
        seconds.append(time.perf_counter() - started)
    return seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per training (the first is not counted)")
    parser.add_argument("--rounds", type=int, default=3, help="trainings of each variant, alternating")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", nargs="*", default=[], help="run only the variants whose names hold one of these")
    args = parser.parse_args()
    runtime.import_tensorflow(REPO)
    variants = {
        "mlp, XLA": ("mlp", False),
        "mlp, plain graph": ("mlp", True),
        "convnet, plain graph": ("convnet", True),
        "strided convnet, XLA": ("strided", False),
        "strided convnet, plain graph": ("strided", True),
    }
    variants = {k: v for k, v in variants.items() if not args.only or any(word in k for word in args.only)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (network, plain) in variants.items():
            times[name] += epoch_seconds(network, plain, args.epochs)
    results = {name: statistics.median(values) for name, values in times.items()}
    for name, median in results.items():
        print(f"{name:22} {median:.3f} s per epoch (median of {len(times[name])})")
    for network in ("mlp", "strided convnet"):
        xla, plain = results.get(f"{network}, XLA"), results.get(f"{network}, plain graph")
        if xla and plain:
            print(f"plain graph / XLA, {network}: {plain / xla:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"median_epoch_seconds": results, "epoch_seconds": times}, indent=2))


if __name__ == "__main__":
    main()
