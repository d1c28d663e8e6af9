"""Command `mnist-predict IMAGE [IMAGE ...] [--model URI_OR_PATH] [--json]`: classify photos or scans of digits.

The network only knows MNIST's conventions, so each image is brought to them first: white digit on
black, cropped to the digit, its longer side scaled to 20 px, centred by its centre of mass on a 28x28
canvas, pixels / 255. Without this a dark digit on white paper, or one off-centre in a photo, is noise.

The default model is the registry's champion in the pipeline's store; `--model` takes any MLflow model
URI, or a `.keras` file (logits out, so its softmax is taken). One line per image: `file digit
probability` tab-separated, the name escaped as in a Python string literal (`errors.escaped`), or with
`--json` a JSON object. A pipe or device (`/dev/stdin`) must give its image within `STREAM_WAIT` s. A
file that cannot be used gets one `error:` line on stderr, the others are still classified, exit code 1.
"""

from __future__ import annotations

import json
import logging
import os
import select
import stat
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import quiet, tracking
from pipeline.cli import ArgumentParser
from pipeline.config import CLASSES, SIDE
from pipeline.errors import DataError, escaped, report, run_stage

DEFAULT_MODEL = f"models:/{tracking.REGISTERED_MODEL}@{tracking.CHAMPION}"
CENTRE = SIDE // 2  # the row and column of the centre of mass of MNIST digits
BOX = 20  # MNIST scales each digit to fit 20x20, leaving a 4 px margin for the centre-of-mass shift
MIN_CONTRAST = 32  # grey levels between paper and ink below which we call the image blank
INK = 0.2  # fraction of the ink's full strength that counts as digit (not paper noise) for the crop
# Larger images are refused before their pixels are decoded. 40 MP holds any phone photo at its default
# resolution (12-24 MP) and bounds the float32 copies `to_mnist` makes (about 1 GB for RGBA at the limit);
# it also stays below Pillow's own decompression-bomb threshold (89.5 MP), whose warning would reach stderr.
MAX_PIXELS = 40_000_000
BATCH = 256  # images per call of an MLflow model
# A pipe or device (`/dev/stdin`, a FIFO) is read whole into memory: it must give its image without a pause
# of more than STREAM_WAIT seconds, and at most MAX_STREAM_BYTES, so that no input makes the command hang.
STREAM_WAIT = 5.0
MAX_STREAM_BYTES = 64 << 20
log = logging.getLogger("pipeline.predict")

Classifier = Callable[[np.ndarray], np.ndarray]
Prediction = tuple[Path, int, float]


def to_mnist(image: Image.Image) -> np.ndarray:
    """Any image of one digit -> the `PIXELS` float32 values in [0, 1] that MNIST would hold for it."""
    image = ImageOps.exif_transpose(image)  # phone photos are stored sideways with a rotation tag
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # drawing apps export dark strokes on a transparent background: put them on white paper
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 127.5:  # light paper: invert, MNIST digits are white on black
        gray, border = 255 - gray, 255 - border
    ink = gray - np.median(border)  # a grey background (a photo of paper) becomes black
    strength = float(ink.max())
    if strength < MIN_CONTRAST:
        raise DataError("no digit found: the image is blank or has almost no contrast")
    ink = np.clip(ink / strength, 0.0, 1.0)

    rows, cols = np.nonzero(ink >= INK)
    digit = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = BOX / max(digit.shape)
    height, width = (max(1, round(n * scale)) for n in digit.shape)
    resized = Image.fromarray(digit).resize((width, height), Image.Resampling.LANCZOS)
    digit = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)  # Lanczos rings slightly outside [0, 1]

    # Centre of mass onto pixel (14, 14), where MNIST has it (its test set: mean row 13.99, column 14.01).
    ys, xs = np.indices(digit.shape)
    mass = digit.sum()
    top = int(np.clip(round(CENTRE - (ys * digit).sum() / mass), 0, SIDE - height))
    left = int(np.clip(round(CENTRE - (xs * digit).sum() / mass), 0, SIDE - width))
    canvas = np.zeros((SIDE, SIDE), dtype=np.float32)
    canvas[top : top + height, left : left + width] = digit
    return canvas.reshape(-1)


def shown(path: Path) -> str:
    """A file name as the output and the messages write it: one field of one line (`errors.escaped`)."""
    return escaped(str(path))


def _read_stream(fd: int, path: Path, kind: str) -> bytes:
    """All that a pipe or device gives until it ends, refused if it stays silent for `STREAM_WAIT`
    seconds or gives more than `MAX_STREAM_BYTES` (so that no input can make the command hang)."""
    data = bytearray()
    poller = select.poll()  # poll(2), not epoll: epoll refuses devices such as /dev/zero, always readable
    poller.register(fd, select.POLLIN)
    while len(data) <= MAX_STREAM_BYTES:
        if not poller.poll(STREAM_WAIT * 1000):
            given = f"gave {len(data)} bytes, then nothing" if data else "gave no data"
            raise DataError(
                f"{shown(path)} is {kind} that {given} for {STREAM_WAIT:g} s; pass an image file, or write "
                f"a whole PNG or JPEG into it (`cat digit.png | mnist-predict /dev/stdin`)."
            )
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:  # woken without data after all
            continue
        if not chunk:
            return bytes(data)
        data += chunk
    raise DataError(
        f"{shown(path)} is {kind} that gave more than {MAX_STREAM_BYTES >> 20} MiB without ending; "
        "pass a PNG or JPEG image of one digit."
    )


@contextmanager
def opened(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes to read: a regular file as it is; a pipe (`/dev/stdin`, a FIFO) or a device read
    whole into memory, with a time limit. Opening never blocks, not even on a FIFO without a writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            os.set_blocking(fd, True)
            with os.fdopen(fd, "rb", closefd=False) as handle:
                yield handle
        else:  # a socket cannot be opened; a folder fails its first read (EISDIR)
            yield BytesIO(_read_stream(fd, path, "a pipe" if stat.S_ISFIFO(mode) else "a device"))
    finally:
        os.close(fd)


def open_image(source: IO[bytes], path: Path) -> Image.Image:
    """Open an image reading only its header; refuse it, pixels still undecoded, if it exceeds MAX_PIXELS.

    Pillow's bomb check is off meanwhile: `Image.open` itself warns (on stderr) above
    `Image.MAX_IMAGE_PIXELS` and raises above twice that, before the size could be read and the stricter
    `MAX_PIXELS` said what is wrong."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        image = Image.open(source)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise DataError(
            f"{shown(path)} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), above the limit "
            f"of {MAX_PIXELS / 1e6:.0f} megapixels (MAX_PIXELS in pipeline/predict.py); "
            "scale it down or crop it to the digit."
        )
    return image


def load_image(path: Path) -> np.ndarray:
    """Read and preprocess one file; every way it can fail is a DataError that names the file."""
    try:
        with opened(path) as source, open_image(source, path) as image, warnings.catch_warnings():
            # a bomb hidden past the header (a frame or tile larger than the image): an error, not a warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            try:
                return to_mnist(image)
            except DataError as error:
                raise DataError(f"{shown(path)}: {error}; pass an image of one digit.") from None
    except FileNotFoundError:
        raise DataError(f"{shown(path)} does not exist; check the file name.") from None
    # not an image, truncated, a folder, unreadable, a frame or tile beyond Pillow's bomb limits
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        reason = "not an image Pillow can read" if isinstance(error, UnidentifiedImageError) else str(error)
        raise DataError(f"{shown(path)} cannot be read ({reason}); pass a PNG or JPEG image of one digit.") from None


def _quiet_keras() -> None:
    """TensorFlow's start-up noise filtered; Keras' progress bars would mix into the results on stdout."""
    from pipeline import runtime

    runtime.import_tensorflow()
    import keras

    keras.utils.disable_interactive_logging()


def load_model(uri: str) -> tuple[Classifier, str]:
    """A function from (n, `PIXELS`) float32 pixels to (n, `CLASSES`) class probabilities, and the model's
    name (`mnist-bn-mlp version 3 (@champion)`, or the file). A `.keras` file is one the pipeline saves
    (logits out), loaded as `evaluate` loads it; anything else is an MLflow model URI resolved against the
    pipeline's tracking store (probabilities out), given rows in batches of `BATCH`, under the row limit
    of a registered model (tracking/serving.py)."""
    if uri.endswith(".keras"):
        from pipeline import model

        # a wrong path fails before TensorFlow's start-up, which `model.load` filters; calling the network
        # (not `predict`) shows no progress bar on stdout
        network = model.load(Path(uri))
        return (lambda x: model.probabilities(network, x)), shown(Path(uri))
    loaded, name = tracking.load_model(uri, before_load=_quiet_keras)

    def classifier(x: np.ndarray) -> np.ndarray:
        batches = [loaded.predict(x[start : start + BATCH]) for start in range(0, len(x), BATCH)]
        return np.concatenate([np.asarray(batch, dtype=np.float64) for batch in batches])

    return classifier, name


def classify(
    paths: Sequence[Path], model_uri: str = DEFAULT_MODEL, on_error: Callable[[DataError], None] | None = None
) -> list[Prediction]:
    """`(file, digit, probability)` per image, in the order given.

    Every file is read before the slow model load. A file that cannot be used raises its DataError, or,
    given `on_error`, is passed to it and left out of the results (so one bad file among many does not
    cost the others their answers). The model is loaded only if at least one image was read.
    """
    read: list[tuple[Path, np.ndarray]] = []
    for path in paths:
        try:
            read.append((path, load_image(path)))
        except DataError as error:
            if on_error is None:
                raise
            on_error(error)
    if not read:
        return []
    model, name = load_model(model_uri)
    log.info("model: %s", name)  # on stderr, before the results on stdout
    probabilities = model(np.stack([image for _, image in read]))
    if probabilities.shape != (len(read), CLASSES):
        raise DataError(f"the model {model_uri} returned shape {probabilities.shape}, not {CLASSES} classes per image.")
    return [(path, int(row.argmax()), float(row.max())) for (path, _), row in zip(read, probabilities, strict=True)]


def record(prediction: Prediction, as_json: bool) -> str:
    """One output line: `file<TAB>digit<TAB>probability` with the file name escaped (`shown`), or with
    `as_json` a JSON object `{"file": ..., "digit": ..., "probability": ...}`."""
    path, digit, probability = prediction
    if not as_json:
        return f"{shown(path)}\t{digit}\t{probability:.4f}"
    line = json.dumps({"file": str(path), "digit": digit, "probability": probability}, ensure_ascii=False)
    # a byte of the name that is not UTF-8 is a lone surrogate in Python: written as JSON's `\udcff` escape
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and print one record per image it can classify; exit 1 after one `error:`
    line per file it cannot."""
    parser = ArgumentParser(prog="mnist-predict", description="Classify images of handwritten digits.")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files, one digit each")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="URI_OR_PATH",
        help=f"an MLflow model URI (runs:/..., models:/...) or a .keras file (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of tab-separated fields")
    args = parser.parse_args(argv)
    # each failure is reported at once (the model load that follows may take seconds) and left out
    predictions = classify(args.images, args.model, on_error=report)
    for prediction in predictions:
        print(record(prediction, args.json))
    if len(predictions) < len(args.images):
        sys.exit(1)  # each failure has had its line


def run() -> None:
    """The console script. MLflow's info logs are silenced so stderr holds only problems."""
    quiet.configure_logging()
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    run_stage(lambda: main(sys.argv[1:]), interrupted="no image was classified")


if __name__ == "__main__":
    run()
