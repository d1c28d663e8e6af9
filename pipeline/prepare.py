"""Stage `prepare`: normalize MNIST and split it as the reference program does.

Pixels become float32 in [0, 1], flattened to 784 values; labels int32. The FIRST
`data.validation_size` training images (no shuffling) are the validation set, the rest the training
set; the 10,000 t10k images are the test set. Each split is an uncompressed, pickle-free .npz with
arrays `x` and `y`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline import io, quiet
from pipeline.config import PREPARED_DIR, RAW_DIR, load_params
from pipeline.errors import DataError, run_stage

log = logging.getLogger("pipeline.prepare")


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (the MNIST format) into an array of its declared shape."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} is missing; run `dvc repro download` to fetch it.") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or data[3] == 0:  # two zero bytes, 0x08: unsigned bytes
        raise DataError(f"{path} is not an unsigned-byte IDX file; run `dvc repro -f download` to fetch it again.")
    ndim = data[3]
    header = 4 + 4 * ndim
    # a header cut short reads as no shape at all, which the length check below refuses
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4")) if len(data) >= header else ()
    if len(data) != header + int(np.prod(shape)):
        raise DataError(
            f"{path} is truncated or padded (shape {shape}); run `dvc repro -f download` to fetch it again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 images (n, 28, 28) -> float32 (n, 784) in [0, 1], exactly as the reference: x / 255."""
    return images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)


def split(x: np.ndarray, y: np.ndarray, validation_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first `validation_size` rows validate, the rest train; order is kept, as in the reference."""
    if not 0 < validation_size < len(x):
        raise DataError(f"data.validation_size = {validation_size} must leave a training set of the {len(x)} images.")
    return {
        "validation": (x[:validation_size], y[:validation_size]),
        "train": (x[validation_size:], y[validation_size:]),
    }


def load_split(raw_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalized images and int32 labels of `train` or `t10k`, checked to match in length."""
    images = read_idx(raw_dir / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{raw_dir}/{prefix}-*: {images.shape} images do not match {labels.shape} labels; "
            "run `dvc repro -f download`."
        )
    return normalize(images), labels.astype(np.int32)


def prepare(raw_dir: Path, out_dir: Path, validation_size: int) -> dict[str, int]:
    """Write train/validation/test .npz files; return the size of each split."""
    x, y = load_split(raw_dir, "train")
    splits = split(x, y, validation_size)
    splits["test"] = load_split(raw_dir, "t10k")
    with io.staged_outputs() as out:  # all three splits change together, or none
        for name, (xs, ys) in splits.items():
            out.save_split(out_dir / f"{name}.npz", io.Split(xs, ys))
            log.info("%s: %d images", name, len(xs))
    return {name: len(xs) for name, (xs, _) in splits.items()}


def main() -> None:
    """Read `data` from params.yaml and write data/prepared/{train,validation,test}.npz."""
    params = load_params()
    quiet.configure_logging()
    prepare(RAW_DIR, PREPARED_DIR, params.data.validation_size)


if __name__ == "__main__":
    run_stage(main)
