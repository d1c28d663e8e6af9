"""Runs: one run per training (resumed by evaluation), child runs of a search, and what they record.

A run never stays RUNNING: it ends KILLED on Ctrl-C/SIGTERM and FAILED on error, and if its process is
killed outright, the next run on the same host marks it KILLED (each run records its host and process).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from pipeline import processes, quiet
from pipeline.errors import Terminated, TrackingError, first_line
from pipeline.tracking.registry import logged_model_id
from pipeline.tracking.store import (
    connect,
    failure,
    mlflow_client,
    mlflow_module,
    quick_requests,
    shown_store,
    store_errors,
    store_failures,
)

log = logging.getLogger("pipeline.tracking")

# Tags naming the process that holds a run RUNNING, so a later run can tell one whose process was
# killed (kill -9, OOM killer, power loss) from one still training.
HOST_TAG, PID_TAG, PID_START_TAG = "host", "pid", "pid_start"
# How often MLflow samples a training's system metrics: a few points on a 10-second training, one every
# second on a long one (MLflow's default, 10 s, leaves most trainings here with none).
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_SECONDS = 1.0
PARAMS_ARTIFACT = "params.json"  # every parameter exactly, where one is longer than MLflow keeps


def process_tags() -> dict[str, str]:
    """`host`, `pid` and `pid_start` (`processes.start`) of this process."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    if start := processes.start(os.getpid()):
        tags[PID_START_TAG] = start
    return tags


def process_ended(tags: dict[str, str]) -> bool:
    """Whether the process that `process_tags()` describes has ended; False for one on another host,
    where nothing here can tell."""
    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) != socket.gethostname() or not pid.isdigit():
        return False
    return processes.gone(int(pid), tags.get(PID_START_TAG))


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of the experiment whose process, on this host, no longer exists.

    A process killed with SIGKILL cannot end its run, which would otherwise stay RUNNING forever. Runs
    tagged by another host, or without the process tags (older runs), are left alone: their process may
    be alive where we cannot see it. Returns the ids of the runs it ended.
    """
    mlflow = mlflow_module()
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.{HOST_TAG} = '{host}'"
    ended: list[str] = []
    for found in mlflow.search_runs([experiment_id], query, output_format="list"):  # every page, up to 100,000
        if process_ended(found.data.tags):
            mlflow_client().set_terminated(found.info.run_id, "KILLED")
            ended.append(found.info.run_id)
            log.info(
                "MLflow run %s was left RUNNING by process %s on %s, which no longer exists; marked KILLED",
                found.info.run_id,
                found.data.tags[PID_TAG],
                host,
            )
    return ended


@contextmanager
def run(run_id: str | None = None, **start_kwargs: Any) -> Iterator[str]:
    """Start (or resume, with `run_id`) a run and yield its id. It never stays RUNNING: a new run ends
    KILLED on Ctrl-C/SIGTERM and FAILED on error, and, if this process is killed outright, KILLED by the
    next run on this host (`end_orphaned_runs`). A resumed run (evaluation logging into its training)
    that fails gets its earlier status back, with the tag `resume_failed`: a finished training stays so."""
    experiment_id = connect()
    mlflow = mlflow_module()
    tags = {**(start_kwargs.pop("tags", None) or {}), **process_tags()}
    with store_errors("starting the run", after="Nothing was changed"):
        end_orphaned_runs(experiment_id)
        earlier = run_status(run_id) if run_id else None
        if run_id:  # re-tag before the run is RUNNING again, so no sweep sees it with its old, dead process
            log_run(run_id, tags=tags)
        active = mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else experiment_id,
            tags=None if run_id else tags,
            **start_kwargs,
        )

    try:
        yield active.info.run_id
    except BaseException as error:
        interrupted = isinstance(error, (KeyboardInterrupt, Terminated))
        ended = True
        with quick_requests(error):  # the store may be what failed
            try:
                if earlier:
                    mlflow.set_tag("resume_failed", "interrupted" if interrupted else first_line(error))
                mlflow.end_run(earlier or ("KILLED" if interrupted else "FAILED"))
            except store_failures():
                ended = False  # the store itself is failing: the error being raised says so
        if not isinstance(error, store_failures()):
            raise
        # the stage's own file errors are PipelineErrors already: what is left is the store failing
        after = "The previous outputs were left as they were"
        if not ended and not earlier:
            after += f"; the run could not be ended either: the next run on {socket.gethostname()} marks it KILLED"
        raise TrackingError(failure("recording the run", error, after=after)) from None
    mlflow.end_run("FINISHED")


def resume(run_id: str) -> AbstractContextManager[str]:
    """Re-open the run that trained the model, with a clear error if this store does not have it."""
    connect()
    if not run_exists(run_id):
        raise TrackingError(
            f"MLflow run {run_id} (named in runs/train.json) is not in the store {shown_store()}; "
            "point MLFLOW_TRACKING_URI at the store that trained the model, or run `dvc repro -f train`."
        )
    return run(run_id=run_id)


@contextmanager
def system_metrics(run_id: str) -> Iterator[None]:
    """While the block runs, MLflow's own monitor samples this machine's CPU and memory use (disk and
    network too, and the GPU where one and its driver's Python binding are installed) into the run as
    `system/...` metrics, every `SYSTEM_METRICS_SECONDS`."""
    mlflow_module()
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    if not quiet.VERBOSE:  # a failing store's warnings: the run's one error line says it
        logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.CRITICAL)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_SECONDS)
    monitor.start()
    try:
        yield
    except BaseException as error:
        with quick_requests(error):
            monitor.finish()
        raise
    monitor.finish()  # stops the sampling and sends what it holds, before the run ends


def log_params(flat: dict[str, Any]) -> None:
    """Every params.yaml value of the active run, as `section.key` (`log_run`)."""
    log_run(mlflow_module().active_run().info.run_id, params=flat)


def log_files(files: dict[Path, bytes | str]) -> None:
    """Artifacts of the active run, by file name at the run's artifact root (`confusion.png`): MLflow's
    page comparing runs shows side by side only the files there."""
    with tempfile.TemporaryDirectory() as folder:
        for path, content in files.items():
            local = Path(folder) / path.name
            local.write_bytes(content.encode() if isinstance(content, str) else content)  # text as UTF-8
        mlflow_module().log_artifacts(folder)


CURVE = "epoch/"  # per-epoch keys: MLflow's run page draws a named section first, before the single figures


def curve_points(history: Sequence[Any]) -> list[Any]:
    """The figures of `EpochResult`s as MLflow metrics `epoch/<name>` at step = epoch, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(f"{CURVE}{key}", value, now, result.epoch) for result in history for key, value in result.metrics.items()
    ]


@contextmanager
def live_history(run_id: str) -> Iterator[Callable[[Any], None]]:
    """A function that sends an epoch's metrics (an `EpochResult`, step = epoch) as the epoch ends, so a
    RUNNING run's curves grow in the MLflow UI while it trains.

    It hands them to MLflow's asynchronous logging and returns: the loop does not wait for the store.
    Before each epoch's batch it waits for the previous one, long written unless the store is slower
    than an epoch, so at most one epoch is in flight, and a store that fails stops the training at
    the next epoch with the store's error (`run` ends the run FAILED and says it in one line). Leaving
    the block waits for the last batch.
    """
    if not quiet.VERBOSE:  # its failures reach the user as the run's one error line (`written` raises them)
        logging.getLogger("mlflow.utils.async_logging.async_logging_queue").setLevel(logging.CRITICAL)
    client = mlflow_client()
    in_flight: list[Future[Any]] = []  # the last batch's writes

    def written() -> None:
        """Block until MLflow has written the last batch; raise the store's own error if it failed (where
        `RunOperations.wait()` would fold every failure into one message of their reprs)."""
        while in_flight:
            in_flight.pop().result()

    def send(result: Any) -> None:
        written()
        in_flight.extend(client.log_batch(run_id, metrics=curve_points([result]), synchronous=False)._operation_futures)

    yield send
    written()


def log_history(run_id: str, history: Sequence[Any]) -> None:
    """Per-epoch metrics of `EpochResult`s (`epoch/<name>`, step = epoch), sent in a few batched requests."""
    mlflow_client().log_batch(run_id, metrics=curve_points(history))  # in batches of MAX_METRICS_PER_BATCH


def log_training(train_seconds: float, figures: dict[str, float], files: dict[Path, bytes | str]) -> None:
    """After the loop (the curves went live: `live_history`): the training time, the final figures the
    runs are compared by (`val_accuracy`, ...), and the stage's plots."""
    mlflow_module().log_metrics({**figures, "train_seconds": train_seconds})
    log_files(files)


def log_datasets(splits: dict[str, Any], context: str, digests: dict[str, str]) -> dict[str, Any]:
    """Record each split (an `io.Split`) as an MLflow dataset input of the active run, and return them
    by name. Its digest is the MD5 of its file, as in dvc.lock (`data_tags`), instead of MLflow's hash
    of a copy of the arrays."""
    mlflow = mlflow_module()
    from mlflow.data.numpy_dataset import from_numpy

    datasets = {}
    for name, split in splits.items():
        datasets[name] = from_numpy(split.x, targets=split.y, name=f"mnist-{name}", digest=digests[name])
        mlflow.log_input(datasets[name], context=f"{context}:{name}" if name != context else context)
    return datasets


def log_evaluation(
    scalars: dict[str, float], tags: dict[str, str], texts: dict[str, str], report: dict, dataset: Any
) -> None:
    """The test metrics (`test_<name>`), linked to the run's model with the dataset (an MLflow Dataset)
    they were measured on; tags, text artifacts by path and the classification report, into the active
    run."""
    mlflow = mlflow_module()
    mlflow.set_tags(tags)
    model_id = logged_model_id(mlflow.active_run().info.run_id)
    mlflow.log_metrics({f"test_{key}": value for key, value in scalars.items()}, model_id=model_id, dataset=dataset)
    for path, text in texts.items():
        mlflow.log_text(text, path)
    mlflow.log_dict(report, "evaluation/classification_report.json")


def run_exists(run_id: str) -> bool:
    """Whether the store holds the run."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client().get_run(run_id)
    except MlflowException:
        return False
    return True


# --- runs that are not the active one: the search's parent and child runs ---------------------------


def create_run(experiment_id: str, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    """A new RUNNING run (not made active in this process), the child of `parent_run_id` if given; its id."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    parent = {MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {}
    return str(mlflow_client().create_run(experiment_id, run_name=name, tags={**parent, **tags}).info.run_id)


def log_run(
    run_id: str,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
    step: int = 0,
) -> None:
    """Parameters (as `mlflow.log_params` writes them: `str(value)`), metrics at `step` and tags of a
    run, in one request. A value longer than MLflow keeps is cut, saying so, and the exact values go to
    the run's artifact PARAMS_ARTIFACT (MLflow would cut it silently but for a warning)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    client = mlflow_client()
    now = int(time.time() * 1000)
    texts = {key: str(value) for key, value in (params or {}).items()}
    if any(len(text) > MAX_PARAM_VAL_LENGTH for text in texts.values()):
        client.log_dict(run_id, params, PARAMS_ARTIFACT)
        cut = f" ... (cut: the whole value is in the artifact {PARAMS_ARTIFACT} of this run)"
        texts = {
            key: text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - len(cut)] + cut
            for key, text in texts.items()
        }
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, now, step) for key, value in (metrics or {}).items()],
        params=[Param(key, text) for key, text in texts.items()],
        tags=[RunTag(key, value) for key, value in (tags or {}).items()],
    )


def end_run(run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    """Tag a run and end it as `status` (FINISHED, FAILED, KILLED)."""
    log_run(run_id, tags=tags)  # no request without tags
    mlflow_client().set_terminated(run_id, status)


def run_status(run_id: str) -> str:
    """RUNNING, FINISHED, FAILED or KILLED: the run's status as the store has it now."""
    return str(mlflow_client().get_run(run_id).info.status)


def reopen_run(run_id: str) -> None:
    """Make an ended run RUNNING again (a study's parent run when a worker joins it later)."""
    mlflow_client().update_run(run_id, status="RUNNING")
