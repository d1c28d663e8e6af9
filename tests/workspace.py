"""Temporary copies of the repository for tests that run the real `dvc` and `mlflow` commands."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from pipeline import prepare
from pipeline.io import Split

REPO = Path(__file__).resolve().parents[1]
QUICK = {"train__epochs": 2, "model__hidden_units": [64, 32]}
QUICK_EPOCHS = 3  # the epochs of the conftest `workspace`: enough for a curve


def sh(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output if it fails."""
    command = [str(arg) for arg in args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


# Tests that train in their own process do it on a few hundred rows, where XLA's compilation takes most
# of a training's time; conftest.py has them compile without LLVM's optimisations (the same graphs, so
# the same behaviour; 40 % less time). The commands the e2e tests start run as a user runs them.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def venv_env(**extra: str) -> dict[str, str]:
    """The venv's `python` and `dvc` first on PATH (as after `activate`); no inherited MLflow/DVC
    settings, no proxy between the tests and the servers they start on 127.0.0.1, and XLA as users
    have it."""
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_")) and "proxy" not in k.lower()
    }
    xla_flags = environment.pop("XLA_FLAGS", "").replace(FAST_COMPILE, "").strip()
    if xla_flags:
        environment["XLA_FLAGS"] = xla_flags
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment["NO_PROXY"] = "127.0.0.1,localhost"
    return environment | extra


def free_port() -> int:
    """A port nobody listens on now (a server may bind it a moment later; a test may rely on it staying dead)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def set_params(workspace: Path, **changes: object) -> None:
    """Edit params.yaml as a user would: `section__key=value`."""
    path = workspace / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def clone(destination: Path, rev: str | None = None, **params: object) -> Path:
    """A new git repository holding the repository's tracked files as they are in the working tree (or at
    git revision `rev`), with `params` applied and committed: what a user has after cloning and editing
    params.yaml."""
    if rev:
        destination.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    tracked = [] if rev else sh("git", "ls-files", "-z", cwd=REPO).stdout.split("\0")
    for name in filter(None, tracked):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    set_params(destination, **params)
    sh("git", "init", "-q", cwd=destination)
    # a repository-local identity: `dvc exp run` commits experiments, also where no global one is set
    sh("git", "config", "user.name", "pipeline tests", cwd=destination)
    sh("git", "config", "user.email", "tests@localhost", cwd=destination)
    sh("git", "add", "-A", cwd=destination)
    sh("git", "commit", "-qm", "clone", cwd=destination)
    return destination


def reproduced(destination: Path, *stages: str, env: dict[str, str] | None = None, **params: object) -> Path:
    """`clone(destination, **params)` after a real `dvc repro` of `stages` (all when none) in `env`
    (default `venv_env()`): a user's workspace with the outputs. What `dvc repro` printed is in
    repro.log beside it, outside the repository."""
    root = clone(destination, **params)
    done = sh("dvc", "repro", *stages, cwd=root, env=venv_env() if env is None else env)
    (destination.parent / "repro.log").write_text(done.stdout + done.stderr)
    return root


def offline_mnist(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 28, 28) and labels of `train` or `t10k`, from the .gz files committed in
    data/offline/, so tests never depend on untracked pipeline outputs."""

    def read(kind: str, header: int) -> np.ndarray:
        data = gzip.decompress((REPO / f"data/offline/{prefix}-{kind}-ubyte.gz").read_bytes())
        return np.frombuffer(data, np.uint8, offset=header)

    return read("images-idx3", 16).reshape(-1, 28, 28), read("labels-idx1", 8)


def offline_splits(validation_size: int = 5000) -> tuple[Split, Split]:
    """The training and validation splits as `prepare` makes them, from the offline copy."""
    images, labels = offline_mnist("train")
    splits = prepare.split(prepare.normalize(images), labels.astype(np.int32), validation_size)
    return Split(*splits["train"]), Split(*splits["validation"])


# The body of https://keras.io/examples/vision/mnist_convnet/'s model, with logits out (the pipeline's loss
# takes logits) and MNIST's shape and classes from pipeline/config.py.
CONVNET = '''
    """The Keras example convnet."""
    import keras

    from pipeline.config import IMAGE

    return keras.Sequential(
        [
            keras.Input(shape=IMAGE),
            keras.layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
            keras.layers.MaxPooling2D(pool_size=(2, 2)),
            keras.layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            keras.layers.MaxPooling2D(pool_size=(2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(CLASSES),
        ]
    )
'''


def with_network(model_py: Path, body: str) -> None:
    """Replace the body of `build_model` (up to the next top-level definition) with `body`."""
    source = model_py.read_text()
    found = re.search(r"^def build_model\(params: ModelParams\) -> keras\.Model:\n(.*?)(?=^\S)", source, re.M | re.S)
    assert found, "build_model not found in pipeline/model.py"
    model_py.write_text(source[: found.start(1)] + body.lstrip("\n") + "\n\n" + source[found.end(1) :])
