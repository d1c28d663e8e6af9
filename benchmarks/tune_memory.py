"""A search worker's resident memory, trial by trial, over a long study of tiny trials.

One real `mnist-tune` worker (`python -m pipeline.tune`: the copy's code) runs `--trials N` trials of a
one-epoch `[32]` network in a scratch copy of this repository (its own MLflow store and Optuna
storage); this script samples the resident memory of the worker and its children (where a trial
trains in a process of its own) from outside (psutil) and prints its peak during each trial. With
`--baseline REV` the same study runs in a scratch copy of git revision REV afterwards, and the report
puts the two side by side. The figure that matters is the growth per trial after the
first few (least squares over trials 3 to N-1): a worker that frees each trial stays flat.

Usage, after `pip install -c requirements.lock -e .`:
    python benchmarks/tune_memory.py [--trials 40] [--baseline main] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the tests' copy of the repository

from workspace import clone  # noqa: E402

TINY = ["--set", "model.hidden_units=[32]", "--set", "train.epochs=1", "--set", "train.warmup_epochs=0"]
TRIAL_LINE = re.compile(r"trial (\d+): ")


def prepared_copy(destination: Path, rev: str | None, env: dict[str, str]) -> Path:
    """This tree's tracked files (or git revision `rev`'s) as a fresh repository with its data prepared."""
    clone(destination, rev)
    subprocess.run(["dvc", "repro", "prepare"], cwd=destination, env=env, check=True, capture_output=True)
    return destination


def tree_rss(worker: psutil.Process) -> float:
    """MiB resident in the worker and its children (a trial's training process) together."""
    total = 0
    for process in (worker, *worker.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total / 2**20


def worker_memory(repo: Path, trials: int, env: dict[str, str], label: str) -> list[float]:
    """Run one worker of `trials` tiny trials in `repo`; the peak RSS of the worker and its children
    during each trial, in MiB (sampled every 50 ms)."""
    env = env | {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    command = [sys.executable, "-m", "pipeline.tune", "--study", "memory", "--trials", str(trials), *TINY]
    command += ["--storage", f"sqlite:///{repo / 'optuna.db'}"]
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    worker, peaks, started = psutil.Process(process.pid), [0.0], time.monotonic()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peaks[-1] = max(peaks[-1], tree_rss(worker))

    threading.Thread(target=sample, daemon=True).start()
    for line in process.stderr:
        if TRIAL_LINE.match(line):
            seconds = time.monotonic() - started
            print(f"{label}: {seconds:6.0f} s  {line.strip()[:60]:60} {peaks[-1]:7.0f} MiB", flush=True)
            peaks.append(tree_rss(worker))
    done.set()
    if process.wait():
        sys.exit(f"error: the worker in {repo} failed ({process.returncode})")
    return peaks[:-1]


def growth(rss: list[float]) -> float:
    """MiB per trial: the least-squares slope over trials 3 to the last (the first ones warm up)."""
    points = list(enumerate(rss))[3:]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--baseline", metavar="REV", help="also run the study at this git revision")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    if args.trials < 6:
        parser.error("--trials: at least 6, to measure growth after the first few")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OPTUNA_", "PIPELINE_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, rev in (("this tree", None), *([(args.baseline, args.baseline)] if args.baseline else [])):
            repo = prepared_copy(Path(folder) / label.replace(" ", "-"), rev, env)
            results[label] = worker_memory(repo, args.trials, env, label)
    labels = list(results)
    print(f"{'trial':>5} " + " ".join(f"{label + ' MiB':>16}" for label in labels))
    for trial in range(args.trials):
        print(f"{trial:>5} " + " ".join(f"{results[label][trial]:16.0f}" for label in labels))
    for label in labels:
        rss = results[label]
        print(
            f"{label}: {rss[0]:.0f} MiB in trial 0, {rss[3]:.0f} in trial 3, {rss[-1]:.0f} in trial "
            f"{len(rss) - 1}; growth {growth(rss):.1f} MiB per trial (trials 3-{len(rss) - 1})"
        )
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "trials": args.trials, "rss_mib": results}, indent=2))


if __name__ == "__main__":
    main()
