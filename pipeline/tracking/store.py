"""Where the MLflow store is, whether it answers, and the one translation of MLflow's errors.

The default store is SQLite, `mlflow.db` at the repository root, with artifacts in `mlartifacts/`
beside it, both found by absolute path: DVC runs `--temp` and queued experiments in copies under
`.dvc/tmp/exps/`, and a store resolved from the current directory would silently lose those runs.
`MLFLOW_TRACKING_URI` overrides the store (a team's `mlflow server`, say, or its PostgreSQL database
directly); messages show it without its password (`secrets.redacted`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any

import requests
from filelock import FileLock

from pipeline import database, quiet
from pipeline.config import project_root
from pipeline.errors import StoreUnavailableError, TrackingError, chain, first_line, unanswered
from pipeline.secrets import redacted
from pipeline.tracking import sqlite

EXPERIMENT = "mnist-batchnorm"
# What the MLflow UI reads from the experiment's tags: its kind (the UI's "Machine learning", not GenAI),
# and a saved view of the runs list (`mlflow.sharedViewState.<key>`, the envelope the UI's *Views* menu
# writes) whose columns are the validation and test accuracy; the README's link opens it by its key.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
VIEW = "accuracy"
_COLUMNS = ["metrics.`val_accuracy`", "metrics.`test_accuracy`"]
# A dead or firewalled host fails within seconds; a live MLflow worker may take a while to answer its
# first query (it opens the database), which is no reason to call it unreachable.
_PROBE_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds
# Every MLflow tracking server answers this with a JSON object; `/health` would not do: any web server
# may answer 200 there.
PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
_SQLITE_TIMEOUT = 60
# How MLflow behaves for the pipeline, set before MLflow is first imported (`mlflow_module`): fail fast
# against a server that is down instead of minutes of retries, no download bars, no INFO chatter, and
# no "View run at <server URL>" lines on stdout (they print the URL as given, password included).
_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",  # a server that stopped answering is said within a minute
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}  # `quick_requests`


def mlflow_module() -> ModuleType:
    """`mlflow`, imported with the pipeline's settings (a user's own environment variables win)."""
    for name, value in {**_SETTINGS, **({} if quiet.VERBOSE else {"MLFLOW_LOGGING_LEVEL": "WARNING"})}.items():
        os.environ.setdefault(name, value)
    if not quiet.VERBOSE:  # urllib3's "Retrying (Retry(total=1, ...))" lines: the error line says what failed
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    import mlflow

    return mlflow


def mlflow_client() -> Any:
    """An `MlflowClient` of the store MLflow is pointed at (`connect`), MLflow imported by `mlflow_module`."""
    return mlflow_module().MlflowClient()


@contextmanager
def quick_requests(error: BaseException) -> Iterator[None]:
    """For the cleanup after `error` (ending the run, sending what is left): if the store stopped
    answering (`unavailable`), one attempt of a few seconds per request, not every retry again. Then the
    settings are as before, or as `mlflow_module` sets them where they were not set."""
    saved = {name: os.environ.get(name, _SETTINGS[name]) for name in _QUICK}
    if unavailable(error):
        os.environ.update(_QUICK)
    try:
        yield
    finally:
        os.environ.update(saved)


def store_failures() -> tuple[type[BaseException], ...]:
    """What a failing store raises through MLflow: its own errors, file errors, HTTP errors."""
    from mlflow.exceptions import MlflowException

    return (MlflowException, OSError, requests.RequestException)


# urllib3's words when MLflow's retries of a 5xx answer ran out (503: the server's database is away)
_RETRIES_RAN_OUT = re.compile(r"too many \d+ error responses")


def unavailable(error: BaseException) -> str | None:
    """If the store is away for now rather than wrong (its server refuses connections or times out, or
    keeps answering 5xx because its database is down; a database store lost its server), the short
    why; else None."""
    from mlflow.exceptions import MlflowException

    if lost := database.connection_lost(error):
        return redacted(lost, tracking_uri())
    for current in chain(error):
        if isinstance(current, MlflowException) and current.error_code == "TEMPORARILY_UNAVAILABLE":
            return "the server says its store is temporarily unavailable"
        if match := _RETRIES_RAN_OUT.search(str(current)):
            return f"the server answered {match[0]}"
        if isinstance(current, (requests.ConnectionError, requests.Timeout)):
            return unanswered(current)
    return None


STORE_FIX = "check the store (disk, permissions, server) and run again"


def refused(error: BaseException) -> str | None:
    """If a server with authentication (`mlflow server --app-name basic-auth`) refused the request, who
    may not do what, and how to get the permission; else None."""
    from mlflow.exceptions import MlflowException

    for found in chain(error):
        if isinstance(found, MlflowException) and found.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            request = re.search(r"endpoint (\S+) failed with error code (\d+)", found.message)
            said = f"HTTP {request[2]} on {request[1]}" if request else found.error_code
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            if found.error_code == "UNAUTHENTICATED" or not user:
                return (
                    f"the server refused {'user ' + user if user else 'a request without a user'} ({said}); set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of the server"
                )
            return (
                f"user {user} may not write there ({said}: permission denied); ask an admin of the server to grant "
                f"{user} EDIT on the experiment {EXPERIMENT} and on the registered model mnist-bn-mlp "
                "(docs/team.md, Authentication), then run again"
            )
    return None


def failure(what: str, error: BaseException, fix: str = STORE_FIX, after: str = "") -> str:
    """The one sentence for a store that failed while doing `what`: a refused permission (`refused`) or a
    damaged or locked SQLite file (`sqlite.problem`) said as such, anything else with MLflow's reason
    and `fix`; then `after`, if given."""
    db_file = sqlite_path(tracking_uri())
    if why := refused(error):
        text = f"{what} in the MLflow store {shown_store()} was refused: {why}"
    elif db_file and (found := sqlite.cause(error)) and (problem := sqlite.problem(db_file, found)):
        text = f"{what} failed: {problem}"
    elif (away := unavailable(error)) and not db_file:
        text = f"{what} in the MLflow store {shown_store()} failed: it did not answer ({away}); {fix}"
    else:
        text = f"{what} in the MLflow store {shown_store()} failed ({type(error).__name__}: {first_line(error)}); {fix}"
    return f"{text}." + (f" {after}." if after else "")


@contextmanager
def store_errors(what: str, fix: str = STORE_FIX, after: str = "") -> Iterator[None]:
    """The one translation of a failing store into the project's one-line TrackingError; a store that
    is only away for now (`unavailable`) raises its StoreUnavailableError kind, which a caller may wait out."""
    try:
        yield
    except store_failures() as error:
        message = failure(what, error, fix, after)
        if reason := unavailable(error):
            raise StoreUnavailableError(message, reason) from None
        raise TrackingError(message) from None


def probe() -> None:
    """One cheap query of the store (through its server, if any); StoreUnavailableError while it is away."""
    with store_errors("asking for the experiment"):
        mlflow_client().get_experiment_by_name(EXPERIMENT)


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else the SQLite store at the repository root.

    Concurrent writers (`dvc queue start -j 2`, search workers) wait for each other's transactions
    instead of failing with "database is locked": MLflow sets a 20 s busy timeout on each of its own
    sessions; this URL's 60 s covers what it runs outside them (creating and migrating the tables).
    """
    default = f"sqlite:///{project_root() / 'mlflow.db'}?timeout={_SQLITE_TIMEOUT}"
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def shown_store() -> str:
    """The store's URI as messages and log lines name it: without its password (`secrets.redacted`)."""
    return redacted(tracking_uri())


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go to `mlartifacts/` beside the database, never into the current
    directory (MLflow's default); a server keeps its own artifact store."""
    db_file = sqlite_path(uri)
    return (db_file.parent / "mlartifacts").as_uri() if db_file else None


def check_reachable(uri: str, writing: bool = True) -> None:
    """Fail within seconds, before any training, if the tracking store cannot be used.

    A server is asked what MLflow itself would ask (with MLflow's credentials: MLFLOW_TRACKING_USERNAME,
    MLFLOW_TRACKING_TOKEN, ...), so that "nothing answers", "answers but is not MLflow" and "MLflow, but
    refuses us" each get their own message. A SQLite file's folder must exist, and the file is checked
    for damage and for another process holding it locked (`sqlite.check`; for reading only, unless
    `writing`). A database server must take connections: MLflow would retry for minutes, then end in a
    traceback.
    """
    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
    elif db_file := sqlite_path(uri):
        if not db_file.parent.is_dir():
            raise TrackingError(
                f"the folder of the MLflow database {redacted(uri)} does not exist; create it or fix "
                "MLFLOW_TRACKING_URI."
            )
        sqlite.check(db_file, _SQLITE_TIMEOUT, writing)
    elif uri.startswith("sqlite") or not database.check_driver(uri, "MLFLOW_TRACKING_URI"):
        return  # an in-memory SQLite database, or no database server
    elif reason := database.unusable(uri):
        raise TrackingError(
            f"the MLflow database {redacted(uri)} cannot be used ({reason}); start its server, or "
            "fix MLFLOW_TRACKING_URI."
        )


def _probe_server(uri: str) -> None:
    """One GET of `PROBE`, no retries; a TrackingError saying what answered, if anything, unless MLflow did."""
    mlflow_module()
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(uri), PROBE, "GET", max_retries=0, timeout=_PROBE_TIMEOUT, raise_on_status=False
        )
    except MlflowException as error:  # MLflow wraps the connection error or timeout of `requests`
        raise TrackingError(
            f"the MLflow tracking server at {redacted(uri)} is unreachable ({unanswered(error)}); "
            "start it, or unset MLFLOW_TRACKING_URI to use the local store."
        ) from None
    try:
        body = response.json()
    except ValueError:
        body = None
    answered = f"HTTP {response.status_code} on {PROBE.split('?')[0]}"
    if response.status_code == 200 and isinstance(body, dict) and set(body) <= {"experiments", "next_page_token"}:
        return
    if response.status_code in (401, 403):
        raise TrackingError(
            f"the server at {redacted(uri)} refused access ({answered}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for it, or check MLFLOW_TRACKING_URI."
        )
    if isinstance(body, dict) and "error_code" in body:  # MLflow's own error format: it is MLflow, but failing
        message = str(body.get("message", "")).splitlines()[:1]
        raise TrackingError(
            f"the MLflow tracking server at {redacted(uri)} answered with an error ({answered}: {body['error_code']}"
            f"{': ' + message[0] if message else ''}); check the server and its log."
        )
    raise TrackingError(
        f"the server at {redacted(uri)} answered but is not an MLflow tracking server ({answered}); "
        "check MLFLOW_TRACKING_URI."
    )


def use_store(uri: str) -> ModuleType:
    """`mlflow` (`mlflow_module`), pointed at `uri` for runs and for the model registry."""
    mlflow = mlflow_module()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow


def connect() -> str:
    """Point MLflow at the store and make sure the experiment exists; return its id."""
    uri = tracking_uri()
    mlflow = use_store(uri)
    from mlflow.exceptions import MlflowException

    db_file = sqlite_path(uri)
    # Two queued experiments may start on a store that does not exist yet: one process creates the
    # tables and the experiment while the other waits, instead of both racing to create them (and the
    # waiting one would see the new file locked by the other). No lock file in a folder that does not
    # exist: `check_reachable` says so instead.
    with FileLock(f"{db_file}.lock") if db_file and db_file.parent.is_dir() else nullcontext():
        check_reachable(uri)
        try:
            experiment = mlflow.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                try:
                    return str(mlflow.create_experiment(EXPERIMENT, artifact_location(uri), experiment_tags()))
                except MlflowException as error:
                    if error.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                # on a server the file lock does not apply: another process created it a moment ago
                experiment = mlflow.get_experiment_by_name(EXPERIMENT)
            for key, value in experiment_tags().items():  # a store from before: the tags a user changed stay
                if key not in experiment.tags:
                    mlflow_client().set_experiment_tag(experiment.experiment_id, key, value)
            return str(experiment.experiment_id)
        except Exception as error:  # MLflow's errors, and SQLAlchemy's raised while MLflow opens the database
            if db_file and (found := sqlite.cause(error)):
                raise TrackingError(f"{sqlite.unusable(db_file, found)}. Nothing was changed.") from None
            if not isinstance(error, MlflowException):
                raise
            what = f"opening the experiment {EXPERIMENT}"
            raise TrackingError(failure(what, error, "check MLFLOW_TRACKING_URI")) from None


def experiment_tags() -> dict[str, str]:
    """The experiment's kind and its saved runs view `VIEW` (the runs list with `_COLUMNS`)."""
    state = json.dumps({"selectedColumns": _COLUMNS, "columnOrder": _COLUMNS})
    view = {"name": VIEW, "createdAt": int(time.time() * 1000), "state": state}
    return {KIND_TAG: KIND, f"mlflow.sharedViewState.{VIEW}": json.dumps(view)}
