"""The registered model as MLflow serves it: the network, behind a check of every request.

MLflow logs this file as the model's code ("models from code": no pickle) beside the network's `.keras`
file, and runs it wherever the model is loaded (`mlflow models serve`, `mlflow.pyfunc.load_model`,
`mnist-predict`), so it needs only numpy, Keras, MLflow and pipeline/quiet.py, logged beside it.

MLflow's scoring server checks a request against the signature (float32 rows of pixels), not the
values: NaN, infinity or 1e300 would each get ten NaN "probabilities" with HTTP 200. `predict` refuses
such rows, and requests above `MAX_ROWS` rows, before the network runs, with an MlflowException that
the server answers as HTTP 400 in MLflow's error format. Another limit for one server (not MLflow's
model config, which would be logged as the run's params): `PIPELINE_SERVING_MAX_ROWS=5000 mlflow models serve`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc.model import PythonModel, PythonModelContext
from mlflow.types import Schema, TensorSpec

MAX_ROWS = 1000  # per request, unless MAX_ROWS_VARIABLE says otherwise
MAX_ROWS_VARIABLE = "PIPELINE_SERVING_MAX_ROWS"
INPUT = "pixels"  # the signature's name of the input
NETWORK = "network"  # the artifact: the network with its softmax head, a .keras file


def _refuse(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def checked_rows(model_input: Any, max_rows: int, pixels: int) -> np.ndarray:
    """`model_input` as a float32 array (n, `pixels`), or an MlflowException saying what is wrong with it:
    more than `max_rows` rows, another shape, or a value that is not finite or not in [0, 1]."""
    expected = f"each row must be {pixels} finite pixel values in [0, 1] (a digit image's grey levels / 255)"
    rows = len(model_input)
    if rows > max_rows:
        raise _refuse(
            f"{rows} rows in one request, above this model's limit of {max_rows}: send at most {max_rows} "
            "rows per request."
        )
    try:
        with np.errstate(over="ignore"):  # 1e300 becomes infinity in float32, refused below
            x = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise _refuse(f"the rows are not numbers ({error}); {expected}.") from None
    if x.ndim != 2 or x.shape[1] != pixels:
        raise _refuse(f"expected an array of shape (n, {pixels}), got {x.shape}; {expected}.")
    problems = (
        (~np.isfinite(x), "NaN, infinity and numbers beyond float32's range (such as 1e300) are not pixel values"),
        ((x < 0) | (x > 1), "outside [0, 1]"),
    )
    for bad, why in problems:
        if count := int(bad.sum()):
            row, column = (int(i) for i in np.argwhere(bad)[0])
            raise _refuse(
                f"row {row}, value {column} is {x[row, column]} ({why}; {count} such value{'s' * (count > 1)} "
                f"in the request); {expected}."
            )
    return x


def signature(pixels: int, classes: int) -> ModelSignature:
    """What goes in and what comes out, by name: `pixels` (n, 784) -> `probabilities` (n, 10), float32."""
    rows = TensorSpec(np.dtype(np.float32), (-1, pixels), INPUT)
    probabilities = TensorSpec(np.dtype(np.float32), (-1, classes), "probabilities")
    return ModelSignature(inputs=Schema([rows]), outputs=Schema([probabilities]))


def description(side: int, classes: int) -> str:
    """The logged model's description: what goes in and what comes out."""
    return (
        f"The batch-normalized network of mnist-bn-pipeline. Input `pixels`: float32 rows of {side * side} "
        f"values, a {side}x{side} digit in row-major order (row by row from the top), white on black as in "
        f"MNIST, grey level / 255 in [0, 1]. Output `probabilities`: float32 rows of {classes}, the probability "
        "of each digit; each row sums to 1."
    )


def max_rows() -> int:
    """The row limit of this server: `PIPELINE_SERVING_MAX_ROWS` if set, else `MAX_ROWS`."""
    text = os.environ.get(MAX_ROWS_VARIABLE, "").strip() or str(MAX_ROWS)
    if not text.isdigit() or int(text) < 1:
        raise MlflowException(f"{MAX_ROWS_VARIABLE} must be a whole number of rows above 0, got {text!r}.")
    return int(text)


class DigitClassifier(PythonModel):
    """Rows of pixels in [0, 1] -> a probability per class per row."""

    def load_context(self, context: PythonModelContext) -> None:
        # pipeline/quiet.py, logged beside this file (`code_paths`): TensorFlow's start-up noise filtered
        import quiet

        with quiet.tensorflow_start():
            import keras

            # Keras' safe mode: a stored lambda (code) in the file is refused, never executed
            self.network = keras.saving.load_model(context.artifacts[NETWORK], compile=False, safe_mode=True)
        self.max_rows = max_rows()
        self.pixels = int(np.prod(self.network.input_shape[1:]))

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        if isinstance(model_input, dict):  # the signature's named input, as MLflow passes a JSON request's
            model_input = model_input[INPUT]
        x = checked_rows(model_input, self.max_rows, self.pixels)
        return np.asarray(self.network(x, training=False))


set_model(DigitClassifier())
