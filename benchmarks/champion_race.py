"""Replay the champion race of two trainings that finish at the same moment, many times.

Two worker processes promote two new versions of `mnist-bn-mlp` (validation accuracy 0.95 and 0.90)
released together by a barrier, on a fresh SQLite store or a real `mlflow server` (two server
workers), then the alias is read: it must name the 0.95 version. Each try runs either the rule the
pipeline uses (`tracking.promote_if_better`) or the read-compare-set it replaced (kept below as the
baseline), alternating, so both face the same machine at the same time. Prints how often each ended
with the 0.90 version as champion, and how often a promoter failed outright. tests/test_registry.py
forces every interleaving; this shows how often the unforced race happens.

    python benchmarks/champion_race.py --tries 50             # SQLite store
    python benchmarks/champion_race.py --tries 50 --server    # a real mlflow server
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

RULES = ("replaced", "pipeline")


def replaced_rule(run_id: str, val_accuracy: float) -> bool:
    """promote_if_better as it was: compare with the champion's tag, then move the alias."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import registry

    version = registry._version_of(run_id)
    client = MlflowClient()
    client.set_model_version_tag(registry.REGISTERED_MODEL, version.version, "val_accuracy", f"{val_accuracy:.6f}")
    try:
        champion = client.get_model_version_by_alias(registry.REGISTERED_MODEL, registry.CHAMPION)
        best = float(champion.tags.get("val_accuracy", "-1"))
    except MlflowException:
        best = -1.0
    if val_accuracy <= best:
        return False
    client.set_registered_model_alias(registry.REGISTERED_MODEL, registry.CHAMPION, version.version)
    return True


def worker(uri: str, jobs: Any, done: Any, barrier: Any) -> None:
    """Promote what each job names, all workers released at once by the barrier."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from pipeline import tracking

    tracking.connect()
    while (job := jobs.get()) is not None:
        rule, run_id, accuracy = job
        promote = tracking.promote_if_better if rule == "pipeline" else replaced_rule
        barrier.wait()
        try:
            done.put(promote(run_id, accuracy))
        except Exception as error:  # reported, never hidden
            done.put(f"{type(error).__name__}: {error}")


def start_server(folder: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and two workers; its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
    ]
    log = (folder / "server.log").open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return url, server
        except requests.RequestException:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise SystemExit(f"the mlflow server did not start; see {folder / 'server.log'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=20, help="tries per rule (default 20)")
    parser.add_argument("--server", action="store_true", help="race on a real mlflow server, not SQLite")
    args = parser.parse_args()
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        server = None
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        if args.server:
            uri, server = start_server(folder)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            results = race(uri, args.tries)
        finally:
            if server is not None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
    store = "an mlflow server (2 workers)" if args.server else "SQLite"
    for rule, (wrong, failed, error) in results.items():
        print(
            f"{rule} rule on {store}: the 0.90 version ended as champion in {wrong} of {args.tries} tries, "
            f"a promoter failed in {failed}" + (f" ({error})" if error else "")
        )


def race(uri: str, tries: int) -> dict[str, tuple[int, int, str]]:
    """`tries` races per rule, alternating rules; per rule: the wrong champions, the tries in which a
    promoter failed (the store refusing a second alias row), and the first such error."""
    from mlflow import MlflowClient

    from pipeline import tracking
    from pipeline.tracking import registry

    experiment_id = tracking.connect()
    client = MlflowClient()
    runs = [tracking.create_run(experiment_id, f"training-{n}", tags={}) for n in range(2)]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    jobs = [context.Queue() for _ in runs]
    done = context.Queue()
    workers = [context.Process(target=worker, args=(uri, queue, done, barrier)) for queue in jobs]
    for process in workers:
        process.start()
    wrong, failed = dict.fromkeys(RULES, 0), dict.fromkeys(RULES, 0)
    first_error: dict[str, str] = {}
    try:
        for attempt in range(tries * len(RULES)):
            rule = RULES[attempt % len(RULES)]
            if client.search_registered_models(f"name = '{registry.REGISTERED_MODEL}'"):
                client.delete_registered_model(registry.REGISTERED_MODEL)
            client.create_registered_model(registry.REGISTERED_MODEL)
            # which worker holds the better version, and which version is registered first, alternate
            better = (attempt // len(RULES)) % 2
            order = runs if (attempt // (2 * len(RULES))) % 2 == 0 else runs[::-1]
            versions = {}
            for run_id in order:
                source = f"{client.get_run(run_id).info.artifact_uri}/model"
                versions[run_id] = client.create_model_version(registry.REGISTERED_MODEL, source, run_id=run_id).version
            for n, queue in enumerate(jobs):
                queue.put((rule, runs[n], 0.95 if n == better else 0.90))
            answers = [done.get(timeout=300) for _ in jobs]
            if errors := [answer for answer in answers if isinstance(answer, str)]:
                failed[rule] += 1
                first_error.setdefault(rule, errors[0].splitlines()[0][:160])
                continue
            champion = client.get_model_version_by_alias(registry.REGISTERED_MODEL, registry.CHAMPION).version
            wrong[rule] += str(champion) != str(versions[runs[better]])
    finally:
        for queue in jobs:
            queue.put(None)
        for process in workers:
            process.join(timeout=60)
    return {rule: (wrong[rule], failed[rule], first_error.get(rule, "")) for rule in RULES}


if __name__ == "__main__":
    main()
