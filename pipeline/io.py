"""Small file helpers shared by the stages: atomic writes and pickle-free array files.

A stage killed at any moment (Ctrl-C, SIGTERM, power loss) must leave either the old output or the
new one, never a half-written file: everything is written to a temporary file in the same folder and
then renamed over the target, which POSIX guarantees to be atomic.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp" + target.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        tmp_path.replace(target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(target: Path, data: bytes) -> None:
    """Write `data` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path, text: str) -> None:
    """Write `text` to `target` atomically."""
    write_bytes(target, text.encode("utf-8"))


def write_json(target: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON, atomically."""
    write_text(target, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(source: Path, produced_by: str) -> dict[str, Any]:
    """Read a JSON file that an earlier stage wrote, with a clear error if it is missing or corrupt."""
    try:
        return json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{source} is missing; run `dvc repro {produced_by}` to create it.") from None
    except (OSError, ValueError) as error:
        raise DataError(f"{source} is corrupt ({error}); run `dvc repro -f {produced_by}` to rebuild it.") from None


def save_arrays(target: Path, **arrays: np.ndarray) -> None:
    """Save named arrays as an uncompressed .npz (no pickle), atomically."""
    with atomic_path(target) as tmp, tmp.open("wb") as handle:
        np.savez(handle, **arrays)


def load_arrays(source: Path, produced_by: str) -> dict[str, np.ndarray]:
    """Load an .npz written by `save_arrays`; refuses pickled objects, explains missing or corrupt files."""
    try:
        with np.load(source, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise DataError(f"{source} is missing; run `dvc repro {produced_by}` to create it.") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"{source} is corrupt ({error}); run `dvc repro -f {produced_by}` to rebuild it.") from None
