"""Stage `prepare`: IDX parsing, normalization and the reference's unshuffled split."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline import io, prepare
from pipeline.errors import DataError


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` (uint8) in the IDX format MNIST uses."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    """A tiny MNIST-shaped raw folder: 12 training and 4 test images whose pixels encode their index."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 4)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)  # a marker to check the order is kept
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return tmp_path


def test_read_idx_round_trips(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", array)
    np.testing.assert_array_equal(prepare.read_idx(tmp_path / "a"), array)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"<html>not found</html>", "not an unsigned-byte IDX"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]), "truncated"),
        (bytes([0, 0, 8, 3, 0, 0, 0, 2, 0]), "truncated"),  # the header itself is cut short
    ],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(DataError, match=reason):
        prepare.read_idx(tmp_path / "bad")


def test_missing_raw_file_says_which_stage_to_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dvc repro download"):
        prepare.read_idx(tmp_path / "absent")


def test_normalize_is_float32_flat_and_divided_by_255() -> None:
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    x = prepare.normalize(images)
    assert x.dtype == np.float32
    assert x.shape == (1, 4)
    np.testing.assert_array_equal(x, np.array([[0.0, 1.0, 0.2, 0.4]], dtype=np.float32))


def test_prepare_splits_first_rows_off_as_validation_without_shuffling(raw_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    sizes = prepare.prepare(raw_dir, out, validation_size=5)
    assert sizes == {"validation": 5, "train": 7, "test": 4}
    splits = {name: io.load_split(out / f"{name}.npz")._asdict() for name in sizes}
    # the pixel marker is the original index / 255: validation holds rows 0-4, train rows 5-11, in order
    np.testing.assert_allclose(splits["validation"]["x"][:, 0] * 255, np.arange(5), atol=1e-4)
    np.testing.assert_allclose(splits["train"]["x"][:, 0] * 255, np.arange(5, 12), atol=1e-4)
    np.testing.assert_array_equal(splits["train"]["y"], np.arange(5, 12) % 10)
    assert splits["test"]["y"].dtype == np.int32
    assert splits["test"]["x"].shape == (4, 784)


def test_prepared_arrays_are_pickle_free(raw_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare.prepare(raw_dir, out, validation_size=2)
    with np.load(out / "train.npz", allow_pickle=False) as archive:  # raises if anything needs pickle
        assert sorted(archive.files) == ["x", "y"]


def test_split_must_leave_a_training_set() -> None:
    x, y = np.zeros((3, 784), np.float32), np.zeros(3, np.int32)
    with pytest.raises(DataError, match="validation_size"):
        prepare.split(x, y, 3)


def test_data_stages_do_not_import_tensorflow_or_mlflow() -> None:
    """`download` and `prepare` start in a fraction of a second: they must not pull in the heavy frameworks."""
    import subprocess
    import sys

    heavy = "{'tensorflow', 'keras', 'mlflow'}"
    code = f"import sys, pipeline.download, pipeline.prepare; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
