"""A team's setup, with real processes: an `mlflow server` (SQLite backend, its own proxied artifact
store) on 127.0.0.1, the real `dvc repro` pointed at it by MLFLOW_TRACKING_URI, then the registry's
champion served by `mlflow models serve` and classified by `mnist-predict`.

Checks that everything lands on the server (run, params, curves, test metrics, model version and its
`champion` alias, artifacts in the server's store) and nothing in a local `mlflow.db`, and that the
served model answers MNIST test digits with ten probabilities per row.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image
from workspace import QUICK, free_port, offline_mnist, reproduced, sh, venv_env

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
EPOCHS = QUICK["train__epochs"]
MODEL = "mnist-bn-mlp"


class Process:
    """A server in its own process group (mlflow starts uvicorn workers as children), logged to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("w") as out:
            self.popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_until_up(self, url: str, timeout: float) -> None:
        """Poll `url` until it answers 200; fail with the server's log if it dies or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                pytest.fail(f"{self.popen.args[:3]} exited {self.popen.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pytest.fail(f"{url} did not come up in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to the whole group, then SIGKILL if it has not exited within 15 s."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent
            os.killpg(self.popen.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return venv_env()


@contextmanager
def mlflow_server(root: Path, env: dict[str, str], artifacts: Path | None = None) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite store and served artifacts under `root`, or in
    `artifacts`): its URL, reachable from this process too while the block runs; stopped at the end."""
    with server_process(root, env, artifacts) as (url, _):
        yield url


@contextmanager
def server_process(
    root: Path, env: dict[str, str], artifacts: Path | None = None, options: tuple[str, ...] = ()
) -> Iterator[tuple[str, Process]]:
    """`mlflow_server` with more `options` (`--app-name basic-auth`), and its process (to pause it)."""
    url = f"http://127.0.0.1:{free_port()}"
    process = Process(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(artifacts or root / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            url.rsplit(":", 1)[1],
            "--workers",
            "1",
            *options,
        ],
        root / "server.log",
        env,
    )
    try:
        process.wait_until_up(f"{url}/health", timeout=120)
        with pytest.MonkeyPatch.context() as patch:  # this process talks to the server too: no proxy
            patch.setenv("NO_PROXY", "127.0.0.1,localhost")
            yield url, process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """A real tracking server on 127.0.0.1: its URL and its artifact folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(root, env) as url:
        yield url, root / "artifacts"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str], server: tuple[str, Path]) -> Path:
    """A copy of the repository's tracked files, reduced to a quick configuration, after `dvc repro`
    against the server."""
    return reproduced(tmp_path_factory.mktemp("clone") / "repo", env={**env, "MLFLOW_TRACKING_URI": server[0]}, **QUICK)


@pytest.fixture(scope="module")
def served_model(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str], server: tuple[str, Path], workspace: Path
) -> Iterator[str]:
    """`mlflow models serve` of the registry's champion, fetched from the tracking server."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local"]
    log = tmp_path_factory.getbasetemp() / "serve.log"  # read by test_serving_is_as_quiet_as_the_stages
    process = Process(
        [*command, "-h", "127.0.0.1", "-p", url.rsplit(":", 1)[1]], log, {**env, "MLFLOW_TRACKING_URI": server[0]}
    )
    try:
        process.wait_until_up(f"{url}/ping", timeout=150)
        yield url
    finally:
        process.stop()


def test_the_run_is_on_the_server_and_nothing_is_local(server: tuple[str, Path], workspace: Path) -> None:
    from mlflow import MlflowClient

    url, artifacts = server
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    trained = json.loads((workspace / "runs/train.json").read_text())
    test = json.loads((workspace / "metrics/test.json").read_text())
    run = client.get_run(trained["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "mnist-batchnorm"
    assert yaml.safe_load(run.data.params["train.epochs"]) == EPOCHS
    assert yaml.safe_load(run.data.params["model.hidden_units"]) == [64, 32]
    for metric in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        history = client.get_metric_history(run.info.run_id, f"epoch/{metric}")
        assert [m.step for m in history] == list(range(1, EPOCHS + 1))
    assert run.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    assert run.data.metrics["test_log_loss"] == pytest.approx(test["log_loss"])
    assert test["accuracy"] > 0.85

    versions = client.search_model_versions(f"name = '{MODEL}' and run_id = '{run.info.run_id}'")
    assert len(versions) == 1
    assert float(versions[0].tags["test_accuracy"]) == pytest.approx(test["accuracy"], abs=1e-6)
    assert client.get_model_version_by_alias(MODEL, "champion").version == versions[0].version

    # artifacts went through the server into its own store, nothing into the workspace
    assert next(artifacts.rglob("MLmodel"), None) is not None
    assert next(artifacts.rglob("confusion.png"), None) is not None
    assert not (workspace / "mlflow.db").exists()
    assert not (workspace / "mlartifacts").exists()
    assert not (workspace / "mlruns").exists()


def test_the_served_champion_classifies_mnist(served_model: str) -> None:
    images, labels = offline_mnist("t10k")
    rows = (images[:10].reshape(10, -1).astype(np.float32) / 255).tolist()
    response = requests.post(f"{served_model}/invocations", json={"inputs": rows}, timeout=60)
    assert response.status_code == 200, response.text
    probabilities = np.array(response.json()["predictions"])
    assert probabilities.shape == (10, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert (probabilities.argmax(axis=1) == labels[:10]).sum() >= 8


def test_serving_is_as_quiet_as_the_stages(served_model: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """TensorFlow's C++ start-up lines (absl's preamble, CUDA probing, oneDNN) are filtered out of the
    served model's log, as from the stages'; the server's own lines stay."""
    assert requests.post(f"{served_model}/invocations", json={"inputs": [[0.0] * 784]}, timeout=60).ok
    log = (tmp_path_factory.getbasetemp() / "serve.log").read_text()
    assert "Uvicorn running on" in log and '"POST /invocations HTTP/1.1" 200' in log, log
    for noise in ("absl::InitializeLog", "cuInit", "cudart_stub", "oneDNN custom operations", "cpu_feature_guard"):
        assert noise not in log, log


def test_mnist_predict_uses_the_servers_champion(
    server: tuple[str, Path], workspace: Path, env: dict[str, str], tmp_path: Path
) -> None:
    images, labels = offline_mnist("t10k")
    files = []
    for i in range(3):  # black on white, large: as written on paper and scanned
        files.append(tmp_path / f"digit{i}.png")
        Image.fromarray(255 - images[i]).resize((100, 100), Image.Resampling.BICUBIC).save(files[-1])
    done = sh(BIN / "mnist-predict", *files, cwd=tmp_path, env={**env, "MLFLOW_TRACKING_URI": server[0]})
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert [row[0] for row in rows] == [str(f) for f in files]
    assert [int(row[1]) for row in rows] == labels[:3].tolist()  # 7 2 1: easy ones
    assert all(0.3 < float(row[2]) <= 1 for row in rows)
    assert "Traceback" not in done.stderr
    # it names the version it used: the one the alias named
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server[0], registry_uri=server[0])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert f"model: {MODEL} version {champion.version} (@champion)\n" in done.stderr, done.stderr
    assert not (tmp_path / "mlflow.db").exists()


def request_body(token: str = "0.0", columns: int = 784, rows: int = 1) -> str:
    """A JSON request of `rows` rows of `columns` zeros whose value 5 of the first row is `token`, written
    as raw text: `NaN` and `Infinity` are what a client's JSON encoder may send, not valid JSON."""
    values = ["0.0"] * columns
    values[5] = token
    first = "[" + ",".join(values) + "]"
    zeros = "[" + ",".join(["0.0"] * columns) + "]"
    return '{"inputs": [' + ",".join([first] + [zeros] * (rows - 1)) + "]}"


def post(url: str, body: str) -> requests.Response:
    return requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=120)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (request_body("NaN"), "row 0, value 5 is nan"),
        (request_body("Infinity"), "row 0, value 5 is inf"),
        (request_body("-Infinity"), "row 0, value 5 is -inf"),
        (request_body('"NaN"'), "row 0, value 5 is nan"),
        (request_body("1e300"), "row 0, value 5 is inf"),
        (request_body("-0.1"), "outside [0, 1]"),
        (request_body("1.5"), "outside [0, 1]"),
        (request_body(columns=785), "784"),
        (request_body(rows=1001), "1001 rows in one request, above this model's limit of 1000"),
    ],
    ids=["NaN", "Infinity", "-Infinity", "string NaN", "1e300", "-0.1", "1.5", "785 values", "1001 rows"],
)
def test_the_served_model_refuses_what_is_not_a_digit(served_model: str, body: str, says: str) -> None:
    response = post(served_model, body)
    assert response.status_code == 400, response.text[:500]
    answer = json.loads(response.text, parse_constant=lambda name: pytest.fail(f"{name} in the answer"))
    assert answer["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    assert says in answer["message"], answer["message"][-500:]
    print(answer["message"][-300:])  # shown with `pytest -rP`: what a client reads


def test_a_server_can_start_with_another_row_limit(
    tmp_path: Path, env: dict[str, str], server: tuple[str, Path], workspace: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local"]
    settings = {"MLFLOW_TRACKING_URI": server[0], "PIPELINE_SERVING_MAX_ROWS": "2"}
    address = ["-h", "127.0.0.1", "-p", url.rsplit(":", 1)[1]]
    process = Process([*command, *address], tmp_path / "serve.log", env | settings)
    try:
        process.wait_until_up(f"{url}/ping", timeout=150)
        assert post(url, request_body(rows=2)).status_code == 200
        refused = post(url, request_body(rows=3))
        assert refused.status_code == 400 and "3 rows in one request, above this model's limit of 2" in refused.text
    finally:
        process.stop()


def test_the_served_model_still_answers_good_rows_at_the_limit(served_model: str) -> None:
    response = post(served_model, request_body("0.5", rows=1000))
    assert response.status_code == 200, response.text[:500]
    probabilities = np.array(json.loads(response.text)["predictions"])
    assert probabilities.shape == (1000, 10) and np.isfinite(probabilities).all()
