"""How the commands start TensorFlow: quietly, without Keras' unused optional integrations, and with
a persistent XLA compilation cache.

The cache holds the compiled training epoch on disk, so a rerun with the same network and batch
shapes (a new learning rate, seed or number of epochs) loads it instead of compiling again (less time
and peak memory: docs/performance.md). Entries are keyed by the graph, and the folder by everything
else that shapes the machine code (TensorFlow's version, the CPU's features, XLA's flags), so an entry
is only ever loaded where it was compiled for. It is only a cache: deleting it is safe while no
training on the machine uses it, which is what `cache_errors_explained` asks when a training fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

from pipeline import quiet
from pipeline.config import XLA_CACHE_DIR
from pipeline.errors import PipelineError, ResourceError, first_line

# Keras imports these at start-up only for integrations the pipeline never uses (DataFrame inputs,
# image galleries, scikit-learn wrappers), each inside `try: ... except ImportError`. Hidden while
# TensorFlow and Keras import, they cost neither time nor memory there; the pipeline's own imports
# of them later work as usual.
_KERAS_EXTRAS = ("pandas", "sklearn", "matplotlib")

# TensorFlow fails the compilation itself when it cannot write a cache entry (a few MB at most), so the
# cache is used only where its disk has room to spare.
_MIN_FREE_BYTES = 64 * 1024 * 1024

_cache_dir: Path | None = None  # the folder this process's XLA cache was set to, if any


def xla_cache_dir(root: Path) -> Path:
    """The cache folder for this TensorFlow, this CPU and these XLA flags, under `root`."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: the machine's name and processor, as Python knows them
        lines = [f"flags {platform.machine()} {platform.processor()}"]
    cpu = next((line for line in lines if line.startswith("flags")), "")
    flags = os.environ.get("XLA_FLAGS", "") + "|" + os.environ.get("TF_XLA_FLAGS", "")
    digest = hashlib.sha256(f"{cpu}|{flags}".encode()).hexdigest()[:12]
    return root / XLA_CACHE_DIR / f"tensorflow-{version('tensorflow')}-{digest}"


def _free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds (or will hold) `folder`."""
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    return shutil.disk_usage(existing).free


@contextlib.contextmanager
def _hidden(modules: tuple[str, ...]) -> Iterator[None]:
    """Make `import <module>` fail inside the block, for the modules not imported yet."""
    hidden = [name for name in modules if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # Python's own marker for "cannot be imported"
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def import_tensorflow(cache_root: Path | None = None) -> None:
    """Import TensorFlow and Keras and set up the devices, without their known noise; with
    `cache_root`, compiled XLA programs persist in `xla_cache_dir(cache_root)` if its disk has room."""
    global _cache_dir
    if "tensorflow" in sys.modules:
        return
    if cache_root is not None and _free_bytes(folder := xla_cache_dir(cache_root)) >= _MIN_FREE_BYTES:
        _cache_dir = folder
        os.environ["TF_XLA_FLAGS"] = (
            f"{os.environ.get('TF_XLA_FLAGS', '')} --tf_xla_persistent_cache_directory={folder}"
        ).strip()
    with quiet.tensorflow_start(), _hidden(_KERAS_EXTRAS):
        import keras  # noqa: F401  (the stages' Keras 3, beside the one `tf.keras` wraps)
        import tensorflow

        tensorflow.config.list_logical_devices()  # initialises the runtime, as the first op would


@contextlib.contextmanager
def cache_errors_explained() -> Iterator[None]:
    """TensorFlow's errors of a compiled training in one line: running out of memory is a ResourceError;
    with the XLA cache on, any other names the cache as a possible cause (an entry damaged by a crash or
    a full disk: TensorFlow then fails each training of that shape) and how to clear it; without it,
    the error passes through unchanged."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as error:
        reason = first_line(error)
        if isinstance(error, tf.errors.ResourceExhaustedError):
            raise ResourceError(
                f"TensorFlow ran out of memory while training ({reason}); use fewer or smaller hidden layers "
                "(model.hidden_units) or a smaller train.batch_size."
            ) from None
        if _cache_dir is None:
            raise
        raise PipelineError(
            f"TensorFlow failed while training ({reason}); if its XLA compilation cache {_cache_dir} is damaged "
            "(after a crash or a full disk), delete that folder while no training runs on this machine, and run again."
        ) from None
