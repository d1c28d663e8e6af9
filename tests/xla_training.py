"""A small real training in a process of its own, its XLA cache under ROOT: what the cache's tests run,
two at once. `python tests/xla_training.py ROOT UNITS [HOLD]` trains one epoch of a UNITS-wide network on
random data, inside `runtime.cache_errors_explained`, and prints `trained`; errors are the pipeline's one
line. With HOLD, the process stops just before it removes damaged cache entries (it creates HOLD.reached)
until the file HOLD.go exists."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from workspace import REPO

from pipeline import runtime
from pipeline.errors import run_stage


def hold_before_removal(marker: Path) -> None:
    original = runtime._remove_damaged

    def held(*args: Any) -> list[Path]:
        marker.with_suffix(".reached").touch()
        while not marker.with_suffix(".go").exists():
            time.sleep(0.05)
        return original(*args)

    runtime._remove_damaged = held


def main() -> None:
    root, units = Path(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) > 3:
        hold_before_removal(Path(sys.argv[3]))
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
