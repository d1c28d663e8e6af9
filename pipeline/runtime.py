"""How the commands start TensorFlow: quietly, without Keras' unused optional integrations, and with
a persistent XLA compilation cache.

The cache holds the compiled training epoch on disk, so a rerun with the same network and batch
shapes (a new learning rate, seed or number of epochs) loads it instead of compiling again: about a
second and 110 MB of peak memory less per run (docs/performance.md). Entries are keyed by the
graph, and the folder by everything else that shapes the machine code (TensorFlow's version, the
CPU's features, XLA's flags), so an entry is only ever loaded where it was compiled for. It is a
cache: deleting it is always safe.
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
from pipeline.errors import PipelineError, ResourceError

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
    if not quiet.VERBOSE:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO and WARNING lines
    with quiet.filtered_stderr(), _hidden(_KERAS_EXTRAS):
        import keras  # noqa: F401  (the stages' Keras 3, beside the one `tf.keras` wraps)
        import tensorflow

        tensorflow.config.list_logical_devices()  # initialises the runtime, as the first op would


@contextlib.contextmanager
def cache_errors_explained() -> Iterator[None]:
    """A damaged cache entry, or a disk that filled up while an entry was written, makes TensorFlow fail
    the first epoch; clear the cache and say which it was."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as error:
        folder = _cache_dir
        if folder is None or not folder.is_dir() or not any(folder.iterdir()):
            raise
        shutil.rmtree(folder, ignore_errors=True)
        if "No space left on device" in (error.message or ""):
            raise ResourceError(
                f"no space left on the device to write the XLA compilation cache in {folder}; free some "
                "space and run the command again (the cache has been cleared)."
            ) from None
        reason = error.message.splitlines()[0] if error.message else type(error).__name__
        raise PipelineError(
            f"TensorFlow could not run the compiled training ({reason}); the XLA compilation cache it "
            f"loaded from {folder} may be damaged and has been cleared: run the command again."
        ) from None
