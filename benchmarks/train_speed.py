"""Compare the training speed and accuracy of the project's training stage with the TF1 reference program.

Why: the project claims to reproduce the tutorial's accuracy (see shared SEED.md) while training at most
0.7 times as long as the original graph program on the same machine. This script checks both claims
honestly, in one invocation:

* Both programs run as separate child processes, alternating (reference, project, reference, ...), so
  that neither inherits the other's warm caches or thread pools and slow drifts of the machine (thermal,
  noisy neighbours) hit both sides alike. Each child reports its own training-loop time: the reference
  prints it as JSON, the project writes it to metrics/train.json. Medians over the pairs are compared.
* The project's stage runs exactly as DVC runs it (`python -m pipeline.train` in a folder holding
  params.yaml and data/prepared), but in a fresh temporary folder per run, with its own SQLite MLflow
  store, so a benchmark never touches the repository's models, metrics or MLflow runs.
* Peak memory is the kernel's own high-water mark of each child's resident set, read with os.wait4 (the
  figure `/usr/bin/time -v` prints as "Maximum resident set size"). It is exact, not sampled, and
  belongs to that one child (and any grandchildren it waited for), unlike RUSAGE_CHILDREN, which keeps
  the maximum over every child so far.
* For scale, a separate child measures the float32 matrix-product speed of this machine with TensorFlow
  and derives the time the arithmetic of training alone would need: a lower bound that no program can
  beat, to tell how much of each program's time is overhead.

Usage (from the repository root):
    .venv/bin/python benchmarks/train_speed.py [--pairs 3] [--only both|reference|project] [--json PATH]
        [--epochs N] [--data DIR] [--show-output] [--keep-temp] [--skip-gflops]
The results table goes to stdout; progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_SCRIPT = Path(__file__).resolve().parent / "reference_tf1.py"
TARGET_RATIO = 0.7
TARGET_ACC_DIFF = 0.005
LAYERS = (784, 300, 100, 10)
# The reference's configuration; the project's params.yaml must match it for a like-for-like comparison.
REFERENCE_PARAMS = {
    ("model", "hidden_units"): [300, 100],
    ("model", "activation"): "elu",
    ("model", "batch_norm_momentum"): 0.9,
    ("train", "optimizer"): "sgd",
    ("train", "learning_rate"): 0.01,
}
PROGRESS_LINE = re.compile(r"epoch", re.IGNORECASE)
MATMUL_SHAPES = (  # (m, k, n): (m x k) @ (k x n)
    (250, 784, 300),  # hidden1 forward of one batch
    (784, 250, 300),  # hidden1 kernel gradient (x^T @ dL/dh)
    (250, 300, 100),  # hidden2 forward
    (2048, 2048, 2048),  # big square product: the machine's near-peak figure
)


@dataclass
class Run:
    """One child process: what it reported and what the operating system measured."""

    side: str  # "reference" or "project"
    pair: int
    train_seconds: float
    val_accuracy: float
    test_accuracy: float | None
    wall_seconds: float
    peak_rss_mib: float
    extra: dict[str, Any] = field(default_factory=dict)


def log(message: str) -> None:
    """Progress line on stderr."""
    print(f"[train_speed] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="number of (reference, project) pairs (default 3)")
    parser.add_argument(
        "--only",
        choices=("both", "reference", "project"),
        default="both",
        help="run only one side (to test the orchestration or time one side)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO_ROOT / "data" / "prepared",
        help="prepared data folder shared by both sides (default: data/prepared)",
    )
    parser.add_argument(
        "--project-root",
        type=Path,
        default=REPO_ROOT,
        help="folder put on PYTHONPATH for `python -m pipeline.train` and holding params.yaml "
        "(default: this repository)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="override train.epochs for both sides (for quick checks; default: params.yaml)",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the children (default: this one)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    parser.add_argument("--show-output", action="store_true", help="pass the children's stderr through unfiltered")
    parser.add_argument("--keep-temp", action="store_true", help="keep the project runs' temporary folders")
    parser.add_argument("--skip-gflops", action="store_true", help="skip the matrix-product speed measurement")
    parser.add_argument("--gflops-probe", action="store_true", help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be positive")
    return args


# --------------------------------------------------------------------------------------------------------
# Matrix-product speed (runs in its own child process so the parent never imports TensorFlow)
# --------------------------------------------------------------------------------------------------------


def gflops_probe(block_seconds: float = 0.5, blocks: int = 5) -> dict[str, Any]:
    """Best sustained float32 GFLOP/s of tf.matmul for each shape: best of `blocks` timed blocks."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    results = []
    for m, k, n in MATMUL_SHAPES:
        a = tf.random.uniform((m, k), dtype=tf.float32)
        b = tf.random.uniform((k, n), dtype=tf.float32)
        flops = 2.0 * m * k * n
        for _ in range(3):  # warm-up: kernel selection, thread pool start
            tf.matmul(a, b).numpy()
        start = time.perf_counter()
        reps = 0
        while time.perf_counter() - start < 0.2:
            tf.matmul(a, b).numpy()
            reps += 1
        reps = max(1, int(reps * block_seconds / (time.perf_counter() - start)))
        best = 0.0
        for _ in range(blocks):
            start = time.perf_counter()
            for _ in range(reps):
                c = tf.matmul(a, b)  # eager CPU ops run synchronously; .numpy() below is a final barrier
            c.numpy()
            best = max(best, flops * reps / (time.perf_counter() - start) / 1e9)
        results.append({"shape": f"({m}x{k})@({k}x{n})", "gflops": round(best, 1), "reps_per_block": reps})
    return {"tensorflow": tf.__version__, "matmul": results}


def measure_gflops(python: str) -> dict[str, Any]:
    """Run the probe in a child process and return its JSON."""
    log("measuring float32 matmul GFLOP/s ...")
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), "--gflops-probe"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"error: the GFLOP/s probe failed:\n{tail(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def flops_per_sample() -> dict[str, int]:
    """Forward FLOPs of one sample, the 3x-forward training estimate, and the exact matmul count."""
    forward = 2 * sum(a * b for a, b in itertools.pairwise(LAYERS))
    # Backward = kernel gradients (same FLOPs as forward) + input gradients of every layer but the first.
    input_grads = 2 * sum(a * b for a, b in itertools.pairwise(LAYERS[1:]))
    return {"forward": forward, "train_3x_forward": 3 * forward, "train_exact": 2 * forward + input_grads}


# --------------------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------------------


def tail(text: str, lines: int = 25) -> str:
    """The last lines of a child's output, for error messages."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def pump(stream: IO[str], log_file: IO[str], label: str, show_all: bool) -> None:
    """Copy a child's stderr to its log file; echo epoch lines (or everything) so long runs show life."""
    for line in stream:
        log_file.write(line)
        if show_all or PROGRESS_LINE.search(line):
            print(f"  [{label}] {line.rstrip()[:160]}", file=sys.stderr, flush=True)


def run_child(
    cmd: list[str], cwd: Path, env: dict[str, str], log_path: Path, label: str, show_all: bool
) -> tuple[str, float, float]:
    """Run one child; return (stdout, wall seconds start to exit, peak RSS in MiB). Exits on failure."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as out, log_path.open("w", encoding="utf-8") as err_log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace"
        )
        assert proc.stderr is not None
        reader = threading.Thread(target=pump, args=(proc.stderr, err_log, label, show_all), daemon=True)
        reader.start()
        _, status, usage = os.wait4(proc.pid, 0)  # exact peak RSS of this child, in KiB on Linux
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen the child is already reaped
        reader.join(timeout=10)
        proc.stderr.close()
        out.seek(0)
        stdout = out.read()
    if proc.returncode != 0:
        raise SystemExit(
            f"error: {label} exited with code {proc.returncode}: {' '.join(cmd)} (cwd {cwd})\n"
            f"--- last lines of {log_path} ---\n{tail(log_path.read_text(encoding='utf-8'))}"
        )
    return stdout, wall, usage.ru_maxrss / 1024.0


def child_env(legacy_keras: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with the Keras flavour each side needs."""
    env = dict(os.environ)
    env.pop("TF_USE_LEGACY_KERAS", None)
    if legacy_keras:
        env["TF_USE_LEGACY_KERAS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # progress lines arrive as they are printed
    env.update(extra or {})
    return env


def run_reference(args: argparse.Namespace, train_cfg: dict[str, Any], pair: int, log_dir: Path) -> Run:
    """One run of benchmarks/reference_tf1.py with the project's epochs, batch size and seed."""
    cmd = [
        args.python,
        str(REFERENCE_SCRIPT),
        "--data",
        str(args.data.resolve()),
        "--epochs",
        str(train_cfg["epochs"]),
        "--batch-size",
        str(train_cfg["batch_size"]),
        "--seed",
        str(train_cfg["seed"]),
    ]
    stdout, wall, rss = run_child(
        cmd,
        REPO_ROOT,
        child_env(legacy_keras=True),
        log_dir / f"reference_{pair}.log",
        f"reference {pair}",
        args.show_output,
    )
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise SystemExit(f"error: the reference printed no JSON result line; stdout was:\n{tail(stdout)}") from None
    return Run(
        "reference",
        pair,
        float(result["train_seconds"]),
        float(result["val_accuracy"]),
        float(result["test_accuracy"]),
        wall,
        rss,
    )


def run_project(args: argparse.Namespace, params_text: str, pair: int, log_dir: Path) -> Run:
    """One run of `python -m pipeline.train` in a fresh folder, exactly as the DVC stage runs it."""
    work = Path(tempfile.mkdtemp(prefix=f"train_speed_project_{pair}_"))
    try:
        (work / "params.yaml").write_text(params_text, encoding="utf-8")
        (work / "data").mkdir()
        (work / "data" / "prepared").symlink_to(args.data.resolve(), target_is_directory=True)
        pythonpath = os.pathsep.join(p for p in (str(args.project_root.resolve()), os.environ.get("PYTHONPATH")) if p)
        env = child_env(
            legacy_keras=False, extra={"MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "PYTHONPATH": pythonpath}
        )
        _, wall, rss = run_child(
            [args.python, "-m", "pipeline.train"],
            work,
            env,
            log_dir / f"project_{pair}.log",
            f"project {pair}",
            args.show_output,
        )
        metrics_path = work / "metrics" / "train.json"
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            train_seconds, val_accuracy = float(metrics["train_seconds"]), float(metrics["val_accuracy"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(f"error: the project run left no usable {metrics_path} ({error!r}).") from None
        test = metrics.get("test_accuracy")
        extra = {k: metrics[k] for k in ("val_loss", "mlflow_run_id") if k in metrics}
        if not (work / "models" / "model.keras").is_file():
            log(f"warning: project run {pair} wrote no models/model.keras")
        return Run(
            "project", pair, train_seconds, val_accuracy, None if test is None else float(test), wall, rss, extra
        )
    finally:
        if args.keep_temp:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# Configuration, summary, report
# --------------------------------------------------------------------------------------------------------


def load_params(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The project's params.yaml text (with --epochs applied) and its train section."""
    path = args.project_root / "params.yaml"
    try:
        text = path.read_text(encoding="utf-8")
        params = yaml.safe_load(text)
        train_cfg = params["train"]
        for key in ("epochs", "batch_size", "seed"):
            int(train_cfg[key])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as error:
        raise SystemExit(f"error: cannot read train.epochs/batch_size/seed from {path} ({error!r}).") from None
    if args.epochs is not None:
        params["train"]["epochs"] = args.epochs
        text = yaml.safe_dump(params, sort_keys=False)
    for (section, key), expected in REFERENCE_PARAMS.items():
        actual = params.get(section, {}).get(key)
        if actual != expected:
            log(
                f"warning: params.yaml {section}.{key} = {actual!r}, the reference uses {expected!r}: "
                "the comparison is not like for like"
            )
    if params.get("model", {}).get("batch_norm_logits"):
        log("warning: params.yaml model.batch_norm_logits is true; the reference's loss uses the raw logits")
    return text, params["train"]


def summarize(runs: list[Run], gflops: dict[str, Any] | None, epochs: int, n_train: int) -> dict[str, Any]:
    """Medians per side, the ratio and accuracy checks, and the arithmetic lower bound."""
    summary: dict[str, Any] = {}
    for side in ("reference", "project"):
        mine = [r for r in runs if r.side == side]
        if mine:
            summary[side] = {
                "runs": len(mine),
                "median_train_seconds": statistics.median(r.train_seconds for r in mine),
                "median_val_accuracy": statistics.median(r.val_accuracy for r in mine),
                "median_wall_seconds": statistics.median(r.wall_seconds for r in mine),
                "median_peak_rss_mib": statistics.median(r.peak_rss_mib for r in mine),
            }
    if "reference" in summary and "project" in summary:
        ref, proj = summary["reference"], summary["project"]
        ratio = proj["median_train_seconds"] / ref["median_train_seconds"]
        diff = abs(proj["median_val_accuracy"] - ref["median_val_accuracy"])
        summary["ratio_train_seconds"] = ratio
        summary["ratio_target_met"] = ratio <= TARGET_RATIO
        summary["val_accuracy_abs_diff"] = diff
        summary["val_accuracy_target_met"] = diff <= TARGET_ACC_DIFF
    flops = flops_per_sample()
    total = {name: epochs * n_train * per for name, per in flops.items() if name != "forward"}
    summary["flops"] = {"per_sample": flops, "epochs": epochs, "train_samples": n_train, "total": total}
    if gflops is not None:
        best = max(item["gflops"] for item in gflops["matmul"])
        small = max(item["gflops"] for item in gflops["matmul"] if "2048" not in item["shape"])
        summary["gflops_best"] = best
        summary["gflops_best_network_shapes"] = small
        summary["lower_bound_seconds"] = total["train_3x_forward"] / (best * 1e9)
        summary["lower_bound_seconds_exact_count"] = total["train_exact"] / (best * 1e9)
        summary["lower_bound_seconds_at_network_shapes"] = total["train_3x_forward"] / (small * 1e9)
    return summary


def verdict(ok: bool) -> str:
    """Human-readable pass/fail."""
    return "MET" if ok else "NOT MET"


def print_report(runs: list[Run], summary: dict[str, Any], gflops: dict[str, Any] | None) -> None:
    """The results table on stdout."""

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = (
        f"{'pair':>4}  {'side':<9}  {'train s':>8}  {'val acc':>7}  {'test acc':>8}  {'wall s':>7}  "
        f"{'peak RSS MiB':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        print(
            f"{r.pair:>4}  {r.side:<9}  {r.train_seconds:>8.2f}  {r.val_accuracy:>7.4f}  "
            f"{fmt(r.test_accuracy, '.4f'):>8}  {r.wall_seconds:>7.2f}  {r.peak_rss_mib:>12.0f}"
        )
    print("-" * len(header))
    for side in ("reference", "project"):
        if side in summary:
            s = summary[side]
            print(
                f"{'med':>4}  {side:<9}  {s['median_train_seconds']:>8.2f}  {s['median_val_accuracy']:>7.4f}  "
                f"{'':>8}  {s['median_wall_seconds']:>7.2f}  {s['median_peak_rss_mib']:>12.0f}"
            )
    print()
    if "ratio_train_seconds" in summary:
        print(
            f"ratio project/reference of median training seconds: {summary['ratio_train_seconds']:.3f}"
            f"  (target <= {TARGET_RATIO}: {verdict(summary['ratio_target_met'])})"
        )
        print(
            f"|val accuracy difference| of the medians: {summary['val_accuracy_abs_diff']:.4f}"
            f"  (target <= {TARGET_ACC_DIFF}: {verdict(summary['val_accuracy_target_met'])})"
        )
    else:
        print("ratio and accuracy checks: need both sides (run without --only)")
    fl = summary["flops"]
    print(
        f"FLOPs per training sample: 3 x forward = 3 x {fl['per_sample']['forward']:,} = "
        f"{fl['per_sample']['train_3x_forward']:,}; total for {fl['epochs']} epochs x {fl['train_samples']:,} "
        f"samples = {fl['total']['train_3x_forward'] / 1e12:.2f} TFLOP "
        f"(exact matmul count {fl['total']['train_exact'] / 1e12:.2f} TFLOP)"
    )
    if gflops is not None:
        shapes = ", ".join(f"{item['shape']} {item['gflops']:.0f}" for item in gflops["matmul"])
        print(f"float32 tf.matmul GFLOP/s (TF {gflops['tensorflow']}): {shapes}")
        print(
            f"best sustained: {summary['gflops_best']:.0f} GFLOP/s -> lower bound on training time "
            f"{summary['lower_bound_seconds']:.2f} s (exact count: "
            f"{summary['lower_bound_seconds_exact_count']:.2f} s; at the network shapes' best "
            f"{summary['gflops_best_network_shapes']:.0f} GFLOP/s: "
            f"{summary['lower_bound_seconds_at_network_shapes']:.2f} s)"
        )


def count_train_samples(data_dir: Path) -> int:
    """Number of training samples, read from the labels only (no pickle)."""
    import numpy as np

    with np.load(data_dir / "train.npz", allow_pickle=False) as archive:
        return int(archive["y"].shape[0])


def main(argv: list[str] | None = None) -> None:
    """Run the pairs, print the table, optionally write JSON."""
    args = parse_args(argv)
    if args.gflops_probe:
        print(json.dumps(gflops_probe()), flush=True)
        return
    if not all((args.data / f"{name}.npz").is_file() for name in ("train", "validation", "test")):
        raise SystemExit(f"error: {args.data} lacks train/validation/test.npz; run `dvc repro prepare` first.")
    params_text, train_cfg = load_params(args)
    n_train = count_train_samples(args.data)
    sides = ("reference", "project") if args.only == "both" else (args.only,)
    log_dir = Path(tempfile.mkdtemp(prefix="train_speed_logs_"))
    log(
        f"{args.pairs} pair(s) of {', '.join(sides)}; epochs {train_cfg['epochs']}, batch {train_cfg['batch_size']}, "
        f"seed {train_cfg['seed']}; {os.cpu_count()} CPU(s); child logs in {log_dir}"
    )

    runs: list[Run] = []
    for pair in range(1, args.pairs + 1):
        for side in sides:
            log(f"pair {pair}/{args.pairs}: {side} ...")
            if side == "reference":
                run = run_reference(args, train_cfg, pair, log_dir)
            else:
                run = run_project(args, params_text, pair, log_dir)
            runs.append(run)
            log(
                f"pair {pair}/{args.pairs}: {side}: train {run.train_seconds:.2f} s, val {run.val_accuracy:.4f}, "
                f"wall {run.wall_seconds:.1f} s, peak RSS {run.peak_rss_mib:.0f} MiB"
            )

    gflops = None if args.skip_gflops else measure_gflops(args.python)
    summary = summarize(runs, gflops, int(train_cfg["epochs"]), n_train)
    print_report(runs, summary, gflops)
    if args.json is not None:
        payload = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "processor": platform.processor(),
            },
            "config": {
                "pairs": args.pairs,
                "only": args.only,
                "data": str(args.data.resolve()),
                "epochs": int(train_cfg["epochs"]),
                "batch_size": int(train_cfg["batch_size"]),
                "seed": int(train_cfg["seed"]),
                "target_ratio": TARGET_RATIO,
                "target_val_accuracy_diff": TARGET_ACC_DIFF,
                "peak_rss_method": "os.wait4 ru_maxrss",
            },
            "runs": [asdict(r) for r in runs],
            "summary": summary,
            "gflops": gflops,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
