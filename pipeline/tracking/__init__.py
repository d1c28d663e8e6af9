"""The one boundary to MLflow: nothing else in the package imports it.

`store` says where the store is, checks it answers and turns its failures into one-line errors; `runs`
holds the runs (a training and its evaluation, a search's parent and child runs) and what they record;
`registry` the model versions, the `champion` alias and loading a registered model. The stages use the
names below (`from pipeline import tracking; tracking.run(...)`).
"""

from pipeline.secrets import redacted
from pipeline.tracking.registry import (
    CHAMPION,
    REGISTERED_MODEL,
    load_model,
    log_model,
    promote_if_better,
    record_test_accuracy,
)
from pipeline.tracking.runs import (
    create_run,
    end_orphaned_runs,
    end_run,
    live_history,
    log_datasets,
    log_evaluation,
    log_files,
    log_history,
    log_params,
    log_run,
    log_training,
    process_ended,
    process_tags,
    reopen_run,
    resume,
    run,
    run_exists,
    run_status,
    system_metrics,
)
from pipeline.tracking.store import (
    EXPERIMENT,
    artifact_location,
    check_reachable,
    connect,
    mlflow_module,
    probe,
    shown_store,
    sqlite_path,
    store_errors,
    tracking_uri,
    unavailable,
)

__all__ = [
    "CHAMPION",
    "EXPERIMENT",
    "REGISTERED_MODEL",
    "artifact_location",
    "check_reachable",
    "connect",
    "create_run",
    "end_orphaned_runs",
    "end_run",
    "live_history",
    "load_model",
    "log_datasets",
    "log_evaluation",
    "log_files",
    "log_history",
    "log_model",
    "log_params",
    "log_run",
    "log_training",
    "mlflow_module",
    "probe",
    "process_ended",
    "process_tags",
    "promote_if_better",
    "record_test_accuracy",
    "redacted",
    "reopen_run",
    "resume",
    "run",
    "run_exists",
    "run_status",
    "shown_store",
    "sqlite_path",
    "store_errors",
    "system_metrics",
    "tracking_uri",
    "unavailable",
]
