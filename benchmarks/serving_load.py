"""The scoring server under a bounded load: requests/s, latency and errors of `mlflow models serve`.

Two forms of the same network (params.yaml's architecture; the weights do not change the cost) are
logged into a scratch MLflow store and served side by side on 127.0.0.1:
  checked    as the pipeline logs it (pipeline/tracking/serving.py: every row checked, at most
             `MAX_ROWS` rows per request), and
  unchecked  MLflow's TensorFlow flavour without checks (how the model was served before).
For each pair, in alternating order, each form gets `--clients` concurrent clients (threads, one HTTP
session each) posting the same request of N MNIST test digits for `--seconds`, for each N of `--rows`.
Per form and size it prints requests/s and rows/s (medians over the pairs), p50 and p99 latency (over
every request of every pair) and the errors (any answer but 200). The clients share the machine with
the servers, as a client on the same host would.

Usage (no `dvc repro` needed):
    python benchmarks/serving_load.py [--pairs 3] [--seconds 10] [--clients 16] [--rows 1 100]
                                      [--workers 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the package, and the tests' reader of the offline MNIST copy

from workspace import free_port, offline_mnist  # noqa: E402

from pipeline.config import PARAMS_FILE, load_params  # noqa: E402

FORMS = ("checked", "unchecked")


def log_both(store: str, example: np.ndarray) -> dict[str, str]:
    """Log the network in both forms into `store`; the model URI of each."""
    os.environ["MLFLOW_TRACKING_URI"] = store
    from pipeline import model, runtime, tracking

    runtime.import_tensorflow()
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    network = model.build_model(load_params(REPO / PARAMS_FILE).model)
    with tracking.run(run_name="checked") as checked:
        tracking.log_run(checked, metrics={"val_accuracy": 0.0, "val_loss": 0.0}, step=1)
        tracking.log_model(network, example, None, [])
    with tracking.run(run_name="unchecked") as unchecked:
        served = model.with_softmax(network)
        mlflow.tensorflow.log_model(
            served,
            name="model",
            signature=infer_signature(example, served(example).numpy()),
            input_example=example,
            pip_requirements=[f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"],
        )
    return {"checked": f"runs:/{checked}/{tracking.REGISTERED_MODEL}", "unchecked": f"runs:/{unchecked}/model"}


def serve(uri: str, store: str, workers: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` of `uri` on a free port of 127.0.0.1, once it answers /ping."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "NO_PROXY": "127.0.0.1"}
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(port), "--workers", str(workers)]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"error: {' '.join(command)} exited {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    sys.exit(f"error: {url} did not answer within 180 s:\n{log.read_text()[-2000:]}")


def load(url: str, body: bytes, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads posting `body` until `seconds` have passed: latencies of the 200s, and the errors."""
    headers = {"Content-Type": "application/json"}
    deadline = time.perf_counter() + seconds

    def client(_: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    ok = session.post(f"{url}/invocations", data=body, headers=headers, timeout=60).status_code == 200
                except requests.RequestException:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
        return latencies, errors

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    latencies = [latency for done, _ in results for latency in done]
    return {"wall": wall, "latencies": latencies, "errors": sum(errors for _, errors in results)}


def refusal(url: str, digits: np.ndarray, rows: int) -> dict[str, Any]:
    """One request of `rows` digits, alone: how long the checked server takes to refuse it (MLflow reads
    and parses the whole body before the model sees its size)."""
    body = json.dumps({"inputs": np.resize(digits, (rows, digits.shape[1])).tolist()}).encode()
    started = time.perf_counter()
    response = requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=600)
    seconds = time.perf_counter() - started
    return {"rows": rows, "megabytes": len(body) / 1e6, "status": response.status_code, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="of load per form, size and pair")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 100], help="rows per request")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of each server")
    parser.add_argument(
        "--refused", type=int, nargs="*", default=[1001, 10_000], help="rows of single requests above the limit"
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    images, _ = offline_mnist("t10k")
    digits = images.reshape(len(images), -1).astype(np.float32) / np.float32(255)
    bodies = {n: json.dumps({"inputs": digits[:n].tolist()}).encode() for n in args.rows}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {form: {n: [] for n in args.rows} for form in FORMS}
    with tempfile.TemporaryDirectory() as folder:
        store = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        print("logging both forms of the network into a scratch store ...", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(sys.stderr):  # Keras' progress bar while MLflow checks the example
            uris = log_both(store, digits[:5])
        servers = {form: serve(uris[form], store, args.workers, Path(folder) / f"{form}.log") for form in FORMS}
        try:
            for form in FORMS:  # warm-up: the first requests trace the network
                load(servers[form][1], bodies[args.rows[-1]], args.clients, 2.0)
            for pair in range(args.pairs):
                for form in FORMS if pair % 2 == 0 else FORMS[::-1]:
                    for n in args.rows:
                        result = load(servers[form][1], bodies[n], args.clients, args.seconds)
                        runs[form][n].append(result)
                        print(
                            f"pair {pair + 1} {form:9} {n:4} rows: {len(result['latencies']) / result['wall']:7.1f} "
                            f"requests/s, {result['errors']} errors",
                            file=sys.stderr,
                            flush=True,
                        )
            refused = [refusal(servers["checked"][1], digits, n) for n in args.refused]
        finally:
            for process, _ in servers.values():
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
    summary = []
    print(f"\n{args.clients} clients, {args.workers} worker(s), {args.pairs} pairs of {args.seconds:.0f} s")
    print("| form | rows/request | requests/s | rows/s | p50 ms | p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in args.rows:
        for form in FORMS:
            rates = [len(r["latencies"]) / r["wall"] for r in runs[form][n]]
            latencies = sorted(latency for r in runs[form][n] for latency in r["latencies"])
            row = {
                "form": form,
                "rows": n,
                "requests_per_s": statistics.median(rates),
                "rates": rates,
                "p50_ms": 1000 * float(np.percentile(latencies, 50)),
                "p99_ms": 1000 * float(np.percentile(latencies, 99)),
                "errors": sum(r["errors"] for r in runs[form][n]),
                "requests": len(latencies),
            }
            summary.append(row)
            print(
                f"| {form} | {n} | {row['requests_per_s']:.1f} | {row['requests_per_s'] * n:.0f} | "
                f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} |"
            )
        checked, unchecked = (statistics.median(len(r["latencies"]) / r["wall"] for r in runs[f][n]) for f in FORMS)
        print(f"| checked / unchecked, {n} rows | | {checked / unchecked:.2f} | | | | |")
    for row in refused:
        size = f"{row['rows']} rows ({row['megabytes']:.0f} MB)"
        print(f"refused: {size}: HTTP {row['status']} after {row['seconds']:.2f} s")
    if args.json:
        meta = {
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        args.json.write_text(json.dumps({**meta, "results": summary, "refused": refused}, indent=2))


if __name__ == "__main__":
    main()
