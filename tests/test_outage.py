"""pipeline/tune/outage.py: which errors are a store that went away, and a worker's loop through a real
PostgreSQL that a trial stops in the middle of itself (so the outage falls exactly inside that trial),
then starts again, or leaves down.
"""

from __future__ import annotations

import logging
import threading
import time

import optuna
import psycopg
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE
from postgres import PASSWORD, PostgresServer
from sqlalchemy.exc import OperationalError

from pipeline import tracking
from pipeline.errors import StoreUnavailableError, TrackingError
from pipeline.tune import outage
from pipeline.tune.storage import GRACE_BEATS, open_storage
from pipeline.tune.study import Study, close_stale_run

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # the heartbeat's

URL = "postgresql://team:pa%3Ass@db.internal:5432/optuna"


def raised(error: BaseException, cause: BaseException) -> BaseException:
    """`error` as raised from `cause` (`raise error from cause`)."""
    try:
        raise error from cause
    except BaseException as caught:
        return caught


def test_which_errors_are_an_outage(store: str) -> None:
    mlflow = outage.outage_of(StoreUnavailableError("...", "the server answered too many 503 error responses"), URL)
    assert mlflow == outage.Outage(f"the MLflow store {store}", "the server answered too many 503 error responses")
    said = 'connection failed: connection to server at "10.0.0.5", port 5432 failed: Connection refused'
    refused = raised(OperationalError("SELECT 1", {}, psycopg.OperationalError(said)), psycopg.OperationalError(said))
    assert outage.outage_of(refused, URL) == outage.Outage(
        "the Optuna storage postgresql://team:***@db.internal:5432/optuna", said
    )
    wrong = 'connection failed: ... failed: FATAL:  password authentication failed for user "team"'
    assert outage.outage_of(psycopg.OperationalError(wrong), URL) is None  # waiting would not heal it
    assert outage.outage_of(ValueError("connection refused"), URL) is None


def test_which_mlflow_errors_are_a_store_away_for_now(store: str) -> None:
    assert tracking.unavailable(MlflowException("down", error_code=TEMPORARILY_UNAVAILABLE))
    retries = "API request to http://x/api/2.0/mlflow/runs/log-batch failed (Caused by ResponseError("
    retries += "'too many 500 error responses'))"
    assert tracking.unavailable(MlflowException(retries)) == "the server answered too many 500 error responses"
    assert tracking.unavailable(raised(MlflowException("failed"), requests.ConnectionError("Connection refused")))
    assert tracking.unavailable(MlflowException("RESOURCE_DOES_NOT_EXIST", error_code=RESOURCE_DOES_NOT_EXIST)) is None
    with pytest.raises(StoreUnavailableError), tracking.store_errors("logging"):
        raise MlflowException("down", error_code=TEMPORARILY_UNAVAILABLE)
    with pytest.raises(TrackingError) as error, tracking.store_errors("logging"):
        raise MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)
    assert not isinstance(error.value, StoreUnavailableError)


def a_study(postgres: PostgresServer, name: str) -> tuple[Study, str]:
    url = postgres.create_database(name)
    storage = open_storage(url, close_stale_run, heartbeat=1)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    experiment = tracking.connect()
    return Study(study, storage, tracking.create_run(experiment, name, {}), experiment), url


@pytest.mark.e2e
def test_a_worker_waits_out_a_restart_and_goes_on(
    postgres: PostgresServer, store: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    shared, url = a_study(postgres, "outage_restarted")
    run_of_trial_1 = tracking.create_run(shared.experiment_id, "outage_restarted/trial-1", {})

    def objective(trial: optuna.Trial) -> float:
        if trial.number == 1:  # the database goes away in the middle of this trial, back 3 s later
            shared.runs[1] = run_of_trial_1
            postgres.stop()
            threading.Timer(3.0, postgres.start).start()
            trial.report(0.5, 1)  # the trial's next write: refused
        return float(trial.number)

    caplog.set_level(logging.WARNING, logger="pipeline.tune")
    outage.optimize(shared, objective, 3, (), [], url, wait=60)
    trials = optuna.load_study(study_name="outage_restarted", storage=shared.storage).trials
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "FAIL"), (2, "COMPLETE")]
    assert "went away" in trials[1].user_attrs["fail_reason"]
    lines = [r.getMessage() for r in caplog.records if "went away" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(
        f"warning: the Optuna storage postgresql://tests:***@127.0.0.1:{postgres.port}/outage_restarted went away ("
    )
    assert lines[0].endswith(
        "during trial 1, which fails; this worker waits up to 60 s for it to come back, then goes on."
    )
    assert PASSWORD not in caplog.text
    assert "Traceback" not in capfd.readouterr().err  # the heartbeat thread skipped its beats, silently
    from mlflow import MlflowClient

    closed = MlflowClient().get_run(run_of_trial_1)
    assert closed.info.status == "FAILED" and "went away" in closed.data.tags["optuna.fail_reason"]


@pytest.mark.e2e
def test_a_trial_whose_run_the_outage_refused_gets_a_failed_run(postgres: PostgresServer, store: str) -> None:
    """The database goes away before trial 1 has its MLflow run: once it is back, the trial is failed
    and a run of it made FAILED with the reason, so MLflow shows every trial of the study."""
    shared, url = a_study(postgres, "outage_no_run")

    def objective(trial: optuna.Trial) -> float:
        if trial.number == 1:
            postgres.stop()
            threading.Timer(3.0, postgres.start).start()
            trial.report(0.5, 1)
        return float(trial.number)

    outage.optimize(shared, objective, 3, (), [], url, wait=60)
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs([shared.experiment_id], "tags.optuna.trial_number = '1'")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("outage_no_run/trial-1", "FAILED")]
    assert runs[0].data.tags["mlflow.parentRunId"] == shared.parent_run_id
    assert "went away" in runs[0].data.tags["optuna.fail_reason"]


@pytest.mark.e2e
def test_a_trial_a_cut_commit_left_behind_is_failed_by_the_heartbeat_check(
    postgres: PostgresServer, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection is cut just as trial 1's creation commits: Optuna never hands it to the worker,
    which waits out the outage and goes on. The orphan, RUNNING without a heartbeat, would stay so for
    good; the worker's one beat for it lets the next heartbeat check fail it."""
    shared, url = a_study(postgres, "outage_cut_commit")
    create = shared.storage._create_new_trial  # what Optuna's cached storage calls

    def commit_then_lose_the_answer(study_id: int, template_trial: object = None) -> object:
        created = create(study_id, template_trial)
        if created.number == 1:
            postgres.stop()
            threading.Timer(3.0, postgres.start).start()
            shared.storage.get_all_studies()  # the worker's next word to the database: refused
        return created

    monkeypatch.setattr(shared.storage, "_create_new_trial", commit_then_lose_the_answer)
    outage.optimize(shared, lambda trial: float(trial.number), 3, (), [], url, wait=60)
    study = optuna.load_study(study_name="outage_cut_commit", storage=shared.storage)
    assert [(t.number, t.state.name) for t in study.trials] == [
        (0, "COMPLETE"),
        (1, "RUNNING"),
        (2, "COMPLETE"),
        (3, "COMPLETE"),
    ]
    time.sleep(1 + GRACE_BEATS)  # past the grace period of a 1 s heartbeat
    optuna.storages.fail_stale_trials(study)  # what the next trial of any worker does first
    assert study.trials[1].state.name == "FAIL"


@pytest.mark.e2e
def test_a_database_that_stays_away_is_one_error(postgres: PostgresServer, store: str) -> None:
    shared, url = a_study(postgres, "outage_gone")

    def objective(trial: optuna.Trial) -> float:
        postgres.stop()
        trial.report(0.5, 1)
        return 1.0

    try:
        with pytest.raises(TrackingError) as error:
            outage.optimize(shared, objective, 2, (), [], url, wait=3)
    finally:
        postgres.start()
    assert str(error.value).startswith("the Optuna storage postgresql://tests:***@")
    assert "did not come back within 3 s; start it again, then this worker" in str(error.value)
