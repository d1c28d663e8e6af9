"""What the training loop's two paths cost per epoch: the XLA-compiled epoch, and the plain TensorFlow graph
that a network XLA cannot compile deterministically (max pooling's gradient) trains through instead.

    python benchmarks/network_paths.py [--epochs 4] [--rounds 3] [--json results.json]

Trains on the prepared data (`dvc repro prepare` first) with params.yaml's `train` section: the tutorial's
MLP through both paths, then the convnet of Keras' MNIST example through the only path it has. The
variants alternate, round after round; printed: the median seconds of an epoch after the first (the
first compiles), per network and path.
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
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the tests' convnet

from workspace import CONVNET  # noqa: E402

from pipeline import model, runtime  # noqa: E402
from pipeline.config import CLASSES, PARAMS_FILE, load_params, prepared_file  # noqa: E402
from pipeline.io import load_split  # noqa: E402


def convnet(params: Any) -> Any:
    """The network of https://keras.io/examples/vision/mnist_convnet/, with logits out: the body that
    tests/test_convnet_e2e.py pastes into `build_model`."""
    namespace = {"CLASSES": CLASSES}
    exec(f"def build_model(params):\n{CONVNET}", namespace)
    return namespace["build_model"](params)


def epoch_seconds(network: str, plain: bool, epochs: int) -> list[float]:
    """Seconds of each epoch after the first of one training, as `fit` runs it."""
    from pipeline.fit import Trainer, seed_everything

    params = load_params(REPO / PARAMS_FILE)
    train, validation = (load_split(REPO / prepared_file(split)) for split in ("train", "validation"))
    original = model.build_model
    model.build_model = convnet if network == "convnet" else original
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
    args = parser.parse_args()
    runtime.import_tensorflow(REPO)
    variants = {
        "mlp, XLA": ("mlp", False),
        "mlp, plain graph": ("mlp", True),
        "convnet, plain graph": ("convnet", True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (network, plain) in variants.items():
            times[name] += epoch_seconds(network, plain, args.epochs)
    results = {name: statistics.median(values) for name, values in times.items()}
    for name, median in results.items():
        print(f"{name:22} {median:.3f} s per epoch (median of {len(times[name])})")
    print(f"plain graph / XLA, mlp: {results['mlp, plain graph'] / results['mlp, XLA']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"median_epoch_seconds": results, "epoch_seconds": times}, indent=2))


if __name__ == "__main__":
    main()
