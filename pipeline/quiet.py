"""Quiet output: the known noise of TensorFlow, absl, MLflow and matplotlib, hidden; real warnings kept.

`import tensorflow` prints C++ lines (cuInit, CUDA stubs, "All log messages before
absl::InitializeLog()") straight to file descriptor 2 before absl is initialised, so neither
TF_CPP_MIN_LOG_LEVEL nor Python's logging can stop them. `filtered_stderr` points fd 2 at a temporary
file around such code and then re-emits every line that is not known noise, so real warnings and
errors still reach the terminal. Set PIPELINE_VERBOSE=1 to see everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

VERBOSE = os.environ.get("PIPELINE_VERBOSE", "") not in ("", "0")

_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc|cuInit|"
    r"Could not find cuda drivers|oneDNN custom operations|TF_ENABLE_ONEDNN_OPTS|"
    r"This TensorFlow binary is optimized|rebuild TensorFlow with the appropriate compiler flags|"
    r"cpu_feature_guard\.cc|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|"
    r"use_unbounded_threadpool|"
    # a cache entry is tried as text before binary; the binary form is the one XLA's cache writes
    r"Error parsing text-format tensorflow\.XlaSerializedCacheEntry|"
    # MLflow's registry chatter; the train stage prints its own line naming the version
    r"Successfully registered model|Registered model '.*' already exists|Created version '"
)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Hold what C++ code writes to fd 2 in a temporary file, then re-emit all but the known noise."""
    if VERBOSE:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines() if not _NOISE.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


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
