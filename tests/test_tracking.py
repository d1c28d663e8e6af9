"""MLflow concerns: where the store is, fast failure on a dead server, and runs that never stay RUNNING."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pytest
from workspace import free_port

from pipeline import tracking
from pipeline.errors import Terminated, TrackingError


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real SQLite store of its own for each test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_project_root_is_the_repository_holding_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "repo" / "pipeline").mkdir(parents=True)
    (tmp_path / "repo" / "dvc.yaml").write_text("stages: {}\n")
    assert tracking.project_root(tmp_path / "repo" / "pipeline") == tmp_path / "repo"
    assert tracking.project_root(tmp_path / "repo") == tmp_path / "repo"
    assert tracking.project_root(tmp_path) == tmp_path  # outside any repository: where the command runs


def test_project_root_of_a_dvc_experiment_copy_is_the_main_repository() -> None:
    copy = Path("/home/me/repo/.dvc/tmp/exps/tmpab12cd")
    assert tracking.project_root(copy) == Path("/home/me/repo")


def test_default_store_is_sqlite_at_the_repository_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "plots").mkdir()
    monkeypatch.chdir(tmp_path / "plots")  # a sub-folder of the repository finds the same store
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=60"
    assert tracking.artifact_location(tracking.tracking_uri()) == (tmp_path / "mlartifacts").as_uri()


def test_server_store_keeps_its_own_artifact_location() -> None:
    assert tracking.artifact_location("http://127.0.0.1:5000") is None


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")):
        tracking.check_reachable(uri)
    assert time.monotonic() - started < 6


def test_missing_database_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="does not exist"):
        tracking.check_reachable(f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")


def run_status(run_id: str) -> str:
    return mlflow.get_run(run_id).info.status


def test_finished_run_lands_in_the_experiment(store: str) -> None:
    with tracking.run() as run_id:
        mlflow.log_param("p", 1)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert mlflow.get_experiment(run.info.experiment_id).name == tracking.EXPERIMENT


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"), (Terminated(), "KILLED")]
)
def test_failed_or_interrupted_run_does_not_stay_running(store: str, error: BaseException, status: str) -> None:
    with pytest.raises(type(error)), tracking.run() as run_id:
        raise error
    assert run_status(run_id) == status


def test_resume_unknown_run_is_a_clear_error(store: str) -> None:
    with pytest.raises(TrackingError, match="not in the store"):
        tracking.resume("0" * 32)


def test_resume_logs_into_the_same_run(store: str) -> None:
    with tracking.run() as run_id:
        mlflow.log_metric("a", 1.0)
    with tracking.resume(run_id):
        mlflow.log_metric("b", 2.0)
    assert mlflow.get_run(run_id).data.metrics == {"a": 1.0, "b": 2.0}


def test_lineage_tags_name_commit_params_and_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("a: 1\n")
    data = tmp_path / "train.npz"
    data.write_bytes(b"abc")
    monkeypatch.setenv("DVC_EXP_NAME", "quick-fox")
    tags = tracking.lineage_tags(params, {"train": data})
    assert tags["data_md5.train"] == "900150983cd24fb0d6963f7d28e17f72"  # md5("abc"), as dvc.lock records it
    assert tags["params_md5"] == tracking.file_md5(params)
    assert tags["dvc_experiment"] == "quick-fox"
    assert len(tags["git_commit"]) == 40
    assert tags["git_dirty"] in {"true", "false"}


def test_champion_moves_by_validation_accuracy_never_by_test(store: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    tracking.connect()
    client = MlflowClient()
    client.create_registered_model(tracking.REGISTERED_MODEL)
    champions = []
    # (validation, test): version 2 is better on the test set but worse on validation; 4 ties version 3
    for val_accuracy, test_accuracy in ((0.90, 0.90), (0.85, 0.99), (0.95, 0.80), (0.95, 0.97)):
        with tracking.run() as run_id:
            pass
        client.create_model_version(tracking.REGISTERED_MODEL, source=tmp_path.as_uri(), run_id=run_id)
        tracking.promote_if_better(run_id, val_accuracy)
        tracking.record_test_accuracy(run_id, test_accuracy)
        champions.append(str(client.get_model_version_by_alias(tracking.REGISTERED_MODEL, tracking.CHAMPION).version))
    assert champions == ["1", "1", "3", "3"]  # a worse or equal validation accuracy does not take the alias
    version = client.get_model_version(tracking.REGISTERED_MODEL, "2")
    assert version.tags == {"val_accuracy": "0.850000", "test_accuracy": "0.990000"}
