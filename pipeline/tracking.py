"""Everything MLflow: where the store is, one run per training, and what each run records.

The default store is SQLite, `mlflow.db` at the repository root, with artifacts in `mlartifacts/`
beside it, both found by absolute path: DVC runs `--temp` and queued experiments in copies under
`.dvc/tmp/exps/`, and a store resolved from the current directory would silently lose those runs.
`MLFLOW_TRACKING_URI` overrides the store (a team's `mlflow server`, say).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict
from io import StringIO
from pathlib import Path
from typing import Any

import requests
from filelock import FileLock

from pipeline.errors import Terminated, TrackingError
from pipeline.timing import process_start

log = logging.getLogger("pipeline.tracking")

EXPERIMENT = "mnist-batchnorm"
REGISTERED_MODEL = "mnist-bn-mlp"
CHAMPION = "champion"
# A dead or firewalled host fails within seconds; a live MLflow worker may take a while to answer its
# first query (it opens the database), which is no reason to call it unreachable.
_PROBE_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds
# Every MLflow tracking server answers this with a JSON object; `/health` would not do: any web server
# may answer 200 there.
PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
_NO_ANSWER = (  # (text in the error of `requests`, what the message says)
    ("Connection refused", "connection refused"),
    ("timed out", "timed out"),
    ("Failed to resolve", "unknown host name"),
    ("CERTIFICATE_VERIFY_FAILED", "its TLS certificate is not trusted"),
)
_SQLITE_TIMEOUT = 60
# Tags naming the process that holds a run RUNNING, so a later run can tell one whose process was
# killed (kill -9, OOM killer, power loss) from one still training.
HOST_TAG, PID_TAG, PID_START_TAG = "host", "pid", "pid_start"
PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "plots")

# Fail fast against a server that is down instead of MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def project_root(start: Path | None = None) -> Path:
    """The repository the command runs in: the nearest folder up from `start` (the current directory)
    holding dvc.yaml, mapped from DVC's experiment copies under `<root>/.dvc/tmp/exps/` to `<root>`, so
    queued and `--temp` experiments log into the main repository's store. Independent of where the
    package is installed."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return next((folder for folder in (here, *here.parents) if (folder / "dvc.yaml").is_file()), here)


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else the SQLite store at the repository root.

    The busy timeout lets concurrent writers (`dvc queue start -j 2`) wait for each other's short
    transactions instead of failing with "database is locked" after SQLite's default 5 s.
    """
    default = f"sqlite:///{project_root() / 'mlflow.db'}?timeout={_SQLITE_TIMEOUT}"
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go to `mlartifacts/` beside the database, never into the current
    directory (MLflow's default); a server keeps its own artifact store."""
    database = sqlite_path(uri)
    return (database.parent / "mlartifacts").as_uri() if database else None


def check_reachable(uri: str) -> None:
    """Fail within seconds, before any training, if the tracking store cannot be used.

    A server is asked what MLflow itself would ask (with MLflow's credentials: MLFLOW_TRACKING_USERNAME,
    MLFLOW_TRACKING_TOKEN, ...), so that "nothing answers", "answers but is not MLflow" and "MLflow, but
    refuses us" each get their own message.
    """
    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
    elif (database := sqlite_path(uri)) and not database.parent.is_dir():
        raise TrackingError(
            f"the folder of the MLflow database {uri} does not exist; create it or fix MLFLOW_TRACKING_URI."
        )


def _unanswered(error: Exception) -> str:
    """Why no HTTP answer came: "connection refused", "timed out", ... from the `requests` error MLflow wraps."""
    cause = error.__cause__ or error.__context__ or error
    text = str(cause)
    for marker, reason in _NO_ANSWER:
        if marker in text:
            return reason
    return type(cause).__name__ if isinstance(cause, requests.RequestException) else text.splitlines()[0][:200]


def _probe_server(uri: str) -> None:
    """One GET of `PROBE`, no retries; a TrackingError saying what answered, if anything, unless MLflow did."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(uri), PROBE, "GET", max_retries=0, timeout=_PROBE_TIMEOUT, raise_on_status=False
        )
    except MlflowException as error:  # MLflow wraps the connection error or timeout of `requests`
        raise TrackingError(
            f"the MLflow tracking server at {uri} is unreachable ({_unanswered(error)}); "
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
            f"the server at {uri} refused access ({answered}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for it, or check MLFLOW_TRACKING_URI."
        )
    if isinstance(body, dict) and "error_code" in body:  # MLflow's own error format: it is MLflow, but failing
        message = str(body.get("message", "")).splitlines()[:1]
        raise TrackingError(
            f"the MLflow tracking server at {uri} answered with an error ({answered}: {body['error_code']}"
            f"{': ' + message[0] if message else ''}); check the server and its log."
        )
    raise TrackingError(
        f"the server at {uri} answered but is not an MLflow tracking server ({answered}); check MLFLOW_TRACKING_URI."
    )


def connect() -> str:
    """Point MLflow at the store and make sure the experiment exists; return its id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    database = sqlite_path(uri)
    # Two queued experiments may start on a store that does not exist yet: one process creates the
    # tables and the experiment while the other waits, instead of both racing to create them.
    with FileLock(f"{database}.lock") if database else nullcontext():
        try:
            experiment = mlflow.get_experiment_by_name(EXPERIMENT)
            if experiment is not None:
                return experiment.experiment_id
            try:
                return mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location(uri))
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # on a server the file lock does not apply: another process created it a moment ago
                return mlflow.get_experiment_by_name(EXPERIMENT).experiment_id  # type: ignore[union-attr]
        except MlflowException as error:
            reason = error.message.splitlines()[0]
            raise TrackingError(f"the MLflow store {uri} is unusable ({reason}); check MLFLOW_TRACKING_URI.") from None


def process_tags() -> dict[str, str]:
    """`host`, `pid` and, where /proc exists, `pid_start` of this process."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    if start := process_start(os.getpid()):
        tags[PID_START_TAG] = start
    return tags


def _process_gone(pid: int, start: str | None) -> bool:
    """Whether the process that tagged a run on this host has ended (or its pid now names another)."""
    if Path("/proc/self/stat").exists():
        now = process_start(pid)
        return now is None or (start is not None and now != start)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, another user's
        return False
    return False


def end_orphaned_runs(client: Any | None, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of the experiment whose process, on this host, no longer exists.

    A process killed with SIGKILL cannot end its run, which would otherwise stay RUNNING forever. Runs
    tagged by another host, or without the process tags (older runs), are left alone: their process may
    be alive where we cannot see it. Returns the ids of the runs it ended.
    """
    from mlflow import MlflowClient

    client = client or MlflowClient()
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.{HOST_TAG} = '{host}'"
    ended: list[str] = []
    page_token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=page_token)
        for found in page:
            tags = found.data.tags
            pid = tags.get(PID_TAG, "")
            if not pid.isdigit() or not _process_gone(int(pid), tags.get(PID_START_TAG)):
                continue
            client.set_terminated(found.info.run_id, "KILLED")
            ended.append(found.info.run_id)
            log.info(
                "MLflow run %s was left RUNNING by process %s on %s, which no longer exists; marked KILLED",
                found.info.run_id,
                pid,
                host,
            )
        page_token = page.token
        if not page_token:
            return ended


@contextmanager
def run(run_id: str | None = None, **start_kwargs: Any) -> Iterator[str]:
    """Start (or resume, with `run_id`) a run and yield its id. It never stays RUNNING: a new run ends
    KILLED on Ctrl-C/SIGTERM and FAILED on error, and, if this process is killed outright, KILLED by the
    next run on this host (`end_orphaned_runs`). A resumed run (evaluation logging into its training)
    that fails gets its earlier status back, with the tag `resume_failed`: a finished training stays so."""
    import mlflow
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    experiment_id = connect()
    end_orphaned_runs(None, experiment_id)
    tags = {**(start_kwargs.pop("tags", None) or {}), **process_tags()}
    client = mlflow.MlflowClient()
    earlier = client.get_run(run_id).info.status if run_id else None
    if run_id:  # re-tag before the run is RUNNING again, so no sweep sees it with its old, dead process
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    active = mlflow.start_run(
        run_id=run_id, experiment_id=None if run_id else experiment_id, tags=None if run_id else tags, **start_kwargs
    )

    def end(status: str, reason: str) -> None:
        try:
            if earlier:
                client.set_tag(active.info.run_id, "resume_failed", reason)
            mlflow.end_run(earlier or status)
        except (MlflowException, OSError, requests.RequestException):
            pass  # the store itself is failing: the error being raised says so

    try:
        yield active.info.run_id
    except (KeyboardInterrupt, Terminated):
        end("KILLED", "interrupted")
        raise
    except (MlflowException, OSError, requests.RequestException) as error:
        # the stage's own file errors are PipelineErrors already: what is left is the store failing
        reason = str(getattr(error, "message", "") or error).strip().splitlines()[0]
        end("FAILED", reason)
        raise TrackingError(
            f"recording the run in the MLflow store {tracking_uri()} failed ({type(error).__name__}: {reason}); "
            "check the store (disk, permissions, server) and run again. The previous outputs were left as they were."
        ) from None
    except BaseException as error:
        end("FAILED", str(error).splitlines()[0] if str(error) else type(error).__name__)
        raise
    else:
        mlflow.end_run("FINISHED")


def resume(run_id: str) -> AbstractContextManager[str]:
    """Re-open the run that trained the model, with a clear error if this store does not have it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    connect()
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        raise TrackingError(
            f"MLflow run {run_id} (named in metrics/train.json) is not in the store {tracking_uri()}; "
            "point MLFLOW_TRACKING_URI at the store that trained the model, or run `dvc repro -f train`."
        ) from None
    return run(run_id=run_id)


def dvc_experiment() -> str | None:
    """The name of the DVC experiment being run (`dvc exp run` sets it), else None."""
    return os.environ.get("DVC_EXP_NAME")


def log_params(flat: dict[str, Any]) -> None:
    """Every params.yaml value of the active run, as `section.key`."""
    import mlflow

    mlflow.log_params(flat)


def log_files(files: dict[Path, bytes | str]) -> None:
    """Artifacts of the active run, each under its path in the repository (`plots/confusion.png`)."""
    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        for path, content in files.items():
            local = Path(folder) / path.name
            if isinstance(content, str):
                local.write_text(content, encoding="utf-8")
            else:
                local.write_bytes(content)
            mlflow.log_artifact(str(local), artifact_path=path.parent.as_posix())


def log_history(run_id: str, history: Sequence[Any], finished_ms: Sequence[int] | None = None) -> None:
    """Per-epoch metrics of `EpochResult`s (step = epoch), sent in a few batched requests."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH

    now = int(time.time() * 1000)
    stamps = finished_ms or [now] * len(history)
    metrics = [
        Metric(key, value, stamp, result.epoch)
        for result, stamp in zip(history, stamps, strict=True)
        for key, value in asdict(result).items()
        if key != "epoch"
    ]
    client = MlflowClient()
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])


def log_training(run_id: str, history: Sequence[Any], train_seconds: float, files: dict[Path, bytes | str]) -> None:
    """The curves, the training time and the stage's plots; logged after the loop, outside its timing."""
    import mlflow

    log_history(run_id, history)
    mlflow.log_metric("train_seconds", train_seconds)
    log_files(files)


def _version_of(run_id: str) -> Any | None:
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(f"name = '{REGISTERED_MODEL}' and run_id = '{run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def promote_if_better(run_id: str, val_accuracy: float) -> bool:
    """Tag the run's model version with its validation accuracy, and move the `champion` alias to it
    only if it is strictly better than the champion's (the test set never chooses); say if it moved."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    version = _version_of(run_id)
    if version is None:
        return False
    client = MlflowClient()
    client.set_model_version_tag(REGISTERED_MODEL, version.version, "val_accuracy", f"{val_accuracy:.6f}")
    try:
        champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
        best = float(champion.tags.get("val_accuracy", "-1"))
    except MlflowException:  # no champion yet
        best = -1.0
    if val_accuracy <= best:
        return False
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version.version)
    return True


def record_test_accuracy(run_id: str, test_accuracy: float) -> None:
    """Tag the run's model version with its test accuracy: reported beside it, never used to choose."""
    from mlflow import MlflowClient

    if version := _version_of(run_id):
        MlflowClient().set_model_version_tag(REGISTERED_MODEL, version.version, "test_accuracy", f"{test_accuracy:.6f}")


def file_md5(path: Path) -> str:
    """The MD5 that DVC records for a file in dvc.lock, so a run can be matched to its data."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def data_tags(files: dict[str, Path]) -> dict[str, str]:
    """`data_md5.<split>` tags: the same MD5s that dvc.lock records for the prepared data."""
    return {f"data_md5.{name}": file_md5(path) for name, path in files.items()}


def lineage_tags(params_file: Path, data_files: dict[str, Path]) -> dict[str, str]:
    """Tags that lead from a run back to its code, configuration, data and DVC experiment."""
    tags = {"params_md5": file_md5(params_file), **data_tags(data_files)}
    if commit := _git("rev-parse", "HEAD"):
        tags["git_commit"] = commit
        # Dirty = a tracked input differs from the commit; the pipeline's own outputs (dvc.lock, the
        # metrics and plots it rewrites) are not inputs and would otherwise make every run dirty.
        outputs = (f":!{path}" for path in PIPELINE_OUTPUTS)
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *outputs)
        tags["git_dirty"] = str(bool(changed)).lower()
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = exp_name
    return tags


def log_datasets(splits: dict[str, Any], context: str, digests: dict[str, str]) -> None:
    """Record each split (an `io.Split`) as an MLflow dataset input of the active run. Its digest is the
    MD5 of its file, as in dvc.lock (`data_tags`), instead of MLflow's hash of a copy of the arrays."""
    import mlflow
    from mlflow.data.numpy_dataset import from_numpy

    for name, split in splits.items():
        dataset = from_numpy(split.x, targets=split.y, name=f"mnist-{name}", digest=digests[name])
        mlflow.log_input(dataset, context=f"{context}:{name}" if name != context else context)


def log_model(model: Any, example: Any) -> str:
    """Log the model with a softmax head (it serves class probabilities), a signature and an example into
    the active run, and register it as a new version of `mnist-bn-mlp`; return the version."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    from pipeline.model import with_softmax
    from pipeline.quiet import filtered_stderr

    served = with_softmax(model)
    signature = infer_signature(example, served(example).numpy())
    # MLflow checks the input example by reloading the model and predicting it: Keras' progress bar (on
    # stdout) and TensorFlow's C++ log lines of that check are noise, and so is the registry's chatter.
    with contextlib.redirect_stdout(StringIO()), filtered_stderr():
        # The TensorFlow flavour (it saves Keras 3 models in the native .keras format): the Keras
        # flavour of MLflow 3.17 fails when given an input example (mlflow/mlflow#16183).
        info = mlflow.tensorflow.log_model(
            served,
            name="model",
            signature=signature,
            input_example=example,
            registered_model_name=REGISTERED_MODEL,
            # Stated, not inferred: inference re-imports TensorFlow in a subprocess, seconds per run.
            pip_requirements=[f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"],
        )
    return str(info.registered_model_version)
