"""MLflow concerns: where the store is, fast failure on a dead server, and runs that never stay RUNNING."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
from browser import readme_ui
from helpers import dead_pid
from workspace import REPO, free_port

from pipeline import tracking
from pipeline.errors import Terminated, TrackingError


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
    with pytest.raises(TrackingError) as raised:
        tracking.check_reachable(uri)
    assert time.monotonic() - started < 6
    assert str(raised.value) == (
        f"the MLflow tracking server at {uri} is unreachable (connection refused); "
        "start it, or unset MLFLOW_TRACKING_URI to use the local store."
    )


def test_server_that_never_answers_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The port is open (the kernel completes the handshake) but nothing ever replies."""
    monkeypatch.setattr(tracking.store, "_PROBE_TIMEOUT", (0.5, 0.5))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(TrackingError, match=r"is unreachable \(timed out\); start it"):
            tracking.check_reachable(uri)


Reply = tuple[int, str, bytes]  # status, content type, body


@pytest.fixture
def web_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[[str, dict[str, str]], Reply]], str]]:
    """Start a plain `http.server` on 127.0.0.1 answering every GET with `reply(path, headers)`; its URL."""
    for variable in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers: list[ThreadingHTTPServer] = []

    def start(reply: Callable[[str, dict[str, str]], Reply]) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, content_type, body = reply(self.path, dict(self.headers))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # keep pytest's output clean
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def healthy_but_not_mlflow(path: str, headers: dict[str, str]) -> Reply:
    """Any web server: 200 on /health (which is why /health proves nothing), 404 elsewhere."""
    return (200, "text/plain", b"OK") if path == "/health" else (404, "text/html", b"<h1>Not Found</h1>")


def html_everywhere(path: str, headers: dict[str, str]) -> Reply:
    """A single-page app or a proxy's login page: 200 and HTML for any path."""
    return 200, "text/html", b"<html><body>Sign in</body></html>"


@pytest.mark.parametrize(("reply", "status"), [(healthy_but_not_mlflow, 404), (html_everywhere, 200)])
def test_web_server_that_is_not_mlflow_is_named_as_such(
    web_server: Callable[[Callable[[str, dict[str, str]], Reply]], str],
    reply: Callable[[str, dict[str, str]], Reply],
    status: int,
) -> None:
    uri = web_server(reply)
    with pytest.raises(TrackingError) as raised:
        tracking.check_reachable(uri)
    assert str(raised.value) == (
        f"the server at {uri} answered but is not an MLflow tracking server "
        f"(HTTP {status} on /api/2.0/mlflow/experiments/search); check MLFLOW_TRACKING_URI."
    )


def test_server_refusing_access_asks_for_credentials_and_gets_mlflows(
    web_server: Callable[[Callable[[str, dict[str, str]], Reply]], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe sends what MLflow's client sends (here MLFLOW_TRACKING_TOKEN), so a protected server passes."""

    def protected(path: str, headers: dict[str, str]) -> Reply:
        if headers.get("Authorization") != "Bearer s3cret":
            return 401, "application/json", b'{"error_code": "UNAUTHENTICATED", "message": "log in"}'
        assert path == "/api/2.0/mlflow/experiments/search?max_results=1"
        return 200, "application/json", json.dumps({"experiments": [{"experiment_id": "0"}]}).encode()

    uri = web_server(protected)
    with pytest.raises(TrackingError, match=r"refused access \(HTTP 401 on .*MLFLOW_TRACKING_TOKEN"):
        tracking.check_reachable(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cret")
    tracking.check_reachable(uri)


def test_mlflow_server_with_an_error_is_not_called_unreachable(
    web_server: Callable[[Callable[[str, dict[str, str]], Reply]], str],
) -> None:
    """MLflow's JSON error body (a broken backend database, say) means MLflow answered."""
    body = {"error_code": "INTERNAL_ERROR", "message": "(sqlite3.OperationalError) no such table: experiments\nSQL"}
    uri = web_server(lambda path, headers: (500, "application/json", json.dumps(body).encode()))
    with pytest.raises(TrackingError) as raised:
        tracking.check_reachable(uri)
    assert str(raised.value) == (
        f"the MLflow tracking server at {uri} answered with an error (HTTP 500 on "
        "/api/2.0/mlflow/experiments/search: INTERNAL_ERROR: (sqlite3.OperationalError) no such table: "
        "experiments); check the server and its log."
    )


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


def test_a_store_failing_to_open_the_experiment_is_one_line(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException

    def outdated(name: str) -> None:
        raise MlflowException("Detected out-of-date database schema (found version x).\nRun `mlflow db upgrade`.")

    monkeypatch.setattr(mlflow, "get_experiment_by_name", outdated)
    with pytest.raises(TrackingError) as raised:
        tracking.connect()
    assert str(raised.value) == (
        f"opening the experiment {tracking.EXPERIMENT} in the MLflow store {store} failed (MlflowException: "
        "Detected out-of-date database schema (found version x).); check MLFLOW_TRACKING_URI."
    )


def test_experiment_says_its_kind_and_holds_the_accuracy_view_also_when_it_existed(store: str) -> None:
    view_tag = f"mlflow.sharedViewState.{tracking.store.VIEW}"
    experiment_id = tracking.connect()  # a new store: created with its tags
    client = mlflow.MlflowClient()  # after `connect`, which points MLflow at this test's store
    tags = client.get_experiment(experiment_id).tags
    assert tags[tracking.store.KIND_TAG] == "custom_model_development"  # the MLflow UI's "Machine learning"
    view = json.loads(tags[view_tag])  # the envelope of the UI's saved views: name, createdAt, state
    assert view["name"] == tracking.store.VIEW and isinstance(view["createdAt"], int)
    columns = ["metrics.`val_accuracy`", "metrics.`test_accuracy`"]
    assert json.loads(view["state"])["selectedColumns"] == columns
    for key in (tracking.store.KIND_TAG, view_tag):  # a store from before the tags: they are added
        client.delete_experiment_tag(experiment_id, key)
    client.set_experiment_tag(experiment_id, view_tag, "a user's own view")  # ...but a user's change stays
    assert tracking.connect() == experiment_id
    tags = client.get_experiment(experiment_id).tags
    assert tags[tracking.store.KIND_TAG] == "custom_model_development" and tags[view_tag] == "a user's own view"


def test_readme_opens_the_view_the_experiment_holds_with_the_quick_command() -> None:
    command, link = readme_ui(REPO / "README.md")
    assert f"viewStateShareKey={tracking.store.VIEW}" in link and "workflowType=machine_learning" in link
    assert "--workers 1" in command and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in command  # docs/performance.md


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


def running_run(client: mlflow.MlflowClient, experiment_id: str, **tags: str) -> str:
    """A RUNNING run with these tags, as a training process leaves it when it dies without ending it."""
    return client.create_run(experiment_id, tags=tags).info.run_id


def test_runs_of_dead_processes_on_this_host_are_marked_killed(store: str, caplog: pytest.LogCaptureFixture) -> None:
    experiment_id = tracking.connect()
    client = mlflow.MlflowClient()
    here, me = socket.gethostname(), tracking.process_tags()
    gone = dead_pid()
    dead = running_run(client, experiment_id, host=here, pid=str(gone))
    reused = running_run(client, experiment_id, host=here, pid=me["pid"], pid_start="1")  # same pid, older process
    alive = running_run(client, experiment_id, **me)
    elsewhere = running_run(client, experiment_id, host=f"not-{here}", pid=str(gone))
    untagged = running_run(client, experiment_id)
    with caplog.at_level(logging.INFO, logger="pipeline.tracking"):
        ended = tracking.end_orphaned_runs(experiment_id)
    assert sorted(ended) == sorted([dead, reused])
    assert {run: run_status(run) for run in (dead, reused, alive, elsewhere, untagged)} == {
        dead: "KILLED",
        reused: "KILLED",
        alive: "RUNNING",
        elsewhere: "RUNNING",
        untagged: "RUNNING",
    }
    assert mlflow.get_run(dead).info.end_time is not None
    assert sorted(r.getMessage() for r in caplog.records if r.name == "pipeline.tracking") == sorted(
        f"MLflow run {run} was left RUNNING by process {pid} on {here}, which no longer exists; marked KILLED"
        for run, pid in ((dead, gone), (reused, me["pid"]))
    )
    assert tracking.end_orphaned_runs(experiment_id) == []  # KILLED runs are not RUNNING any more


def test_every_run_names_its_process_also_when_resumed(store: str) -> None:
    with tracking.run(tags={"params_md5": "x"}) as run_id:
        tags = mlflow.get_run(run_id).data.tags
    assert tags["params_md5"] == "x"
    assert {key: tags[key] for key in ("host", "pid", "pid_start")} == tracking.process_tags()
    assert tags["pid"] == str(os.getpid())
    # evaluate resumes the run that train (another process, now ended) left FINISHED: the run is ours now
    mlflow.MlflowClient().set_tag(run_id, "pid", str(dead_pid()))
    with tracking.resume(run_id):
        assert mlflow.get_run(run_id).data.tags["pid"] == str(os.getpid())
        assert tracking.end_orphaned_runs(mlflow.get_run(run_id).info.experiment_id) == []
    assert run_status(run_id) == "FINISHED"


@pytest.mark.e2e  # runs the real command in a process of its own
def test_run_killed_with_sigkill_is_ended_by_the_next_run(store: str) -> None:
    """A real training process killed with kill -9 leaves its run RUNNING; the next `tracking.run` ends it."""
    tracking.connect()  # this process reads the test's store too
    script = (
        "import time\nfrom pipeline import tracking\n"
        "with tracking.run() as run_id:\n    print(run_id, flush=True)\n    time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        orphan = child.stdout.readline().strip()  # the run exists and is RUNNING
        assert run_status(orphan) == "RUNNING"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert run_status(orphan) == "RUNNING", "SIGKILL leaves no chance to end the run"
    with tracking.run() as run_id:
        assert run_status(orphan) == "KILLED"
    assert run_status(run_id) == "FINISHED"


# --- a damaged or locked SQLite store ---------------------------------------------------------------


HOLD = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def holding(database: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding `database` under an exclusive lock for `seconds`, once it says so."""
    command = [sys.executable, "-c", HOLD, str(database), str(seconds)]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_a_damaged_store_is_named_with_what_to_do(store: str, damage: str) -> None:
    database = tracking.sqlite_path(store)
    assert database is not None
    if damage == "truncated":
        os.truncate(database, 100)  # the header, and nothing of the schema
    else:
        database.write_bytes(os.urandom(50_000))
    kept = database.read_bytes()
    with pytest.raises(TrackingError) as caught:
        tracking.connect()
    message = str(caught.value)
    assert message.startswith(f"the MLflow database {database} is damaged (")
    assert f"`mv {database} {database}.damaged`" in message and "restore it from a backup" in message
    assert database.read_bytes() == kept, "the damaged file is left for the user to rescue"


@pytest.mark.e2e  # another process of its own holds the lock
def test_a_store_locked_too_long_names_the_holder(store: str, caplog: pytest.LogCaptureFixture) -> None:
    database = tracking.sqlite_path(store)
    assert database is not None
    holder = holding(database, 60)
    try:
        started = time.monotonic()
        with pytest.raises(TrackingError) as caught:
            tracking.sqlite.check(database, wait=3)
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert 2.5 < waited < 10
    assert f"locked by process {holder.pid} (`{sys.executable} -c" in caplog.text and "waiting up to 3 s" in caplog.text
    message = str(caught.value)
    assert message.startswith(f"the MLflow database {database} is locked by process {holder.pid} (")
    assert "for more than 3 s; let it finish or end it, then run again" in message


@pytest.mark.e2e  # another process of its own holds the lock
def test_a_store_locked_for_a_moment_is_waited_for(store: str, caplog: pytest.LogCaptureFixture) -> None:
    database = tracking.sqlite_path(store)
    assert database is not None
    holder = holding(database, 4)
    try:
        tracking.sqlite.check(database, wait=30)  # returns once the holder has let go
    finally:
        holder.wait()
    assert f"is locked by process {holder.pid}" in caplog.text


def test_a_read_only_store_is_enough_to_read(store: str, tmp_path: Path) -> None:
    database = tracking.sqlite_path(store)
    assert database is not None
    database.chmod(0o444)
    try:
        tracking.sqlite.check(database, wait=1, writing=False)
        if os.geteuid() != 0:  # root writes read-only files
            with pytest.raises(TrackingError, match="cannot be used"):
                tracking.sqlite.check(database, wait=1)
    finally:
        database.chmod(0o644)
