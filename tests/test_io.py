"""Outputs replaced as a set, never half-written; pickle-free arrays; clear errors for bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import io
from pipeline.errors import DataError


def test_outputs_appear_together_when_the_block_succeeds(tmp_path: Path) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "sub" / "b.json"
    first.write_text("old")
    with io.staged_outputs() as out:
        out.write_text(first, "new")
        out.write_json(second, {"b": 1, "a": 2})
        assert first.read_text() == "old" and not second.exists()  # nothing replaced before the end
    assert first.read_text() == "new"
    assert second.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.json", "sub"]  # no temporary files
    assert oct(second.stat().st_mode & 0o777) == "0o644"


def test_a_failure_in_the_block_leaves_every_old_output(tmp_path: Path) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("old a")
    second.write_text("old b")
    with pytest.raises(RuntimeError), io.staged_outputs() as out:
        out.write_text(first, "new a")
        raise RuntimeError("the MLflow store failed")
    assert (first.read_text(), second.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_nan_is_refused_in_json_outputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON compliant"), io.staged_outputs() as out:
        out.write_json(tmp_path / "metrics.json", {"loss": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_target_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "models").write_text("a file where a folder should be")
    message = r"cannot write .*models/model\.keras .*check that its folder is writable"
    with pytest.raises(DataError, match=message), io.staged_outputs() as out:
        out.write_bytes(tmp_path / "models" / "model.keras", b"x")


def test_split_round_trip_without_pickle(tmp_path: Path) -> None:
    split = io.Split(np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int32))
    with io.staged_outputs() as out:
        out.save_split(tmp_path / "s.npz", split)
    loaded = io.load_split(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded.x, split.x)
    assert loaded.y.dtype == np.int32


def test_splits_load_aligned_so_tensorflow_shares_their_memory(tmp_path: Path) -> None:
    """Why io.py reads .npy members itself: numpy.load aligns to 16 bytes only (TensorFlow then copies) and
    holds each member's bytes besides; docs/performance.md has the peak memory either way."""
    for rows in range(1, 9):  # arrays of several sizes: none 64-byte aligned by chance
        split = io.Split(np.full((rows, 7), rows, np.float32), np.arange(rows, dtype=np.int32))
        with io.staged_outputs() as out:
            out.save_split(tmp_path / "s.npz", split)
        loaded = io.load_split(tmp_path / "s.npz")
        assert [array.ctypes.data % io.ALIGNMENT for array in loaded] == [0, 0]
        np.testing.assert_array_equal(loaded.x, split.x)
        np.testing.assert_array_equal(loaded.y, split.y)


def test_pickled_or_corrupt_arrays_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(DataError, match=r"corrupt .*dvc repro -f prepare"):
        io.load_split(tmp_path / "pickled.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="corrupt"):
        io.load_split(tmp_path / "broken.npz")
    with pytest.raises(DataError, match=r"missing; run `dvc repro prepare`"):
        io.load_split(tmp_path / "absent.npz")


def test_read_json_explains_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing; run `dvc repro train`"):
        io.read_json(tmp_path / "train.json", "train")
    (tmp_path / "train.json").write_text("{not json")
    with pytest.raises(DataError, match=r"corrupt .*dvc repro -f train"):
        io.read_json(tmp_path / "train.json", "train")
    (tmp_path / "train.json").write_text(json.dumps({"a": 1}))
    assert io.read_json(tmp_path / "train.json", "train") == {"a": 1}


# --- what a process killed outright leaves behind ------------------------------------------------------

STAGE_AND_STAY = """
import sys
from pathlib import Path
from pipeline import io
print(io._temporary_beside(Path(sys.argv[1])), flush=True)
sys.stdin.read()  # holds its temporary file, as a stage does, until the test lets it end
"""


def staging_process(target: Path) -> tuple[subprocess.Popen, Path]:
    """Another real process with a staged temporary file for `target`; it ends when its stdin closes."""
    process = subprocess.Popen(
        [sys.executable, "-c", STAGE_AND_STAY, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    return process, Path(process.stdout.readline().strip())


def test_leftovers_of_a_dead_process_are_removed_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "models" / "model.keras"
    process, staged = staging_process(target)
    process.kill()  # SIGKILL: no cleanup runs
    process.wait(timeout=30)
    assert staged.exists() and staged.name.startswith(f".model.keras.{process.pid}")
    with io.staged_outputs() as out:
        out.write_bytes(target, b"new")
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.keras"]


def test_a_running_process_keeps_its_staged_files(tmp_path: Path) -> None:
    target = tmp_path / "model.keras"
    process, staged = staging_process(target)
    try:
        with io.staged_outputs() as out:
            out.write_bytes(target, b"mine")
        assert staged.exists(), "another stage's file in flight must stay"
    finally:
        process.communicate("", timeout=30)  # it exits normally, without committing
    assert io.remove_leftovers(target) == [staged]


def test_only_files_of_its_own_naming_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "model.keras"
    dead_owner = f"{os.getpid()}-1"  # this pid, but another start time: a process that has ended
    ours = tmp_path / f".model.keras.{dead_owner}.k2j_9x1a.tmp.keras"
    others = [
        ".model.keras.notes.tmp.keras",  # not an owner token
        f".model.keras.{dead_owner}.tmp.keras",  # no random part
        f".model.keras.{dead_owner}.k2j_9x1a.tmp.h5",  # another suffix
        f".other.keras.{dead_owner}.k2j_9x1a.tmp.keras",  # another output's
        f".model.keras.{io.processes.owner()}.k2j_9x1a.tmp.keras",  # this live process's
        "model.keras.bak",
    ]
    for name in [ours.name, *others]:
        (tmp_path / name).write_text("x")
    assert io.remove_leftovers(target) == [ours]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
