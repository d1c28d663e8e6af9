"""A small real training in a process of its own, its XLA cache under ROOT: what the cache's tests run.
`python tests/xla_training.py ROOT UNITS` trains one epoch of a UNITS-wide network on random data,
inside `runtime.cache_errors_explained`, and prints `trained`; errors are the pipeline's one line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from workspace import REPO

from pipeline import runtime
from pipeline.errors import run_stage


def main() -> None:
    root, units = Path(sys.argv[1]), int(sys.argv[2])
    runtime.import_tensorflow(root)
    from pipeline.config import load_params
    from pipeline.fit import fit
    from pipeline.io import Split

    params = load_params(REPO / "params.yaml")
    model = params.model.model_copy(update={"hidden_units": [units]})
    train = params.train.model_copy(update={"epochs": 1, "batch_size": 64})
    rng = np.random.default_rng(0)
    x, y = rng.random((256, 784), dtype=np.float32), rng.integers(0, 10, 256).astype(np.int32)
    with runtime.cache_errors_explained():
        fit(model, train, Split(x, y), Split(x[:64], y[:64]))
    print("trained", flush=True)


if __name__ == "__main__":
    run_stage(main)
