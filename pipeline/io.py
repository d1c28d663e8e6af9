"""Small file helpers shared by the stages: outputs replaced as a set, and pickle-free array files.

A stage that fails or is killed at any moment (Ctrl-C, SIGTERM, a full disk) must leave either all of
its old outputs or all of its new ones, never a mix and never a half-written file: `staged_outputs`
writes every output to a temporary file beside its target first, and renames them into place only
once all of them are written (a rename needs no space and POSIX makes each one atomic). A process killed
outright (kill -9) leaves its temporary files; the next run that writes the same output removes them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np

from pipeline import processes
from pipeline.errors import DataError, ResourceError

log = logging.getLogger("pipeline.io")


def _temporary_beside(target: Path) -> Path:
    """An empty file `.<name>.<owner>.<random>.tmp<suffix>` beside `target`, where `owner` names this process
    (`processes.owner`), so that a later run can tell a dead process's leftovers from live work."""
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.{processes.owner()}."
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=".tmp" + target.suffix)
    os.close(fd)
    return Path(tmp)


def remove_leftovers(target: Path) -> list[Path]:
    """Remove the temporary files beside `target` that a process killed outright (kill -9, power loss)
    left behind: only names `_temporary_beside` makes (`[a-z0-9_]` is what `tempfile.mkstemp` draws its
    random part from), and only those whose process has ended, so a user's files and another running
    stage's staged outputs stay. Returns what it removed."""
    staged = re.compile(rf"\.{re.escape(target.name)}\.(.+)\.[a-z0-9_]+\.tmp{re.escape(target.suffix)}")
    try:
        entries = list(target.parent.iterdir())
    except OSError:  # no folder yet, or unreadable: nothing of ours there
        return []
    removed = []
    for leftover in entries:
        if (match := staged.fullmatch(leftover.name)) and processes.owner_gone(match[1]):
            try:
                leftover.unlink()
            except OSError:  # gone already (a concurrent sweep), or not ours to delete: leave it
                continue
            removed.append(leftover)
            log.info("removed %s, left by process %s that no longer exists", leftover, match[1].partition("-")[0])
    return removed


class Split(NamedTuple):
    """One split of the data: float32 pixels (n, config.PIXELS) in [0, 1] and int32 labels (n,)."""

    x: np.ndarray
    y: np.ndarray


class StagedOutputs:
    """A stage's outputs, written to temporary files and renamed onto their targets together."""

    def __init__(self) -> None:
        self.pending: dict[Path, Path] = {}  # target -> its temporary file

    def write(self, target: Path, writer: Callable[[Path], object], size: int | None = None) -> None:
        """Let `writer` fill a temporary file that will replace `target` on commit (and first remove what
        a killed earlier run left staged for `target`)."""
        remove_leftovers(target)
        try:
            tmp = _temporary_beside(target)
            self.pending[target] = tmp
            writer(tmp)
        except OSError as error:
            self.discard()  # give back what the partial files took before measuring what is free
            # h5py (inside Keras' model.save) reports a full disk without an errno, in the text only
            if error.errno == errno.ENOSPC or "No space left" in str(error):
                free = shutil.disk_usage(target.parent).free
                needs = f"it needs about {size / 1e6:.1f} MB, " if size else ""
                raise ResourceError(
                    f"no space left on the device to write {target} ({needs}{free / 1e6:.1f} MB free there); "
                    "free some space and run the stage again. The previous outputs were left as they were."
                ) from None
            raise DataError(
                f"cannot write {target} ({error.strerror or error}); check that its folder is writable."
            ) from None

    def write_bytes(self, target: Path, data: bytes) -> None:
        self.write(target, lambda tmp: tmp.write_bytes(data), len(data))

    def write_text(self, target: Path, text: str) -> None:
        self.write_bytes(target, text.encode("utf-8"))

    def write_json(self, target: Path, payload: dict[str, Any]) -> None:
        """Indented JSON with sorted keys; NaN or infinity is refused, it is not JSON."""
        self.write_text(target, json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")

    def save_split(self, target: Path, split: Split) -> None:
        """An uncompressed .npz with arrays `x` and `y` (no pickle)."""

        def writer(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.savez(handle, x=split.x, y=split.y)

        self.write(target, writer, split.x.nbytes + split.y.nbytes)

    def discard(self) -> None:
        for tmp in self.pending.values():
            tmp.unlink(missing_ok=True)
        self.pending.clear()


@contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """Collect outputs in the block; replace the targets only if the whole block succeeds."""
    staged = StagedOutputs()
    try:
        yield staged
        for target, tmp in staged.pending.items():
            tmp.chmod(0o644)  # mkstemp creates 0600; outputs are ordinary readable files
            tmp.replace(target)
    finally:  # what is still staged (all of it after a failure; nothing once renamed) is removed
        staged.discard()


def read_json(source: Path, produced_by: str) -> dict[str, Any]:
    """Read a JSON file that an earlier stage wrote, with a clear error if it is missing or corrupt."""
    with _explained(source, produced_by):
        return json.loads(source.read_text(encoding="utf-8"))


@contextmanager
def _explained(source: Path, produced_by: str) -> Iterator[None]:
    """A missing or unreadable input written by the stage `produced_by`, said in one line with the fix."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{source} is missing; run `dvc repro {produced_by}` to create it.") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"{source} is corrupt ({error}); run `dvc repro -f {produced_by}` to rebuild it.") from None


def load_split(source: Path) -> Split:
    """A split written by the `prepare` stage (`StagedOutputs.save_split`), read without pickle, each array
    aligned so TensorFlow can use it without a copy; a missing or corrupt file is explained."""
    with _explained(source, "prepare"), zipfile.ZipFile(source) as archive:
        return Split(_read_npy_aligned(archive, "x.npy"), _read_npy_aligned(archive, "y.npy"))


ALIGNMENT = 64  # what TensorFlow needs to use an array's memory without copying it


def _read_npy_aligned(archive: zipfile.ZipFile, member: str) -> np.ndarray:
    """One .npy member read straight into a 64-byte aligned buffer, 1 MiB at a time (no whole-array temporary)."""
    with cast(zipfile.ZipExtFile, archive.open(member)) as handle:  # typed as IO[bytes], which lacks readinto
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        if dtype.hasobject:
            raise ValueError("object arrays need pickle, which is not allowed")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = np.empty(nbytes + ALIGNMENT, np.uint8)
        start = -raw.ctypes.data % ALIGNMENT
        array = raw[start : start + nbytes]
        for done in range(0, nbytes, 1 << 20):
            part = array[done : done + (1 << 20)]
            if handle.readinto(part.data) < len(part):  # a zip member reads short only at its end
                raise EOFError("truncated array")
        return array.view(dtype).reshape(shape, order="F" if fortran else "C")
