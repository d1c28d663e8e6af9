"""How long `mlflow ui` takes to answer its first page, and what its processes spend getting there.

For each form of the command, in alternating order, it starts `mlflow ui` on the project's store
(`mlflow.db` at the repository root: run `dvc repro` first) on a free port of 127.0.0.1 and asks,
every 0.2 s, for the UI's page `/` and then for the runs of the experiment (the first request the
page makes that reads the store). It prints the seconds until each answered 200, how many Python
processes the command had started by then and the CPU seconds they had used, then stops it.
  readme   the README's command: one worker, no job runner (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false)
  default  MLflow's defaults: 4 uvicorn workers and the job runner with its huey consumers

Usage:
    python benchmarks/ui_start.py [--pairs 2] [--forms readme default]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
FORMS = {
    "readme": (["--workers", "1"], {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
    "default": ([], {}),
}
RUNS = "/ajax-api/2.0/mlflow/runs/search"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answered(url: str, body: dict | None = None) -> bool:
    try:
        reply = requests.post(url, json=body, timeout=120) if body else requests.get(url, timeout=120)
    except requests.RequestException:
        return False
    return reply.status_code == 200


def tree_cpu(root: psutil.Process) -> tuple[int, float]:
    """(Python processes, CPU seconds) of `root` and its living descendants."""
    processes = [root, *root.children(recursive=True)]
    seconds = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            seconds += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return len(processes), seconds


def once(form: str) -> dict[str, float]:
    """Start the form's command, wait for both answers, stop it; the figures."""
    flags, env = FORMS[form]
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{REPO / 'mlflow.db'}"]
    command += ["--host", "127.0.0.1", "--port", str(port), *flags]
    start = time.monotonic()
    server = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    figures: dict[str, float] = {}
    try:
        base = f"http://127.0.0.1:{port}"
        while not answered(f"{base}/"):
            if server.poll() is not None or time.monotonic() - start > 600:
                raise SystemExit(f"{form}: mlflow ui ended or never answered")
            time.sleep(0.2)
        figures["page_s"] = time.monotonic() - start
        while not answered(f"{base}{RUNS}", {"experiment_ids": ["1"], "max_results": 10}):
            time.sleep(0.2)
        figures["runs_s"] = time.monotonic() - start
        figures["processes"], figures["cpu_s"] = tree_cpu(psutil.Process(server.pid))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--forms", nargs="+", choices=sorted(FORMS), default=["readme", "default"])
    args = parser.parse_args()
    if not (REPO / "mlflow.db").exists():
        raise SystemExit("no mlflow.db at the repository root: run `dvc repro` first")
    results: dict[str, list[dict[str, float]]] = {form: [] for form in args.forms}
    for pair in range(args.pairs):
        for form in args.forms if pair % 2 == 0 else reversed(args.forms):
            results[form].append(once(form))
            print(form, {key: round(value, 1) for key, value in results[form][-1].items()}, flush=True)
    for form, runs in results.items():
        medians = {key: round(statistics.median(run[key] for run in runs), 1) for key in runs[0]}
        print(f"{form}: median of {len(runs)}: {medians}")


if __name__ == "__main__":
    main()
