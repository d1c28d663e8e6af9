"""The train stage as its own process, watched from outside while it trains, as the MLflow UI watches it:
its curves grow epoch by epoch while the run is RUNNING; the finished run holds system metrics and a
name that says what it was; and a rerun that loads the XLA cache prints no false alarm."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from workspace import QUICK, reproduced, set_params, sh, venv_env

pytestmark = pytest.mark.e2e

ENV = venv_env()
EPOCHS = 12


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone with the prepared data (the real `dvc repro prepare`), and nothing trained."""
    return reproduced(tmp_path_factory.mktemp("train") / "repo", "prepare", env=ENV, **QUICK)


@pytest.fixture(scope="module")
def watched(repo: Path) -> tuple[str, list[tuple[int, int, str]]]:
    """One training of EPOCHS epochs (params.yaml edited, not committed), watched through the MLflow API:
    at each epoch's line on stderr, (epoch, the epochs of val_accuracy in the store, the run's status)."""
    set_params(repo, train__epochs=EPOCHS)
    watcher = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    command = [sys.executable, "-m", "pipeline.train"]
    seen: list[tuple[int, int, str]] = []
    run_id = ""
    with subprocess.Popen(command, cwd=repo, env=ENV, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None
        for line in process.stderr:
            if not (found := re.match(r"epoch (\d+)/", line)):
                continue
            if not run_id:  # the run this process started: it is tagged with its pid
                experiment = watcher.get_experiment_by_name("mnist-batchnorm")
                assert experiment is not None
                [run] = watcher.search_runs([experiment.experiment_id], f"tags.pid = '{process.pid}'")
                run_id = run.info.run_id
            stored = len(watcher.get_metric_history(run_id, "epoch/val_accuracy"))
            seen.append((int(found[1]), stored, watcher.get_run(run_id).info.status))  # count first, then status
    assert process.returncode == 0
    return run_id, seen


def test_the_curves_grow_epoch_by_epoch_while_the_run_is_running(watched: tuple) -> None:
    """When epoch n's line shows, epochs 1 .. n-1 are in the store (the stage sends each epoch as it ends
    and waits for the previous one first) and the run, which ends after the last epoch, is RUNNING."""
    _, seen = watched
    assert [epoch for epoch, _, _ in seen] == list(range(1, EPOCHS + 1))
    for epoch, stored, status in seen:
        assert status == "RUNNING", seen
        assert stored >= epoch - 1, seen
    counts = [stored for _, stored, _ in seen]
    assert counts == sorted(counts) and len(set(counts)) >= EPOCHS // 2, seen  # it grew while running


def test_the_finished_run_holds_every_epoch_system_metrics_and_its_name(watched: tuple, repo: Path) -> None:
    run_id, _ = watched
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for metric in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [m.step for m in client.get_metric_history(run_id, f"epoch/{metric}")] == list(range(1, EPOCHS + 1))
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    commit = sh("git", "rev-parse", "--short", "HEAD", cwd=repo).stdout.strip()
    assert run.info.run_name == f"{commit} train.epochs={EPOCHS}"


def test_a_rerun_from_the_xla_cache_raises_no_false_alarm(watched: tuple, repo: Path) -> None:
    """The rerun loads the compiled epoch from .cache/xla/; on an AVX-512 CPU XLA then reports LLVM's
    tuning hints as missing CPU features, which the stage hides (elsewhere there is nothing to hide)."""
    set_params(repo, train__learning_rate=0.02)  # the same graph shapes: the cache entry is loaded
    rerun = sh(sys.executable, "-m", "pipeline.train", cwd=repo, env=ENV)
    assert "epoch 1/" in rerun.stderr
    assert "cpu_aot_loader" not in rerun.stderr and "SIGILL" not in rerun.stderr, rerun.stderr
