"""The edit-and-rerun loop against the tutorial's own program: wall time, where it goes, peak memory.

Each pair runs, one after the other on the same prepared data:
  reference  `python benchmarks/reference_tf1.py` (the tutorial's TF1 program, see its docstring), and
  loop       `dvc repro` after a change of `train.learning_rate` (a new value each time, so neither
             DVC's run cache nor anything else can skip work): the `train` and `evaluate` stages.
The loop runs in a scratch copy of this repository with its own MLflow store, so the benchmark never
touches your runs or outputs. With `--baseline REV`, each pair also runs the same loop in a scratch copy
of git revision REV (the two loops in alternating order), and the report adds the training loop's and
the train stage's ratios to that revision's: what a change costs, measured in the same run. The stages
report their phases through `PIPELINE_TIMINGS` (pipeline/timing.py); the loop's DVC overhead is its wall
time minus the two stage processes'.

Usage, after `dvc repro` and `pip install -c requirements.lock -e ".[bench]"` (the reference needs
tf_keras):
    python benchmarks/loop_speed.py [--pairs 3] [--json results.json] [--baseline main]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the package, and the tests' copy of the repository

from workspace import clone  # noqa: E402

from pipeline.config import PARAMS_FILE, PREPARED_DIR, load_params  # noqa: E402


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB, the kernel's high-water mark of the largest process in the tree, as
    `/usr/bin/time -v` reports it) and stdout of one command."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode:
            sys.exit(f"error: {' '.join(command)} failed ({process.returncode}):\n{err.read()[-2000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


def scratch_copy(destination: Path) -> Path:
    """The repository's tracked files as a fresh git repository (the tests' `clone`), with `dvc repro` run once."""
    clone(destination)
    subprocess.run(["dvc", "repro"], cwd=destination, check=True, capture_output=True)
    return destination


def baseline_copy(destination: Path, rev: str) -> Path:
    """The repository's files at git revision `rev` as a fresh git repository, with `dvc repro` run once."""
    clone(destination, rev)
    subprocess.run(["dvc", "repro"], cwd=destination, check=True, capture_output=True)
    return destination


def set_learning_rate(repo: Path, value: float) -> None:
    path = repo / PARAMS_FILE
    document = yaml.safe_load(path.read_text())
    document["train"]["learning_rate"] = value
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def run_loop(repo: Path, value: float, env: dict[str, str], timings: Path) -> dict[str, Any]:
    """`dvc repro` in `repo` after setting `train.learning_rate` to `value`: wall, peak, training, stages."""
    set_learning_rate(repo, value)
    wall, peak, _ = timed(["dvc", "repro"], repo, env | {"PIPELINE_TIMINGS": str(timings)})
    stages = {line["stage"]: line for line in map(json.loads, timings.read_text().splitlines())}
    return {"wall": wall, "peak_rss_mib": peak, "train_seconds": train_seconds(repo), "stages": stages}


def train_seconds(repo: Path) -> float:
    """The training loop's seconds, from the MLflow run that runs/train.json names (a baseline from
    before that file has them in metrics/train.json)."""
    from mlflow import MlflowClient

    summary = json.loads((repo / "metrics/train.json").read_text())
    if "train_seconds" in summary:
        return float(summary["train_seconds"])
    run_id = json.loads((repo / "runs/train.json").read_text())["mlflow_run_id"]
    store = f"sqlite:///{repo / 'mlflow.db'}"
    return float(MlflowClient(tracking_uri=store).get_run(run_id).data.metrics["train_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--baseline", metavar="REV", help="also time the loop at this git revision, alternating")
    args = parser.parse_args()
    params = load_params(REPO / PARAMS_FILE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PIPELINE_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    pairs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        print("preparing a scratch copy (one full dvc repro) ...", file=sys.stderr, flush=True)
        repo = scratch_copy(Path(folder) / "repo")
        copies = {"loop": repo}
        if args.baseline:
            copies["baseline"] = baseline_copy(Path(folder) / "baseline", args.baseline)
        reference = [sys.executable, str(REPO / "benchmarks/reference_tf1.py"), "--quiet"]
        reference += ["--data", str(repo / PREPARED_DIR), "--epochs", str(params.train.epochs)]
        for pair in range(1, args.pairs + 1):
            ref_wall, ref_peak, ref_out = timed(reference, repo, env)
            ref = json.loads(ref_out.strip().splitlines()[-1])
            value = params.train.learning_rate * (1 + pair * 1e-6)
            order = list(copies) if pair % 2 else list(reversed(copies))  # neither loop always runs first
            loops = {name: run_loop(copies[name], value, env, Path(folder) / f"{name}-{pair}.jsonl") for name in order}
            loop = loops["loop"]
            pairs.append(
                {
                    "reference": {"wall": ref_wall, "peak_rss_mib": ref_peak, "train_seconds": ref["train_seconds"]},
                    "loop": {key: loop[key] for key in ("wall", "peak_rss_mib", "train_seconds")},
                    "stages": loop["stages"],
                    "dvc_overhead": loop["wall"] - sum(stage["process_seconds"] for stage in loop["stages"].values()),
                    **({"baseline": loops["baseline"]} if "baseline" in loops else {}),
                }
            )
            print(
                f"pair {pair}: reference {ref_wall:.1f} s (training {ref['train_seconds']:.1f} s), "
                + ", ".join(
                    f"{name} {run['wall']:.1f} s (training {run['train_seconds']:.1f} s)" for name, run in loops.items()
                ),
                file=sys.stderr,
                flush=True,
            )
    report(pairs)
    if args.baseline:
        report_baseline(pairs, args.baseline)
    if args.json:
        args.json.write_text(
            json.dumps({"python": sys.version.split()[0], "cpus": os.cpu_count(), "pairs": pairs}, indent=2)
        )


def report(pairs: list[dict[str, Any]]) -> None:
    """Medians over the pairs: the two whole processes, their ratio, each phase, each stage's memory."""

    def row(label: str, seconds: list[float], mib: list[float] | None = None) -> None:
        memory = f"  {statistics.median(mib):9.0f}" if mib else ""
        print(f"{label:50} {statistics.median(seconds):9.2f}{memory}")

    reference, loop = [p["reference"] for p in pairs], [p["loop"] for p in pairs]
    print(f"{'':50} {'median s':>9}  {'peak MiB':>9}")
    row("reference program, whole process", [r["wall"] for r in reference], [r["peak_rss_mib"] for r in reference])
    row("  of which its training loop", [r["train_seconds"] for r in reference])
    row("dvc repro after a train.* change", [r["wall"] for r in loop], [r["peak_rss_mib"] for r in loop])
    row("  DVC itself", [p["dvc_overhead"] for p in pairs])
    for stage in pairs[0]["stages"]:
        rows = [p["stages"][stage] for p in pairs]
        row(f"  stage {stage}, whole process", [r["process_seconds"] for r in rows], [r["peak_rss_mib"] for r in rows])
        row(
            "    start-up (interpreter, pipeline, params)",
            [r["process_seconds"] - sum(r["phases"].values()) for r in rows],
        )
        for name in rows[0]["phases"]:
            row(f"    {name}", [r["phases"].get(name, 0.0) for r in rows])
    for label, ratios in (
        ("loop / reference, whole process", [b["wall"] / a["wall"] for a, b in zip(reference, loop, strict=True)]),
        (
            "training loop / reference's",
            [b["train_seconds"] / a["train_seconds"] for a, b in zip(reference, loop, strict=True)],
        ),
    ):
        print(f"{label}: median {statistics.median(ratios):.2f} (pairs: {', '.join(f'{r:.2f}' for r in ratios)})")


def report_baseline(pairs: list[dict[str, Any]], rev: str) -> None:
    """This tree's loop against the baseline revision's, pair by pair: training loop, train stage, loop."""
    measures = {
        "training loop (train_seconds)": lambda run, stages: run["train_seconds"],
        "train stage, whole process": lambda run, stages: stages["train"]["process_seconds"],
        "dvc repro after a train.* change": lambda run, stages: run["wall"],
    }
    for label, measure in measures.items():
        ratios = [measure(p["loop"], p["stages"]) / measure(p["baseline"], p["baseline"]["stages"]) for p in pairs]
        listed = ", ".join(f"{ratio:.3f}" for ratio in ratios)
        print(f"{label} / {rev}'s: median {statistics.median(ratios):.3f} (pairs: {listed})")


if __name__ == "__main__":
    main()
