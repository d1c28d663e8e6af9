"""Stage `evaluate`: score the trained model on the 10,000 test images with scikit-learn.

The results go to metrics/test.json (for `dvc metrics`), plots/confusion.csv (for the `confusion`
template of `dvc plots`), PNGs under plots/, and into the SAME MLflow run that trained the model,
found through the run id that `train` wrote in runs/train.json. Because that file travels with
the model through DVC's cache, a model restored by `dvc checkout` is still evaluated into its own run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import io, lineage, quiet, timing
from pipeline.config import (
    CONFUSION_FILE,
    CONFUSION_PNG,
    MISTAKES_PNG,
    MODEL_FILE,
    REPORT_FILE,
    RUN_FILE,
    TEST_METRICS,
    load_params,
    prepared_file,
)
from pipeline.errors import DataError, run_stage

log = logging.getLogger("pipeline.evaluate")
# metrics/test.json: what `dvc exp show` compares, as few columns as fit a 120-column terminal beside the
# params changed; MLflow holds every score (`test_macro_f1`, ...), metrics/classification_report.json each class.
COMPARED = ("accuracy", "log_loss")
_AVERAGED = (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"))  # our name, the report's


def score(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Every test metric, from scikit-learn."""
    from sklearn import metrics

    predicted = probabilities.argmax(axis=1)
    classes = list(range(probabilities.shape[1]))
    report = metrics.classification_report(labels, predicted, labels=classes, output_dict=True, zero_division=0)
    result: dict[str, Any] = {
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "log_loss": float(metrics.log_loss(labels, probabilities, labels=classes)),
    }
    # the report's macro and weighted averages are precision_recall_fscore_support's, as floats
    for average in ("macro", "weighted"):
        figures = report[f"{average} avg"]
        result |= {f"{average}_{name}": figures[key] for name, key in _AVERAGED}
    result["confusion_matrix"] = metrics.confusion_matrix(labels, predicted, labels=classes)
    result["report"] = report
    result["report_text"] = metrics.classification_report(labels, predicted, labels=classes, digits=4, zero_division=0)
    return result


def confusion_csv(labels: np.ndarray, predicted: np.ndarray) -> str:
    """One `actual,predicted` row per test image: the input of `dvc plots`' confusion template."""
    return "actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in zip(labels, predicted, strict=True))


def assess(test: io.Split, probabilities: np.ndarray) -> tuple[dict[str, Any], dict[Path, bytes | str]]:
    """The scores, and every file the stage writes except metrics/test.json, as contents by path."""
    from pipeline import plots

    result = score(test.y, probabilities)
    title = f"Test set: accuracy {result['accuracy']:.4f}"
    files: dict[Path, bytes | str] = {
        CONFUSION_PNG: plots.png(plots.confusion_matrix(result["confusion_matrix"], title)),
        MISTAKES_PNG: plots.png(plots.worst_mistakes(test.x, test.y, probabilities)),
        CONFUSION_FILE: confusion_csv(test.y, probabilities.argmax(axis=1)),
        REPORT_FILE: json.dumps(result["report"], indent=2) + "\n",
    }
    return result, files


def evaluate() -> dict[str, float]:
    """Score the model, log into its training run, then replace the stage's outputs together."""
    from pipeline import model, tracking

    run_id = io.read_json(RUN_FILE, "train").get("mlflow_run_id")
    if not run_id:
        raise DataError(f"{RUN_FILE} names no MLflow run; run `dvc repro -f train`.")
    test_file = prepared_file("test")
    test = io.load_split(test_file)
    with timing.phase("import TensorFlow, load the model"):
        network = model.load(MODEL_FILE)
    with timing.phase("predict, score, plots"):
        probabilities = model.probabilities(network, test.x)
        if not np.isfinite(probabilities).all():
            raise DataError(f"{MODEL_FILE} outputs NaN or infinite values; retrain it with `dvc repro -f train`.")
        result, files = assess(test, probabilities)
    with timing.phase("import MLflow"):  # after TensorFlow: see runtime.import_tensorflow
        tracking.mlflow_module()
    scalars = {key: value for key, value in result.items() if isinstance(value, float)}
    log.info(
        "test accuracy %.4f, macro F1 %.4f, log loss %.4f",
        scalars["accuracy"],
        scalars["macro_f1"],
        scalars["log_loss"],
    )

    with (
        timing.phase("MLflow: metrics and plots into the training run"),
        tracking.resume(run_id),
        io.staged_outputs() as out,
    ):
        for path, content in files.items():
            out.write_bytes(path, content if isinstance(content, bytes) else content.encode("utf-8"))
        out.write_json(TEST_METRICS, {key: scalars[key] for key in COMPARED})
        tags = lineage.data_tags({"test": test_file})
        datasets = tracking.log_datasets({"test": test}, "evaluation", {"test": tags["data_md5.test"]})
        texts = {"evaluation/classification_report.txt": result["report_text"]}
        tracking.log_evaluation(scalars, tags, texts, result["report"], datasets["test"])
        tracking.log_files({CONFUSION_PNG: files[CONFUSION_PNG], MISTAKES_PNG: files[MISTAKES_PNG]})
        tracking.record_test_accuracy(run_id, scalars["accuracy"])
    return scalars


def main() -> None:
    """Validate params.yaml (evaluate reads none of it) and evaluate the trained model."""
    load_params()
    quiet.configure_logging()
    try:
        evaluate()
    finally:
        timing.report("evaluate")


if __name__ == "__main__":
    run_stage(main)
