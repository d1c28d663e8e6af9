"""Stage `evaluate`: score the trained model on the 10,000 test images with scikit-learn.

The results go to metrics/test.json (for `dvc metrics`), plots/confusion.csv (for the `confusion`
template of `dvc plots`), PNGs under plots/, and into the SAME MLflow run that trained the model,
found through the run id that `train` wrote in metrics/train.json. Because that file travels with
the model through DVC's cache, a model restored by `dvc checkout` is still evaluated into its own run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import io
from pipeline.config import (
    CONFUSION_FILE,
    MODEL_FILE,
    PLOTS_DIR,
    PREPARED_DIR,
    TEST_METRICS,
    TRAIN_METRICS,
    load_params,
)
from pipeline.errors import DataError, run_stage

log = logging.getLogger("pipeline.evaluate")

REPORT_FILE = Path("metrics/classification_report.json")


def score(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Every test metric, from scikit-learn."""
    from sklearn import metrics

    predicted = probabilities.argmax(axis=1)
    classes = list(range(probabilities.shape[1]))
    result: dict[str, Any] = {
        "accuracy": metrics.accuracy_score(labels, predicted),
        "log_loss": metrics.log_loss(labels, probabilities, labels=classes),
    }
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = metrics.precision_recall_fscore_support(
            labels, predicted, labels=classes, average=average, zero_division=0
        )
        result |= {f"{average}_precision": precision, f"{average}_recall": recall, f"{average}_f1": f1}
    result = {key: float(value) for key, value in result.items()}
    result["confusion_matrix"] = metrics.confusion_matrix(labels, predicted, labels=classes)
    result["report"] = metrics.classification_report(
        labels, predicted, labels=classes, output_dict=True, zero_division=0
    )
    result["report_text"] = metrics.classification_report(labels, predicted, labels=classes, digits=4, zero_division=0)
    return result


def _confusion_csv(labels: np.ndarray, predicted: np.ndarray) -> str:
    """One `actual,predicted` row per test image: the input of `dvc plots`' confusion template."""
    return "actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in zip(labels, predicted, strict=True))


def evaluate(data_dir: Path = PREPARED_DIR) -> dict[str, Any]:
    """Score the model, log into its training run, then write the outputs."""
    import mlflow

    from pipeline import model, plots, tracking

    run_id = io.read_json(TRAIN_METRICS, "train").get("mlflow_run_id")
    if not run_id:
        raise DataError(f"{TRAIN_METRICS} names no MLflow run; run `dvc repro -f train`.")
    test = io.load_arrays(data_dir / "test.npz", "prepare")
    probabilities = model.probabilities(model.load(MODEL_FILE), test["x"])
    result = score(test["y"], probabilities)
    scalars = {key: value for key, value in result.items() if isinstance(value, float)}
    log.info(
        "test accuracy %.4f, macro F1 %.4f, log loss %.4f",
        scalars["accuracy"],
        scalars["macro_f1"],
        scalars["log_loss"],
    )

    figures = {
        "confusion.png": plots.confusion_matrix(
            result["confusion_matrix"], f"Test set: accuracy {scalars['accuracy']:.4f}"
        ),
        "misclassified.png": plots.worst_mistakes(test["x"], test["y"], probabilities),
    }
    for name, figure in figures.items():
        plots.save_png(figure, PLOTS_DIR / name)

    with tracking.resume(run_id):
        mlflow.set_tags(tracking.data_tags({"test": data_dir / "test.npz"}))
        tracking.log_datasets({"test": test}, context="evaluation")
        mlflow.log_metrics({f"test_{key}": value for key, value in scalars.items()})
        mlflow.log_dict(result["report"], "evaluation/classification_report.json")
        mlflow.log_text(result["report_text"], "evaluation/classification_report.txt")
        for name in figures:
            mlflow.log_artifact(str(PLOTS_DIR / name), artifact_path="plots")
        tracking.record_model_quality(run_id, scalars["accuracy"])

    io.write_text(CONFUSION_FILE, _confusion_csv(test["y"], probabilities.argmax(axis=1)))
    io.write_text(REPORT_FILE, json.dumps(result["report"], indent=2) + "\n")
    io.write_json(TEST_METRICS, {**scalars, "mlflow_run_id": run_id})
    return scalars


def main() -> None:
    """Validate params.yaml (evaluate reads none of it) and evaluate the trained model."""
    load_params()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    evaluate()


if __name__ == "__main__":
    run_stage(main)
