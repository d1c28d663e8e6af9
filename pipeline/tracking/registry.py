"""The model registry: each training's model as a version of `mnist-bn-mlp`, the `champion` alias, and
loading a registered model for `mnist-predict`."""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
import warnings
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any

from pipeline.errors import TrackingError, first_line
from pipeline.model import HOLDS_CODE, holds_code
from pipeline.secrets import redacted
from pipeline.tracking.store import check_reachable, mlflow_client, mlflow_module, sqlite_path, tracking_uri, use_store

REGISTERED_MODEL = "mnist-bn-mlp"
CHAMPION = "champion"
VAL_ACCURACY = "val_accuracy"  # the version tag the champion is chosen by


def _version_of(run_id: str) -> Any | None:
    versions = mlflow_client().search_model_versions(f"name = '{REGISTERED_MODEL}' and run_id = '{run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def _best_version() -> str | None:
    """The version with the highest finite `val_accuracy` tag, the earliest of equals (None if none has one)."""
    candidates = []
    for found in mlflow_module().search_model_versions(filter_string=f"name = '{REGISTERED_MODEL}'"):  # every page
        try:
            accuracy = float(found.tags[VAL_ACCURACY])
        except (KeyError, ValueError):  # not tagged (yet), or a tag written by hand
            continue
        if math.isfinite(accuracy):  # `nan` compares false both ways, `inf` beats every real accuracy
            candidates.append((accuracy, -int(found.version)))
    return str(-max(candidates)[1]) if candidates else None


def _champion(client: Any) -> str | None:
    """The version the `champion` alias names now, if any."""
    version = client.get_registered_model(REGISTERED_MODEL).aliases.get(CHAMPION)
    return None if version is None else str(version)


def promote_if_better(run_id: str, val_accuracy: float) -> bool:
    """Tag the run's model version with its validation accuracy, then make `champion` the version with the
    best validation accuracy of all (the earliest of equals; the test set never chooses); say whether
    that is this run's version.

    Trainings that finish together promote at once, on one machine or many, without a lock: each writes
    its tag, then moves the alias to the best version it reads until a read finds the alias on the best.
    The last read of all follows every write (each writer reads again after it) and stopped its reader,
    so the champion ends on the best (tests/test_registry.py forces every interleaving of two).
    """
    from mlflow.exceptions import MlflowException

    version = _version_of(run_id)
    if version is None:
        return False
    client = mlflow_client()
    client.set_model_version_tag(REGISTERED_MODEL, version.version, VAL_ACCURACY, f"{val_accuracy:.6f}")
    while True:
        current, best = _champion(client), _best_version()
        if best is None or current == best:
            return best == str(version.version)
        try:
            client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, best)
        except MlflowException:
            # Two first promoters may both create the alias: the store refuses the second row. That
            # race alone is retried (the alias was absent when read and is there now); once it exists,
            # writes replace it.
            if current is not None or _champion(client) is None:
                raise


def record_test_accuracy(run_id: str, test_accuracy: float) -> None:
    """Tag the run's model version with its test accuracy: reported beside it, never used to choose."""
    if version := _version_of(run_id):
        mlflow_client().set_model_version_tag(
            REGISTERED_MODEL, version.version, "test_accuracy", f"{test_accuracy:.6f}"
        )


def logged_model_id(run_id: str) -> str | None:
    """The id of the model (MLflow's LoggedModel) the run logged last, if it logged one."""
    outputs = mlflow_client().get_run(run_id).outputs
    models = outputs.model_outputs if outputs else []
    return str(models[-1].model_id) if models else None


def _provenance(run_id: str, changed: list[str]) -> str:
    """The registered version's description: the run, commit and params that made it, what chose it."""
    run = mlflow_client().get_run(run_id)
    dirty = " (with uncommitted changes)" * (run.data.tags.get("git_dirty") == "true")
    return (
        f"Trained by MLflow run {run.info.run_name} ({run_id}) at git commit "
        f"{run.data.tags.get('git_commit', 'none')}{dirty}; params changed from that commit: "
        f"{', '.join(changed) or 'none'}. Validation accuracy {run.data.metrics['val_accuracy']:.4f}, the "
        f"figure the @{CHAMPION} alias is chosen by."
    )


def log_model(model: Any, example: Any, validation: Any, changed: list[str]) -> str:
    """Log the model into the active run as MLflow will serve it, and register it as a new version of
    `mnist-bn-mlp`; return the version. The served form (`serving.py`, logged as code: no pickle) is the
    network with a softmax head (ten class probabilities), which refuses rows that are not 784 pixel
    values in [0, 1] and requests above `serving.MAX_ROWS` rows; with a named signature, an input
    example and a description. The model holds the run's validation figures, measured on `validation`
    (an MLflow Dataset); the version says which run, commit and `changed` params made it."""
    import keras
    import tensorflow as tf

    from pipeline import quiet
    from pipeline.config import CLASSES, PIXELS, SIDE
    from pipeline.model import save, with_softmax
    from pipeline.tracking import serving

    mlflow = mlflow_module()
    run_id = mlflow.active_run().info.run_id
    with tempfile.TemporaryDirectory() as folder:
        network = Path(folder) / f"{serving.NETWORK}.keras"
        save(with_softmax(model), network)
        # MLflow checks the input example by loading the model and predicting it: TensorFlow's C++ log
        # lines of that check are noise, and so is the registry's chatter.
        with contextlib.redirect_stdout(StringIO()), quiet.filtered_stderr():
            info = mlflow.pyfunc.log_model(
                name=REGISTERED_MODEL,
                python_model=Path(serving.__file__),
                code_paths=[str(Path(quiet.__file__))],  # serving.py quiets TensorFlow with it
                artifacts={serving.NETWORK: str(network)},
                signature=serving.signature(PIXELS, CLASSES),
                input_example=example,
                registered_model_name=REGISTERED_MODEL,
                # Stated, not inferred: inference re-imports TensorFlow in a subprocess, seconds per run.
                pip_requirements=[f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"],
                # MLflow links to the model every metric the run holds at the model's step: at its default,
                # 0, the system metrics' first sample and `train_seconds`. No metric is at step -1 (epochs
                # count from 1): the model holds only the figures linked here and by `evaluate`.
                step=-1,
            )
    client = mlflow_client()
    client.set_logged_model_tags(info.model_id, {"mlflow.note.content": serving.description(SIDE, CLASSES)})
    for key in ("val_accuracy", "val_loss"):  # the run's last value, with its step and timestamp: no new point
        last = max(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        mlflow.log_metric(
            key, last.value, step=last.step, timestamp=last.timestamp, model_id=info.model_id, dataset=validation
        )
    version = str(info.registered_model_version)
    client.update_model_version(REGISTERED_MODEL, version, description=_provenance(run_id, changed))
    return version


def load_model(uri: str, before_load: Callable[[], None] = lambda: None) -> tuple[Any, str]:
    """Any MLflow model URI (`models:/mnist-bn-mlp@champion`, `runs:/...`) as a pyfunc model, resolved
    against the pipeline's store, and what it is (`mnist-bn-mlp version 3 (@champion)`); every way it
    cannot be loaded from here is one TrackingError. An alias is resolved once, and that version loaded.
    `before_load` runs once the store is known to be usable (the caller's slow TensorFlow start-up)."""
    store = tracking_uri()
    check_reachable(store, writing=False)
    # MLflow would silently create an empty SQLite store; say instead that there is nothing to load.
    if (database := sqlite_path(store)) and not database.is_file():
        raise TrackingError(
            f"there is no MLflow store at {database}; run `dvc repro` to train and register a model, "
            "set MLFLOW_TRACKING_URI, or pass --model models/model.keras."
        )
    mlflow = use_store(store)
    shown = redacted(uri)
    try:
        if alias := re.fullmatch(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)", uri):
            version = mlflow_client().get_model_version_by_alias(alias["name"], alias["alias"]).version
            uri, shown = f"models:/{alias['name']}/{version}", f"{alias['name']} version {version} (@{alias['alias']})"
        before_load()
        with warnings.catch_warnings():  # members outside the archive ("../x") are skipped; no need to say
            warnings.filterwarnings("ignore", "Skipping invalid path", UserWarning)
            # No warnings to show (the command silences MLflow's), so no check of the installed packages.
            return mlflow.pyfunc.load_model(uri, suppress_warnings=True), shown
    except Exception as error:  # MLflow, HTTP and file errors all mean "not loadable from here"
        if holds_code(error):
            raise TrackingError(
                f"the model {redacted(uri)} {HOLDS_CODE}; use one that `dvc repro` registered."
            ) from None
        raise TrackingError(
            f"cannot load the model {redacted(uri)} from {redacted(store)} ({first_line(error)}); run `dvc repro` to "
            "train and register one, or pass --model with another URI or a .keras file."
        ) from None
