"""Fault injection against the real stages: interruptions, a dead tracking server, a bad params.yaml.

Each must end in one `error:` line and a non-zero exit, never a traceback, never a run left RUNNING,
and never a changed or half-written model, metrics file or dvc.lock.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from workspace import QUICK, clone, free_port, set_params, sh, venv_env

pytestmark = pytest.mark.e2e

ENV = venv_env()
GUARDED = ("dvc.lock", "models/model.keras", "metrics/train.json", "metrics/test.json")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone after a complete quick `dvc repro`, so there are outputs to protect."""
    root = clone(tmp_path_factory.mktemp("faults") / "repo", **QUICK)
    sh("dvc", "repro", cwd=root, env=ENV)
    return root


def fingerprint(repo: Path) -> dict[str, str]:
    return {name: hashlib.sha256((repo / name).read_bytes()).hexdigest() for name in GUARDED}


def assert_one_error_line(stderr: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_interrupted_training_is_killed_cleanly(repo: Path, signum: int, code: int) -> None:
    set_params(repo, train__epochs=500)  # long enough to be interrupted mid-training
    before = fingerprint(repo)
    runs_before = {r.info.run_id for r in client(repo).search_runs(["1"], max_results=1000)}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train"], cwd=repo, env=ENV, stderr=subprocess.PIPE, text=True
    )
    lines = []
    for line in process.stderr:  # wait until training is under way
        lines.append(line)
        if line.startswith("epoch 2/"):
            break
    process.send_signal(signum)
    stderr = "".join(lines) + process.stderr.read()
    assert process.wait(timeout=60) == code
    assert_one_error_line(stderr)
    assert fingerprint(repo) == before, "an interrupted training must not touch the outputs"
    assert not list((repo / "models").glob(".*tmp*")), "no temporary model left behind"
    new = [r for r in client(repo).search_runs(["1"], max_results=1000) if r.info.run_id not in runs_before]
    assert [r.info.status for r in new] == ["KILLED"]
    set_params(repo, **QUICK)


def client(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def test_unreachable_tracking_server_fails_fast_before_training(repo: Path) -> None:
    before = fingerprint(repo)
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train"],
        cwd=repo,
        env=ENV | {"MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    assert_one_error_line(done.stderr)
    assert uri in done.stderr
    assert "epoch 1/" not in done.stderr, "must fail before training starts"
    assert elapsed < 30  # seconds: interpreter and TensorFlow start-up, then one refused connection
    assert fingerprint(repo) == before


def test_bad_params_leave_everything_as_it_was(repo: Path) -> None:
    before = fingerprint(repo)
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("learning_rate: 0.01", "lerning_rate: 0.01"))
    done = subprocess.run(["dvc", "repro"], cwd=repo, env=ENV, capture_output=True, text=True, timeout=300)
    (repo / "params.yaml").write_text(params)
    assert done.returncode != 0
    assert "unknown key 'train.lerning_rate'; did you mean 'learning_rate'?" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert fingerprint(repo) == before


def test_killed_repro_recovers_on_the_next_run(repo: Path) -> None:
    set_params(repo, train__epochs=500)
    process = subprocess.Popen(
        ["dvc", "repro"],
        cwd=repo,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    for line in process.stdout:
        if line.startswith("epoch 2/"):
            break
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
    process.communicate(timeout=120)
    assert process.returncode != 0
    set_params(repo, **QUICK)
    sh("dvc", "repro", cwd=repo, env=ENV)
    assert "Running stage" not in sh("dvc", "repro", cwd=repo, env=ENV).stdout
    assert sh("dvc", "status", cwd=repo, env=ENV).stdout.strip().endswith("up to date.")
