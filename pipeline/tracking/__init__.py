"""The one boundary to MLflow: nothing else in the package imports it.

`store` says where the store is, checks it answers and turns its failures into one-line errors; `runs`
holds the runs (a training and its evaluation, a search's parent and child runs) and what they record;
`registry` the model versions, the `champion` alias and loading a registered model. The stages use the
names re-exported below (`from pipeline import tracking; tracking.run(...)`).
"""

from pipeline.secrets import redacted as redacted
from pipeline.tracking.registry import (
    CHAMPION as CHAMPION,
    REGISTERED_MODEL as REGISTERED_MODEL,
    load_model as load_model,
    log_model as log_model,
    promote_if_better as promote_if_better,
    record_test_accuracy as record_test_accuracy,
)
from pipeline.tracking.runs import (
    create_run as create_run,
    end_orphaned_runs as end_orphaned_runs,
    end_run as end_run,
    live_history as live_history,
    log_datasets as log_datasets,
    log_evaluation as log_evaluation,
    log_files as log_files,
    log_history as log_history,
    log_params as log_params,
    log_run as log_run,
    log_training as log_training,
    process_ended as process_ended,
    process_tags as process_tags,
    reopen_run as reopen_run,
    resume as resume,
    run as run,
    run_exists as run_exists,
    run_status as run_status,
    system_metrics as system_metrics,
)
from pipeline.tracking.store import (
    EXPERIMENT as EXPERIMENT,
    artifact_location as artifact_location,
    check_reachable as check_reachable,
    connect as connect,
    mlflow_module as mlflow_module,
    probe as probe,
    shown_store as shown_store,
    sqlite_path as sqlite_path,
    store_errors as store_errors,
    tracking_uri as tracking_uri,
    unavailable as unavailable,
)
