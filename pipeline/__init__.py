"""A reproducible, tracked DVC + MLflow pipeline for the batch-normalized MNIST network.

One module per DVC stage (`download`, `prepare`, `train`, `evaluate`, with the training itself in
`fit`), configuration and every path in `config`, the one boundary to MLflow in `tracking`, lineage
(git, data hashes) in `lineage`, the network in `model`, the commands `mnist-predict`, `mnist-recipe`
and `mnist-tune` in `predict`, `recipe` and `tune`, and small shared helpers in `io`, `errors`, `cli`,
`plots`, `runtime` (how TensorFlow starts), `quiet` (the libraries' noise) and `timing`.
"""

import os

# Keras 3 runs on TensorFlow here; set before anything imports Keras (the stages, the tests, a notebook).
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
