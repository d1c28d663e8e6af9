"""How the commands start TensorFlow: quietly, without Keras' unused optional integrations, and with
a persistent XLA compilation cache.

The cache holds the compiled training epoch on disk, so a rerun with the same network and batch
shapes (a new learning rate, seed or number of epochs) loads it instead of compiling again: about a
second and 110 MB of peak memory less per run (docs/performance.md). Entries are keyed by the
graph, and the folder by everything else that shapes the machine code (TensorFlow's version, the
CPU's features, XLA's flags), so an entry is only ever loaded where it was compiled for. It is a
cache: deleting it is safe while no training on the machine uses it. Processes share it, so a damaged
entry is removed alone (`cache_errors_explained`), never the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import shutil
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

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
    if not quiet.VERBOSE:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO and WARNING lines
    with quiet.filtered_stderr(), _hidden(_KERAS_EXTRAS):
        import keras  # noqa: F401  (the stages' Keras 3, beside the one `tf.keras` wraps)
        import tensorflow

        tensorflow.config.list_logical_devices()  # initialises the runtime, as the first op would


# What TensorFlow 2.21 raises when it reads a cache entry it cannot use (the persistor of
# tensorflow/compiler/jit/device_executable_persistor.h, then XLA:CPU's loader): a file cut short, bytes
# that are no protobuf (the message names the file), an entry whose key or program is not the one its
# name says, one without compiled code, compiled code that does not parse.
_DAMAGED_ENTRY = (
    "Read less bytes than requested",
    "as binary proto",
    "Serialized cache key does not match",
    "Serialized HLO does not match",
    "No binary found in serialized entry",
    "Failed to parse serialized CpuAotCompilationResult",
)
_NAMED_ENTRY = re.compile(r"Can't parse (?P<path>\S+\.pb) as binary proto")


def _fields(data: bytes) -> dict[int, Any]:
    """The top-level fields of a serialized protobuf message, by number (DecodeError if it is not one)."""
    from google.protobuf import empty_pb2
    from google.protobuf.unknown_fields import UnknownFieldSet

    message = empty_pb2.Empty()
    message.ParseFromString(data)
    return {field.field_number: field.data for field in UnknownFieldSet(message)}


def entry_is_intact(path: Path) -> bool:
    """Whether a cache entry holds a whole `XlaSerializedCacheEntry` (tensorflow/compiler/jit/
    xla_compilation_cache.proto: 1 key, 2 program, 3 compiled code) for the key its file name spells
    (`<prefix>__<signature>__<cluster>__<device>.pb`, from key fields 4, 1, 2, 3), all three parsing."""
    from google.protobuf.message import DecodeError

    try:
        entry = _fields(path.read_bytes())
        key = _fields(entry[1])
        _fields(entry[2])
        _fields(entry[3])
        prefix = key.get(4, b"").decode()
        name = f"{prefix}{'__' if prefix else ''}{key[1]}__{key[2]}__{key[3].decode()}.pb"
    except (OSError, DecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return False
    return name == path.name and bool(entry[3])


def _remove_damaged(folder: Path, named: Path | None) -> list[Path]:
    """Remove the entry TensorFlow named, and every entry of `folder` that is not intact; return them.

    Only those files go: another process on this machine may be reading or writing other entries
    right now (TensorFlow writes each to a temporary file of its own, then renames it into place), so
    the folder and the other entries stay. If a writer has just renamed a good entry over a damaged
    one, that entry goes too: a cache miss, compiled again by the next run."""
    damaged = [path for path in sorted(folder.glob("*.pb")) if path == named or not entry_is_intact(path)]
    for path in damaged:
        path.unlink(missing_ok=True)
    return damaged


@contextlib.contextmanager
def cache_errors_explained() -> Iterator[None]:
    """TensorFlow's errors of a compiled training, told apart: a damaged cache entry is removed (only
    it) and named; running out of memory, or out of disk while an entry was written, is a ResourceError;
    any other error passes through unchanged."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as error:
        reason, folder = first_line(error), _cache_dir
        if "No space left on device" in (error.message or ""):
            where = f"the XLA compilation cache in {folder}" if folder else "TensorFlow's files"
            raise ResourceError(f"no space left on the device to write {where}; free some space, run again.") from None
        if isinstance(error, tf.errors.ResourceExhaustedError):
            raise ResourceError(
                f"TensorFlow ran out of memory while training ({reason}); use fewer or smaller hidden layers "
                "(model.hidden_units) or a smaller train.batch_size."
            ) from None
        if folder is None or not any(marker in reason for marker in _DAMAGED_ENTRY):
            raise
        match = _NAMED_ENTRY.search(reason)
        named = Path(match["path"]) if match else None
        removed = _remove_damaged(folder, named if named and named.parent == folder else None)
        if not removed:
            raise PipelineError(
                f"TensorFlow could not load a compiled training from the XLA compilation cache in {folder} "
                f"({reason}); delete that folder while no training runs on this machine, and run again."
            ) from None
        names = ", ".join(path.name for path in removed)
        raise PipelineError(
            f"TensorFlow could not load a compiled training from the XLA compilation cache ({reason}): the "
            f"damaged entr{'y' if len(removed) == 1 else 'ies'} {names} in {folder} "
            f"{'was' if len(removed) == 1 else 'were'} removed; run the command again."
        ) from None
