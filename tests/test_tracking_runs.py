"""tracking.runs: a training's curves sent while it trains, and its system metrics (real SQLite stores)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import mlflow
import pytest
from helpers import wait_for
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.errors import TrackingError
from pipeline.fit import EpochResult
from pipeline.tracking import runs

EPOCHS = 5


@pytest.fixture
def store_file(store: str) -> Path:
    """The database file of this test's own SQLite store (conftest's `store`)."""
    return Path(store.removeprefix("sqlite:///"))


def epoch(n: int) -> EpochResult:
    figures = {"train_loss": 1 / n, "train_accuracy": 0.5 + n / 100, "val_loss": 1.1 / n, "val_accuracy": 0.5 + n / 99}
    return EpochResult(n, figures)


def stored_epochs(watcher: MlflowClient, run_id: str) -> list[int]:
    """The epochs of the run's validation accuracy in the store, as the MLflow UI reads them."""
    return [m.step for m in watcher.get_metric_history(run_id, "epoch/val_accuracy")]


def test_each_epoch_reaches_the_store_while_the_run_is_running(store_file: Path) -> None:
    """Read by a second client, as the UI does: once epoch n is sent, epochs 1 .. n-1 are in the store
    (an epoch's batch is written while the next one trains); when the block ends, all of them."""
    watcher = MlflowClient(f"sqlite:///{store_file}")
    with tracking.run() as run_id, tracking.live_history(run_id) as send:
        for n in range(1, EPOCHS + 1):
            send(epoch(n))
            assert set(range(1, n)) <= set(stored_epochs(watcher, run_id)) <= set(range(1, n + 1))
            assert watcher.get_run(run_id).info.status == "RUNNING"
    assert stored_epochs(watcher, run_id) == list(range(1, EPOCHS + 1))
    stored = watcher.get_metric_history(run_id, "epoch/train_loss")
    assert [m.value for m in stored] == [epoch(n).metrics["train_loss"] for n in range(1, EPOCHS + 1)]
    assert [m.timestamp for m in stored] == sorted(m.timestamp for m in stored)  # stamped as each epoch ended


def fail_metric_writes(database: Path) -> None:
    """From now on the database refuses every new metric, as a full disk would; the rest still works."""
    with sqlite3.connect(database) as connection:
        connection.execute(
            "CREATE TRIGGER full BEFORE INSERT ON metrics BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )


def test_a_store_failing_mid_training_stops_it_and_fails_the_run_in_one_line(
    store_file: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TrackingError) as raised, tracking.run() as run_id, tracking.live_history(run_id) as send:
        send(epoch(1))
        send(epoch(2))
        wait_for(lambda: stored_epochs(MlflowClient(), run_id) == [1, 2], "epoch 2 written")  # as epoch 3 trains
        fail_metric_writes(store_file)
        send(epoch(3))  # handed to MLflow's queue, which fails to write it
        send(epoch(4))  # waits for epoch 3 first: the failure stops the training here
        pytest.fail("the training must stop at the first epoch after the failure")
    assert str(raised.value) == (
        f"recording the run in the MLflow store sqlite:///{store_file} failed (MlflowException: "
        "(sqlite3.IntegrityError) database or disk is full); check the store (disk, permissions, server) and "
        "run again. The previous outputs were left as they were."
    )
    assert mlflow.get_run(run_id).info.status == "FAILED"
    assert stored_epochs(MlflowClient(), run_id) == [1, 2]
    assert capfd.readouterr().err == "", "the error line above is all a user sees of it"


def test_a_finished_run_holds_system_metrics(store_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    monkeypatch.setattr(runs, "SYSTEM_METRICS_SECONDS", 0.1)  # the default (1 s) for a test of a few samples
    watcher = MlflowClient(f"sqlite:///{store_file}")
    with tracking.run() as run_id, tracking.system_metrics(run_id):
        samples = lambda: len(watcher.get_metric_history(run_id, "system/cpu_utilization_percentage"))  # noqa: E731
        wait_for(lambda: samples() >= 3, "three samples of MLflow's monitor")
    finished = watcher.get_run(run_id)
    assert finished.info.status == "FINISHED"
    system = {key for key in finished.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    steps = [m.step for m in watcher.get_metric_history(run_id, "system/system_memory_usage_megabytes")]
    assert steps == list(range(len(steps))) and len(steps) >= 3


def test_a_parameter_longer_than_mlflow_keeps_is_cut_saying_where_the_whole_value_is(
    store_file: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """A 2,100-layer `model.hidden_units` is 6,300 characters: MLflow keeps 6,000 of a parameter and would cut
    it with a warning. The run says so in the value and holds every value exactly in PARAMS_ARTIFACT."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    flat = {"model.hidden_units": [2] * 2100, "train.epochs": 3}
    with tracking.run() as run_id:
        tracking.log_params(flat)
    run = MlflowClient(f"sqlite:///{store_file}").get_run(run_id)
    kept = run.data.params["model.hidden_units"]
    assert len(str(flat["model.hidden_units"])) > MAX_PARAM_VAL_LENGTH >= len(kept)
    assert kept.startswith("[2, 2, ") and kept.endswith(
        f"(cut: the whole value is in the artifact {runs.PARAMS_ARTIFACT} of this run)"
    )
    assert run.data.params["train.epochs"] == "3"
    assert mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{runs.PARAMS_ARTIFACT}") == flat
    assert "truncated" not in caplog.text + "".join(capfd.readouterr())


def test_parameters_mlflow_keeps_whole_leave_no_artifact(store_file: Path) -> None:
    with tracking.run() as run_id:
        tracking.log_params({"model.hidden_units": [300, 100]})
    run = MlflowClient(f"sqlite:///{store_file}").get_run(run_id)
    assert run.data.params == {"model.hidden_units": "[300, 100]"}
    assert [a.path for a in MlflowClient(f"sqlite:///{store_file}").list_artifacts(run_id)] == []
