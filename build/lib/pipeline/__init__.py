"""A reproducible, tracked DVC + MLflow pipeline for the batch-normalized MNIST network.

One module per DVC stage (`download`, `prepare`, `train`, `evaluate`), configuration in `config`,
everything MLflow in `tracking`, the network in `model`, the `mnist-predict` command in `predict`, and
small shared helpers in `io`, `errors` and `plots`.
"""

import os

# Set before any stage imports TensorFlow: Keras runs on TensorFlow, and TF's C++ start-up chatter
# (oneDNN, CUDA probing) is hidden so that real warnings stand out. Users can still override both.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
