"""A reproducible, tracked DVC + MLflow pipeline for the batch-normalized MNIST network.

One module per DVC stage (`download`, `prepare`, `train`, `evaluate`), configuration in `config`,
everything MLflow in `tracking`, the network in `model`, the `mnist-predict` command in `predict`, and
small shared helpers in `io`, `errors` and `plots`.
"""

import os

# Set before any stage imports TensorFlow or MLflow: Keras runs on TensorFlow, and the libraries' INFO
# chatter is hidden so that real warnings stand out (PIPELINE_VERBOSE=1 shows it; see pipeline.quiet).
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if os.environ.get("PIPELINE_VERBOSE", "") in ("", "0"):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
