"""Quiet output: the known noise of TensorFlow, absl, MLflow and matplotlib hidden, real warnings kept; progress.

`import tensorflow` prints C++ lines (cuInit, CUDA stubs, "All log messages before
absl::InitializeLog()") straight to file descriptor 2 before absl is initialised, so neither
TF_CPP_MIN_LOG_LEVEL nor Python's logging can stop them. `filtered_stderr` points fd 2 at a filter
process around such code, which passes every line that is not known noise on as it comes, so real
warnings and errors (a fatal one before an abort included) reach the terminal. PIPELINE_VERBOSE=1: all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

VERBOSE = os.environ.get("PIPELINE_VERBOSE", "") not in ("", "0")

_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc|cuInit|"
    r"Could not find cuda drivers|oneDNN custom operations|TF_ENABLE_ONEDNN_OPTS|"
    r"This TensorFlow binary is optimized|rebuild TensorFlow with the appropriate compiler flags|"
    r"cpu_feature_guard\.cc|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|"
    r"use_unbounded_threadpool|"
    # XLA refusing to compile a training (max pooling's gradient), with the nodes it names: fit.py falls back
    # to a plain graph and says so in one line
    r"Executor failed to create kernel\. UNIMPLEMENTED|tf2xla conversion failed while converting|"
    r"^\s*\[\[(while|\{\{node gradient_tape/.*\}\})\]\]\s*$|"
    # a cache entry is tried as text before binary; the binary form is the one XLA's cache writes
    r"Error parsing text-format tensorflow\.XlaSerializedCacheEntry|"
    # Loading a cache entry, XLA:CPU checks each feature it was compiled for against the host's, and
    # counts the LLVM tuning hints it adds on AVX-512 CPUs (prefer-no-scatter, prefer-no-gather) as
    # features no CPU reports: a "mismatch ... SIGILL" line for each, on the very machine that compiled
    # it. Only those two are hidden: any real feature stays loud (and runtime.xla_cache_dir keys the
    # cache by the CPU's flags, so an entry from another CPU is never loaded).
    r"cpu_aot_loader\.cc:\d+\] Loading XLA:CPU AOT result\. "
    r"Target machine feature \+prefer-no-(scatter|gather) is not +supported on the host machine|"
    # MLflow's registry chatter; the train stage prints its own line naming the version
    r"Successfully registered model|Registered model '.*' already exists|Created version '"
)


def pass_through(source: BinaryIO, sink: BinaryIO) -> None:
    """Copy lines from `source` to `sink` as they come, leaving out the known noise."""
    for line in source:
        if not _NOISE.search(line.decode("utf-8", "replace")):
            sink.write(line)
            sink.flush()


# The filter runs in a process of its own, so that what C++ code writes just before it aborts the
# process (a fatal check, an out-of-memory abort) still reaches the terminal. It runs this file by its
# path: it is also logged beside a registered model (tracking/serving.py), where no `pipeline` package is.
# It has a process group of its own, so Ctrl-C (sent to the terminal's foreground group) reaches only
# the command, which says what it stopped; the filter passes on the last lines and ends when its input
# closes.
_FILTER = (
    "import importlib.util, sys; "
    f"spec = importlib.util.spec_from_file_location('quiet', {str(Path(__file__).resolve())!r}); "
    "quiet = importlib.util.module_from_spec(spec); spec.loader.exec_module(quiet); "
    "quiet.pass_through(sys.stdin.buffer, sys.stdout.buffer)"
)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Send what is written to fd 2 inside the block (C++ code included) through the noise filter."""
    if VERBOSE:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    process = subprocess.Popen(
        [sys.executable, "-c", _FILTER], stdin=subprocess.PIPE, stdout=saved, stderr=saved, process_group=0
    )
    assert process.stdin is not None
    os.dup2(process.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        process.stdin.close()
        # a child process started inside the block may hold the pipe open; its lines still come later
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


@contextlib.contextmanager
def tensorflow_start() -> Iterator[None]:
    """Around TensorFlow's import and first use: its C++ INFO and WARNING lines off, the rest filtered."""
    if not VERBOSE:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with filtered_stderr():
        yield


def configure_logging() -> None:
    """The pipeline's own INFO lines; other libraries only from WARNING on (PIPELINE_VERBOSE=1: all INFO)."""
    logging.basicConfig(level=logging.INFO if VERBOSE else logging.WARNING, format="%(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    if not VERBOSE:
        # MLflow's SQLite set-up ("Creating initial tables", alembic "Context impl SQLiteImpl") and
        # matplotlib's one-off "generated new fontManager" are INFO lines of these loggers.
        for name in ("alembic", "mlflow.store.tracking.sqlalchemy_store", "matplotlib"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # A database that fails (locked, damaged) gets a traceback logged by MLflow for every query it
        # tries before the error reaches the command, which then says it in one line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def progress(total: int, desc: str, unit: str) -> Iterator[Callable[[str, str, bool], None]]:
    """A bar on a terminal, one quiet log line per step elsewhere (CI logs): `step(line, postfix, loud)`
    advances it by one, logging `line`, or on the bar showing `postfix` beside it (and `line` above it
    if `loud`)."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, disable=None, file=sys.stderr) as bar:

        def step(line: str, postfix: str, loud: bool) -> None:
            if bar.disable:
                logging.getLogger("pipeline").info("%s", line)
                return
            bar.set_postfix_str(postfix, refresh=False)
            if loud:
                bar.write(line, file=sys.stderr)
            bar.update()

        yield step
