"""Stage `train`: train the network (`pipeline.fit`), record the run in MLflow, write the outputs.

The outputs (model, learning curves, history, metrics) replace the previous ones together, and only
after the MLflow run holds everything: a failure anywhere leaves the previous outputs as they were.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

from pipeline import io, lineage, quiet, timing
from pipeline.config import (
    CURVES_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    PARAMS_FILE,
    RUN_FILE,
    TRAIN_METRICS,
    Params,
    load_params,
    prepared_file,
    project_root,
)
from pipeline.errors import run_stage
from pipeline.fit import EpochResult, Fitted, final_figures, fit

log = logging.getLogger("pipeline.train")


def history_csv(history: list[EpochResult]) -> str:
    """Per-epoch learning curves in the CSV form `dvc plots` reads."""
    rows = [",".join(["epoch", *history[0].metrics])]
    rows += [",".join([str(r.epoch), *(f"{value:.6g}" for value in r.metrics.values())]) for r in history]
    return "\n".join(rows) + "\n"


def train(params: Params) -> Fitted:
    """Train; log params, curves, plots and the registered model; then replace the stage's outputs."""
    with timing.phase("import TensorFlow and MLflow"):
        from pipeline import model, plots, runtime, tracking

        runtime.import_tensorflow(project_root())  # first, so that its start-up noise is filtered
        tracking.mlflow_module()  # here, so that the phases below time work, not imports
    model.check_fits_in_memory(params.model, params.train.batch_size)  # the network's size, before any run
    with timing.phase("load data, lineage tags"):
        data_files = {split: prepared_file(split) for split in ("train", "validation")}
        train_set, validation = (io.load_split(path) for path in data_files.values())
        tags = lineage.lineage_tags(PARAMS_FILE, data_files)
        digests = {split: tags[f"data_md5.{split}"] for split in data_files}

    with ExitStack() as stack:
        with timing.phase("MLflow: start the run, params, datasets"):
            name = lineage.run_name(params.flat(), PARAMS_FILE)
            run_id = stack.enter_context(tracking.run(run_name=name, tags=tags))
            stack.enter_context(tracking.system_metrics(run_id))
            out = stack.enter_context(io.staged_outputs())
            tracking.log_params(params.flat())
            datasets = tracking.log_datasets({"train": train_set, "validation": validation}, "training", digests)
        with (
            tracking.live_history(run_id) as send,
            quiet.progress(params.train.epochs, "train", "epoch") as step,  # a bar, or a line per epoch in logs
            runtime.cache_errors_explained(),
        ):

            def on_epoch(result: EpochResult) -> None:
                send(result)  # first: an epoch's line shows once the previous epoch's metrics are in the store
                figures = " ".join(f"{name} {value:.4f}" for name, value in result.metrics.items())
                step(f"epoch {result.epoch}/{params.train.epochs}: {figures}", figures, False)

            fitted = fit(params.model, params.train, train_set, validation, on_epoch=on_epoch)
        log.info(
            "trained %d epochs in %.2f s: val_accuracy %.4f",
            params.train.epochs,
            fitted.train_seconds,
            fitted.history[-1].metrics["val_accuracy"],
        )
        with timing.phase("plots and outputs"):
            curves = history_csv(fitted.history)
            figure = plots.png(plots.learning_curves([{"epoch": r.epoch, **r.metrics} for r in fitted.history]))
            # Written to temporary files first, so a full disk fails here, before anything is registered.
            out.write(MODEL_FILE, lambda path: model.save(fitted.model, path))
            out.write_bytes(CURVES_FILE, figure)
            out.write_text(HISTORY_FILE, curves)
            out.write_json(TRAIN_METRICS, final_figures(fitted.history))
            out.write_json(RUN_FILE, {"mlflow_run_id": run_id})
        with timing.phase("MLflow: training time and plots"):
            files: dict[Path, bytes | str] = {CURVES_FILE: figure, HISTORY_FILE: curves}
            tracking.log_training(fitted.train_seconds, final_figures(fitted.history), files)
        with timing.phase("MLflow: log and register the model"):
            changed = lineage.changed_params(params.flat(), PARAMS_FILE)
            version = tracking.log_model(fitted.model, validation.x[:5], datasets["validation"], changed)
            champion = tracking.promote_if_better(run_id, fitted.history[-1].metrics["val_accuracy"])
    log.info(
        "registered as version %s of %s%s",
        version,
        tracking.REGISTERED_MODEL,
        f", the new @{tracking.CHAMPION} (best validation accuracy so far)" if champion else "",
    )
    return fitted


def main() -> None:
    """Read `model` and `train` from params.yaml and train."""
    params = load_params()
    quiet.configure_logging()
    try:
        train(params)
    finally:
        timing.report("train")


if __name__ == "__main__":
    run_stage(main)
