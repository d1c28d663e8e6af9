"""Reproducibility and lineage on real DVC experiments and a real MLflow store (no mocks).

`dvc repro -f` reproduces the metrics and weights bit for bit; `dvc exp run` (in the workspace,
`--temp`, and queued two at a time) all log into the ONE store at the repository root, each run tagged
with its experiment name; metrics name their run and runs name their commit and data; DVC's diffs work;
a model restored from DVC's cache is evaluated into the run that trained it; and queued experiments
and search workers write the local stores at the same time without "database is locked".
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import psutil
import pytest
from mlflow import MlflowClient
from workspace import QUICK, reproduced, sh, venv_env

pytestmark = pytest.mark.e2e

ENV = venv_env()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reproduced(tmp_path_factory.mktemp("exp") / "repo", env=ENV, **QUICK)


def client(repo: Path) -> MlflowClient:
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def metrics(repo: Path, name: str) -> dict:
    return json.loads((repo / f"metrics/{name}.json").read_text())


def trained_by(repo: Path, rev: str | None = None) -> str:
    """The MLflow run named in runs/train.json, in the workspace or at a git revision (an experiment's)."""
    path = "runs/train.json"
    text = sh("git", "show", f"{rev}:{path}", cwd=repo).stdout if rev else (repo / path).read_text()
    return str(json.loads(text)["mlflow_run_id"])


def weights(path: Path) -> list[np.ndarray]:
    import keras

    return keras.saving.load_model(path, compile=False, safe_mode=True).get_weights()


def test_forced_rerun_is_bit_identical(repo: Path) -> None:
    before = {name: metrics(repo, name) for name in ("train", "test")}
    before_run = trained_by(repo)
    before_weights = weights(repo / "models/model.keras")
    before_archive = (repo / "models/model.keras").read_bytes()
    sh("dvc", "repro", "-f", cwd=repo, env=ENV)
    assert {name: metrics(repo, name) for name in ("train", "test")} == before  # every metric, to the last bit
    assert trained_by(repo) != before_run  # a new run, same results
    assert "changed" not in sh("dvc", "metrics", "diff", "HEAD", cwd=repo, env=ENV).stdout.lower()
    for a, b in zip(before_weights, weights(repo / "models/model.keras"), strict=True):
        assert a.tobytes() == b.tobytes()
    # same weights, same bytes: the archive carries no save time, so dvc.lock's hash of it does not move
    assert (repo / "models/model.keras").read_bytes() == before_archive


def test_run_leads_back_to_commit_params_and_data(repo: Path) -> None:
    run = client(repo).get_run(trained_by(repo))
    lock = (repo / "dvc.lock").read_text()
    assert run.data.tags["git_commit"] == sh("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    assert run.data.tags["git_dirty"] == "false"  # only pipeline outputs changed since the commit
    for split in ("train", "validation", "test"):
        assert run.data.tags[f"data_md5.{split}"] in lock  # the same hashes dvc.lock records
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert {"mnist-train", "mnist-validation", "mnist-test"} <= inputs.keys()


def test_workspace_experiment_and_diffs(repo: Path) -> None:
    sh("dvc", "exp", "run", "-S", "train.learning_rate=0.05", "-n", "lr-005", cwd=repo, env=ENV)
    params = sh("dvc", "params", "diff", "--json", cwd=repo, env=ENV).stdout
    changed = json.loads(params)["params.yaml"]["train.learning_rate"]
    assert (changed["old"], changed["new"]) == (0.01, 0.05)
    diff = json.loads(sh("dvc", "metrics", "diff", "--json", cwd=repo, env=ENV).stdout)
    # only the results people compare: no run id, no training time
    assert sorted(diff) == ["metrics/test.json", "metrics/train.json"]
    assert sorted(diff["metrics/test.json"]) == ["accuracy", "log_loss"]
    assert sorted(diff["metrics/train.json"]) == ["val_accuracy", "val_loss"]
    out = repo / "plots_html"
    sh("dvc", "plots", "diff", "HEAD", "-o", str(out), cwd=repo, env=ENV)
    assert "Confusion matrix (test set)" in (out / "index.html").read_text()
    run = client(repo).get_run(trained_by(repo))
    assert run.data.tags["dvc_experiment"] == "lr-005"
    assert run.data.params["train.learning_rate"] == "0.05"
    assert run.info.run_name == "lr-005 train.learning_rate=0.05"  # what the experiment changed


def test_exp_show_at_120_columns_shows_the_change_and_its_accuracy(repo: Path) -> None:
    """`dvc exp show --only-changed` in a 120-column terminal, paged (the first 120 columns) or not: the
    experiment's row holds the learning rate it changed and the test accuracy it gave; its run says what
    it changed. (`--temp`: the workspace keeps lr-005's results for the tests below.)"""
    sh("dvc", "exp", "run", "--temp", "-S", "train.learning_rate=0.02", "-n", "lr-002", cwd=repo, env=ENV)
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo, env=ENV).stdout)
    exp = next(e for baseline in shown for e in baseline.get("experiments") or [] if e["name"] == "lr-002")
    accuracy = exp["revs"][0]["data"]["metrics"]["metrics/test.json"]["data"]["accuracy"]
    for pager in ([], ["--no-pager"]):
        table = sh("dvc", "exp", "show", "--only-changed", *pager, cwd=repo, env={**ENV, "COLUMNS": "120"}).stdout
        seen = [line[:120] for line in table.splitlines()]  # `less -S` in a 120-column terminal
        assert pager == [] or seen == table.splitlines(), table  # rich fits the width without a pager
        assert "accuracy" in seen[1] and "train.learning_rate" in seen[1], table
        row = next(line for line in seen if "[lr-002]" in line)
        assert " 0.02 " in row and f" {accuracy:.4f}".rstrip("0") in row, table
    run = client(repo).get_run(trained_by(repo, exp["revs"][0]["rev"]))
    assert run.info.run_name == "lr-002 train.learning_rate=0.02"


def start_queue(repo: Path) -> None:
    """`dvc queue start -j 2`, its output to a file: the workers it leaves in the background inherit that
    output, and a pipe would keep the command's call open for as long as one of them lives."""
    output = repo.parent / "queue-start.log"
    with output.open("w") as log:
        command = ["dvc", "queue", "start", "-j", "2"]
        done = subprocess.run(command, cwd=repo, env=ENV, stdout=log, stderr=log, timeout=120, check=False)
    assert done.returncode == 0, output.read_text()


def wait_for_queue(repo: Path, timeout: float = 600) -> str:
    """The queue's status once nothing is queued or running, its workers ended. A worker that sent its
    shutdown while another task ran can idle for good, deaf to `dvc queue stop` (a race of DVC's task
    queue): it gets SIGTERM, celery's warm shutdown, as a user would end it (docs/troubleshooting.md)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = sh("dvc", "queue", "status", cwd=repo, env=ENV).stdout
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(2)
    else:
        raise AssertionError(f"the DVC queue did not finish in {timeout} s:\n{status}")
    for record in (repo / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.json"):
        with contextlib.suppress(psutil.Error):
            worker = psutil.Process(json.loads(record.read_text())["pid"])
            if "queue-worker" in " ".join(worker.cmdline()):
                with contextlib.suppress(psutil.TimeoutExpired):
                    worker.wait(30)  # an idle worker shuts itself down within seconds
                worker.terminate()
                worker.wait(60)
    return status


def test_temp_and_queued_experiments_share_the_one_store(repo: Path) -> None:
    sh("dvc", "exp", "run", "--temp", "-S", "train.seed=1", "-n", "seed-1", cwd=repo, env=ENV)
    for rate in ("0.02", "0.03"):
        sh("dvc", "exp", "run", "--queue", "-S", f"train.learning_rate={rate}", "-n", f"lr-{rate}", cwd=repo, env=ENV)
    start_queue(repo)
    status = wait_for_queue(repo)
    assert status.count("Success") == 2, status  # two concurrent writers, no "database is locked"

    assert not list((repo / ".dvc").rglob("mlflow.db")), "runs must not land in a store inside DVC's copies"
    runs = {r.data.tags.get("dvc_experiment"): r for r in client(repo).search_runs(["1"], max_results=100)}
    # experiments start from the workspace, which still holds lr-005's learning rate
    for name, rate in (("seed-1", "0.05"), ("lr-0.02", "0.02"), ("lr-0.03", "0.03")):
        assert runs[name].info.status == "FINISHED"
        assert runs[name].data.params["train.learning_rate"] == rate
        assert "test_accuracy" in runs[name].data.metrics
    assert runs["seed-1"].data.params["train.seed"] == "1"

    # each experiment's commit names its run (runs/train.json), and the run is named after it
    for name in ("seed-1", "lr-0.02", "lr-0.03"):
        assert runs[name].info.run_name.startswith(name)
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo, env=ENV).stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            found[exp["name"]] = trained_by(repo, exp["revs"][0]["rev"])
    for name in ("seed-1", "lr-0.02", "lr-0.03"):
        assert found[name] == runs[name].info.run_id


def test_restored_model_is_evaluated_into_its_own_run(repo: Path) -> None:
    sh("dvc", "exp", "apply", "lr-0.03", cwd=repo, env=ENV)  # model and metrics come back from DVC's cache
    run_id = trained_by(repo)
    sh("dvc", "repro", "-f", "-s", "evaluate", cwd=repo, env=ENV)
    assert len(client(repo).get_metric_history(run_id, "test_accuracy")) == 2  # evaluated twice, same run


def test_queued_experiments_and_search_workers_share_the_local_stores(tmp_path: Path) -> None:
    """The local default under load, no server: three queued experiments run two at a time while two
    `mnist-tune` workers search, all creating and writing mlflow.db (and the workers optuna.db) at once,
    in a clone with nothing but its prepared data. All finish: no "database is locked", one FINISHED run
    and one model version per experiment."""
    repo = reproduced(tmp_path / "repo", "prepare", env=ENV, **QUICK)  # no MLflow or Optuna store yet
    assert not (repo / "mlflow.db").exists() and not (repo / "optuna.db").exists()
    names = [f"busy-{n}" for n in range(3)]
    for n, name in enumerate(names):
        sh("dvc", "exp", "run", "--queue", "-S", f"train.seed={100 + n}", "-n", name, cwd=repo, env=ENV)
    quick = ["--set", "train.epochs=2", "--set", "model.hidden_units=[64,32]"]
    search = [sys.executable, "-m", "pipeline.tune", "--study", "busy", "--trials", "2", *quick]
    popen = {"cwd": repo, "env": ENV, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    start_queue(repo)
    workers = [subprocess.Popen(search, **popen) for _ in range(2)]  # type: ignore[call-overload]
    outputs = [worker.communicate(timeout=1800) for worker in workers]
    status = wait_for_queue(repo, timeout=1800)
    logs = "\n".join(sh("dvc", "queue", "logs", name, cwd=repo, env=ENV).stdout for name in names)
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr
        assert "locked" not in stderr and "Traceback" not in stderr, stderr
    assert "database is locked" not in logs and "Traceback" not in logs, logs
    for name in names:
        assert any(name in line and "Success" in line for line in status.splitlines()), status

    store = client(repo)
    runs = store.search_runs(["1"], "tags.dvc_experiment LIKE 'busy-%'", max_results=100)
    assert sorted(r.data.tags["dvc_experiment"] for r in runs) == names  # one run per experiment
    for run in runs:
        assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
        versions = store.search_model_versions(f"run_id = '{run.info.run_id}'")
        assert len(versions) == 1 and versions[0].tags["val_accuracy"]
    search_runs = store.search_runs(["1"], "tags.`optuna.study` = 'busy'", max_results=100)
    assert sorted(r.info.status for r in search_runs) == ["FINISHED"] * 5  # the parent and four trials
    study = optuna.load_study(study_name="busy", storage=f"sqlite:///{repo / 'optuna.db'}")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
