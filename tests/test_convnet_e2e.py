"""The network is one function: the Keras convnet example pasted into `pipeline/model.py` `build_model`,
nothing else changed, goes through the real `dvc repro` to a registered, served model, twice the same.

Its max pooling has no deterministic gradient in XLA, so the training runs without XLA (fit.Trainer);
docs/performance.md gives what that costs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from workspace import CONVNET, clone, offline_mnist, sh, venv_env, with_network

pytestmark = pytest.mark.e2e

# One epoch of Adam, as the example trains (it reaches about 0.97 after its first epoch).
PARAMS = {"train__epochs": 1, "train__optimizer": "adam", "train__learning_rate": 0.001}


def figures(root: Path) -> dict[str, object]:
    """The metrics of both stages, without what differs between runs (the run id, the time)."""
    train = json.loads((root / "metrics/train.json").read_text())
    test = json.loads((root / "metrics/test.json").read_text())
    kept = {f"train.{k}": v for k, v in train.items() if k not in ("mlflow_run_id", "train_seconds")}
    return kept | {f"test.{k}": v for k, v in test.items() if k != "mlflow_run_id"}


def model_md5(root: Path) -> str:
    outs = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train"]["outs"]
    return next(out["md5"] for out in outs if out["path"] == "models/model.keras")


@pytest.fixture(scope="module")
def convnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, object], str]:
    """A clone with only build_model's body replaced, after `dvc repro`: the root, the stage log, the
    figures and the model's hash of that first run."""
    root = clone(tmp_path_factory.mktemp("convnet") / "repo", **PARAMS)
    with_network(root / "pipeline/model.py", CONVNET)
    done = sh("dvc", "repro", cwd=root, env=venv_env())
    return root, done.stdout + done.stderr, figures(root), model_md5(root)


def test_the_convnet_trains_without_xla_to_above_90_percent(convnet: tuple) -> None:
    root, log, first, _ = convnet
    print(first)  # shown with `pytest -rP`: the figures of the run
    assert "training without XLA" in log, log
    assert "Traceback" not in log and not re.search(r"^error:", log, re.M), log
    assert "UNIMPLEMENTED" not in log, "XLA's refusal is said in the pipeline's one line, not TensorFlow's"
    assert first["test.accuracy"] > 0.9
    history = (root / "plots/history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,train_accuracy,val_loss,val_accuracy"


def test_the_registered_convnet_serves_and_checks_its_rows(convnet: tuple) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    root = convnet[0]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/mnist-bn-mlp@champion")
    images, labels = offline_mnist("t10k")
    x = images[:200].reshape(200, -1).astype(np.float32) / 255
    probabilities = np.asarray(served.predict(x))
    assert probabilities.shape == (200, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == labels[:200]).mean() > 0.9
    with pytest.raises(MlflowException, match="784 finite pixel values"):
        served.predict(np.full((1, 784), np.nan, np.float32))


def test_a_rerun_gives_the_same_model_and_metrics(convnet: tuple) -> None:
    root, _, first, md5 = convnet
    sh("dvc", "repro", "-f", "train", cwd=root, env=venv_env())
    assert figures(root) == first
    assert model_md5(root) == md5
