"""The served model (pipeline/tracking/serving.py): what it refuses and how, logged and loaded for real.

The HTTP side, against a real `mlflow models serve` process, is in test_server.py.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from workspace import REPO, offline_mnist

from pipeline import tracking
from pipeline.config import PIXELS, load_params
from pipeline.tracking import serving

GOOD = np.zeros((2, 784), np.float32)


def refusal(rows: object, max_rows: int = serving.MAX_ROWS) -> str:
    """The message of the MlflowException that `checked_rows` raises; it must be HTTP 400 in MLflow's format."""
    with pytest.raises(MlflowException) as caught:
        serving.checked_rows(rows, max_rows, PIXELS)
    error = caught.value
    assert error.get_http_status_code() == 400
    body = json.loads(error.serialize_as_json())  # valid JSON, whatever the values were
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "\n" not in body["message"]
    return str(body["message"])


def with_value(value: float, row: int = 1, column: int = 5) -> np.ndarray:
    rows = GOOD.astype(np.float64)
    rows[row, column] = value
    return rows


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e300], ids=["NaN", "Infinity", "-Infinity", "1e300"])
def test_values_that_are_not_finite_are_refused(value: float) -> None:
    message = refusal(with_value(value))
    assert message.startswith("row 1, value 5 is ")
    assert "not pixel values" in message and "784 finite pixel values in [0, 1]" in message


@pytest.mark.parametrize("value", [-0.1, 1.0001, 255.0])
def test_values_outside_0_1_are_refused(value: float) -> None:
    assert "outside [0, 1]" in refusal(with_value(value))


def test_strings_and_shapes_are_refused() -> None:
    assert "not numbers" in refusal([["a"] * 784])
    assert "shape (n, 784), got (1, 785)" in refusal(np.zeros((1, 785)))
    assert "shape (n, 784), got (784,)" in refusal(np.zeros(784))


def test_rows_above_the_limit_are_refused_before_anything_else() -> None:
    rows = np.full((11, 784), np.nan)  # refused for its size, not for its values
    assert refusal(rows, max_rows=10).startswith("11 rows in one request, above this model's limit of 10")
    assert serving.checked_rows(np.zeros((10, 784)), max_rows=10, pixels=PIXELS).dtype == np.float32


def test_a_server_can_start_with_another_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert serving.max_rows() == serving.MAX_ROWS
    monkeypatch.setenv(serving.MAX_ROWS_VARIABLE, "5000")
    assert serving.max_rows() == 5000
    for wrong in ("0", "-3", "many", "1e3"):
        monkeypatch.setenv(serving.MAX_ROWS_VARIABLE, wrong)
        with pytest.raises(MlflowException, match=f"MAX_ROWS must be a whole number of rows above 0, got '{wrong}'"):
            serving.max_rows()


def test_good_rows_pass_unchanged() -> None:
    rows = np.linspace(0, 1, 2 * 784, dtype=np.float32).reshape(2, 784)
    assert serving.checked_rows(rows, serving.MAX_ROWS, PIXELS) is rows  # float32 already: no copy
    np.testing.assert_array_equal(serving.checked_rows(rows.tolist(), serving.MAX_ROWS, PIXELS), rows)
    assert serving.checked_rows(np.full((1, 784), -0.0), serving.MAX_ROWS, PIXELS).shape == (1, 784)


@pytest.mark.e2e  # logs and loads a model through MLflow: seconds, for the full run
def test_the_logged_model_is_code_and_a_keras_file_and_refuses_bad_rows(store: str) -> None:
    import mlflow

    from pipeline import model, runtime
    from pipeline.io import Split

    runtime.import_tensorflow()
    defaults = load_params(REPO / "params.yaml")
    network = model.build_model(defaults.model.model_copy(update={"hidden_units": [16]}))
    images, labels = offline_mnist("t10k")
    x = images[:5].reshape(5, -1).astype(np.float32) / 255
    # this store's own client: an earlier test in this process may have set MLflow's global URIs elsewhere
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    with tracking.run() as run_id, tracking.system_metrics(run_id):
        datasets = tracking.log_datasets({"validation": Split(x, labels[:5])}, "training", {"validation": "ab12"})
        tracking.log_run(run_id, metrics={"val_accuracy": 0.5, "val_loss": 1.5}, step=1)  # the last epoch's
        tracking.log_run(run_id, metrics={"train_seconds": 2.0})  # step 0, as the train stage logs it
        # the step-0 system metrics that MLflow would attach to a model logged at its default step
        while "system/cpu_utilization_percentage" not in client.get_run(run_id).data.metrics:
            time.sleep(0.1)
        version = tracking.log_model(network, x, datasets["validation"], ["train.learning_rate=0.02"])
        assert tracking.promote_if_better(run_id, 0.5)
    served, name = tracking.load_model(f"models:/{tracking.REGISTERED_MODEL}@{tracking.CHAMPION}")
    assert name == f"{tracking.REGISTERED_MODEL} version {version} (@{tracking.CHAMPION})"
    probabilities = np.asarray(served.predict(x))
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, model.probabilities(network, x), atol=1e-5)
    assert "max_rows" not in client.get_run(run_id).data.params  # the run holds params.yaml's
    with pytest.raises(MlflowException, match="is nan"):
        served.predict(with_value(np.nan).astype(np.float32))

    # what chose it, what goes in and out, where it came from
    registered = client.get_model_version(tracking.REGISTERED_MODEL, version)
    logged = client.get_logged_model(registered.source.removeprefix("models:/"))
    assert logged.name == tracking.REGISTERED_MODEL and logged.source_run_id == run_id
    assert [(m.key, m.value, m.step, m.dataset_name, m.dataset_digest) for m in logged.metrics] == [
        ("val_accuracy", 0.5, 1, "mnist-validation", "ab12"),
        ("val_loss", 1.5, 1, "mnist-validation", "ab12"),
    ]  # and neither the system metrics nor train_seconds
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1]  # no second point
    assert "784 values, a 28x28 digit in row-major order" in logged.tags["mlflow.note.content"]
    signature = served.metadata.signature
    assert [(s.name, s.shape) for s in (*signature.inputs.inputs, *signature.outputs.inputs)] == [
        ("pixels", (-1, 784)),
        ("probabilities", (-1, 10)),
    ]
    assert f"({run_id})" in registered.description and "train.learning_rate=0.02" in registered.description

    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{tracking.REGISTERED_MODEL}"))
    try:
        files = {path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()}
        assert "serving.py" in files and f"artifacts/{serving.NETWORK}.keras" in files
        assert not [name for name in files if name.endswith((".pkl", ".pickle"))], files  # no pickle anywhere
    finally:
        shutil.rmtree(local, ignore_errors=True)
