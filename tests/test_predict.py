"""`mnist-predict`: MNIST-style preprocessing of arbitrary images, real classification, clean errors.

The images are real MNIST test digits from the offline copy committed in `data/offline/` (never from
untracked pipeline outputs), redrawn as a user would have them: large, either polarity, off-centre,
on grey paper, as JPEG. The model is trained here, on the offline training set, with the stage's own
training core, `pipeline.fit` (about a second).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from workspace import REPO, free_port, offline_mnist, offline_splits, venv_env

from pipeline import predict
from pipeline.config import load_params
from pipeline.errors import DataError
from pipeline.fit import fit
from pipeline.io import Split
from pipeline.model import save


@pytest.fixture(scope="module")
def test_digits() -> tuple[np.ndarray, np.ndarray]:
    """The first ten MNIST test images and their labels (7 2 1 0 4 1 4 9 5 9)."""
    images, labels = offline_mnist("t10k")
    return images[:10], labels[:10]


def enlarge(digit: np.ndarray, size: int = 100, dark_on_light: bool = False) -> Image.Image:
    """A 28x28 MNIST digit as a larger image, as if scanned; optionally dark ink on white paper."""
    image = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
    return Image.fromarray(255 - np.asarray(image)) if dark_on_light else image


def centre_of_mass(vector: np.ndarray) -> np.ndarray:
    """(row, column) of a 784 vector's centre of mass, in pixel indices of the 28x28 grid."""
    image = vector.reshape(28, 28)
    return np.array([(np.indices(image.shape)[axis] * image).sum() / image.sum() for axis in (0, 1)])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """1 for the same image, lower as they differ (robust to a global change of contrast)."""
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def bounding_box(vector: np.ndarray) -> tuple[int, int]:
    """(height, width) of the pixels holding ink."""
    rows, cols = np.nonzero(vector.reshape(28, 28) > 0.05)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def test_both_polarities_give_the_same_input(test_digits: tuple[np.ndarray, np.ndarray]) -> None:
    for digit in test_digits[0][:5]:
        white_on_black = predict.to_mnist(enlarge(digit))
        black_on_white = predict.to_mnist(enlarge(digit, dark_on_light=True))
        assert white_on_black.shape == (784,) and white_on_black.dtype == np.float32
        np.testing.assert_allclose(black_on_white, white_on_black, atol=1e-5)


def test_any_size_and_position_gives_a_centred_20_pixel_digit(test_digits: tuple[np.ndarray, np.ndarray]) -> None:
    digit = test_digits[0][0]
    reference = predict.to_mnist(enlarge(digit, 28))
    for size in (28, 57, 100, 420):
        vector = predict.to_mnist(enlarge(digit, size))
        assert vector.min() >= 0.0 and vector.max() <= 1.0
        assert max(bounding_box(vector)) in (20, 21)  # 20 px, plus a faint Lanczos fringe
        np.testing.assert_allclose(centre_of_mass(vector), [14, 14], atol=0.6)
        assert cosine(vector, reference) > 0.95
    # a small digit in the corner of a large, non-square page is found, scaled up and centred
    page = np.zeros((300, 500), dtype=np.uint8)
    page[10:60, 400:450] = np.asarray(enlarge(digit, 50))
    vector = predict.to_mnist(Image.fromarray(page))
    np.testing.assert_allclose(centre_of_mass(vector), [14, 14], atol=0.6)
    assert cosine(vector, reference) > 0.8  # the rounding of the centre-of-mass shift may differ by a pixel


def test_aspect_ratio_is_kept() -> None:
    bar = np.zeros((200, 200), dtype=np.uint8)
    bar[20:180, 90:110] = 255  # a "1": 160 tall, 20 wide
    height, width = bounding_box(predict.to_mnist(Image.fromarray(bar)))
    assert height == 20 and width in (2, 3, 4)


def test_mnist_digits_come_back_as_they_were(test_digits: tuple[np.ndarray, np.ndarray]) -> None:
    """MNIST digits already follow the convention, so preprocessing one must (nearly) reproduce it."""
    originals = [digit.reshape(-1).astype(np.float32) / 255 for digit in test_digits[0]]
    native = [cosine(predict.to_mnist(Image.fromarray(d)), o) for d, o in zip(test_digits[0], originals, strict=True)]
    assert min(native) > 0.99
    scanned = [
        cosine(predict.to_mnist(enlarge(d, 140, True)), o) for d, o in zip(test_digits[0], originals, strict=True)
    ]
    assert min(scanned) > 0.8 and np.mean(scanned) > 0.95


def test_photo_of_grey_paper_as_jpeg_and_transparent_png(
    test_digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    digit = test_digits[0][1]
    clean = predict.to_mnist(enlarge(digit))
    ink = np.asarray(enlarge(digit, 120), dtype=np.float32) / 255
    rng = np.random.default_rng(0)
    photo = 200 - 160 * ink + rng.normal(0, 6, ink.shape)  # grey paper, dark grey ink, sensor noise
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).convert("RGB").save(tmp_path / "photo.jpg", quality=80)
    assert cosine(predict.load_image(tmp_path / "photo.jpg"), clean) > 0.95
    # a drawing app's export: black strokes whose alpha is the ink, on a transparent background
    rgba = np.zeros((120, 120, 4), dtype=np.uint8)
    rgba[..., 3] = (ink * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "drawing.png")
    assert cosine(predict.load_image(tmp_path / "drawing.png"), clean) > 0.98


def test_unreadable_inputs_are_data_errors_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("L", (64, 64), 255).save(tmp_path / "blank.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    for name, reason in [
        ("missing.png", "does not exist"),
        ("notes.png", "not an image"),
        ("blank.png", "no digit"),
        ("black.png", "no digit"),
        (".", "cannot be read"),
    ]:
        with pytest.raises(DataError, match=reason) as raised:
            predict.load_image(tmp_path / name)
        assert str(tmp_path / name) in str(raised.value)


def blank_png(path: Path, width: int, height: int) -> Path:
    """A huge PNG that is small on disk: one bit per pixel, all black, compresses about 1000:1."""
    Image.new("1", (width, height)).save(path)
    return path


def test_huge_image_is_refused_from_its_header_without_a_warning(tmp_path: Path) -> None:
    """12000x12000 is above Pillow's warning threshold; the file holds only the header and the start of the
    pixel data, so decoding would fail with "truncated": the size error proves nothing was decoded."""
    data = blank_png(tmp_path / "full.png", 12000, 12000).read_bytes()
    header_only = tmp_path / "header-only.png"
    header_only.write_bytes(data[: data.index(b"IDAT") + 14])
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DataError) as raised:
        warnings.simplefilter("always")
        predict.load_image(header_only)
    assert str(raised.value) == (
        f"{header_only} is 12000x12000 pixels (144 megapixels), above the limit of 40 megapixels "
        "(MAX_PIXELS in pipeline/predict.py); scale it down or crop it to the digit."
    )
    assert [str(w.message) for w in caught] == []
    assert limit == Image.MAX_IMAGE_PIXELS, "Pillow's own guard must be back in place"


def test_pixel_limit_is_inclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predict, "MAX_PIXELS", 40 * 40)
    assert predict.load_image(write_one(tmp_path / "at-limit.png")).shape == (784,)  # 40x40
    over = Image.new("L", (41, 40))
    over.paste(255, (18, 5, 22, 35))
    over.save(tmp_path / "over.png")
    with pytest.raises(DataError, match=r"41x40 pixels"):
        predict.load_image(tmp_path / "over.png")


@pytest.fixture(scope="module")
def cli_env() -> dict[str, str]:
    return venv_env()


def cli(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline.predict ...`, as a user runs it (the console script is the same `run`)."""
    command = [sys.executable, "-m", "pipeline.predict", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_one_error_line(done: subprocess.CompletedProcess[str], expected: str) -> None:
    assert done.returncode != 0
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: ") and expected in done.stderr, done.stderr


def write_one(path: Path) -> Path:
    """A valid image of a "1": a white bar on black."""
    page = np.zeros((40, 40), dtype=np.uint8)
    page[5:35, 18:22] = 255
    Image.fromarray(page).save(path)
    return path


def error_lines(done: subprocess.CompletedProcess[str], model_ran: bool = False) -> list[str]:
    """The `error:` lines of stderr, after checking it holds no Python warning and no traceback.

    Without a model, stderr must hold nothing else. Once TensorFlow has run, its C++ start-up lines
    (absl's "WARNING: All log messages before absl::InitializeLog()", CUDA probing on a machine without
    a GPU) may precede them, as tests/test_failures.py allows for training.
    """
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert model_ran or errors == lines, done.stderr
    return errors


def too_large(path: Path, width: int, height: int) -> str:
    return (
        f"error: {path} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), above the limit of "
        "40 megapixels (MAX_PIXELS in pipeline/predict.py); scale it down or crop it to the digit."
    )


def test_cli_refuses_huge_images_without_warnings_or_loading_the_model(cli_env: dict[str, str], tmp_path: Path) -> None:
    """Above the limit but below Pillow's warning (49 MP), above its warning (144 MP), above its error (196 MP).
    Every file is bad, so the model is not even looked for: the missing --model file is never reported."""
    sizes = [(7000, 7000), (12000, 12000), (14000, 14000)]
    files = [blank_png(tmp_path / f"{w}x{h}.png", w, h) for w, h in sizes]
    done = cli(*files, "--model", tmp_path / "none.keras", env=cli_env)
    assert done.returncode == 1
    assert done.stdout == ""
    assert error_lines(done) == [too_large(f, w, h) for f, (w, h) in zip(files, sizes, strict=True)]


def test_cli_bad_files_before_a_model_that_fails(cli_env: dict[str, str], tmp_path: Path) -> None:
    """A readable image makes the model load; its failure is one more line after the bad file's."""
    good = write_one(tmp_path / "digit.png")
    done = cli(tmp_path / "nope.png", good, "--model", tmp_path / "none.keras", env=cli_env)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = error_lines(done)
    assert len(lines) == 2, lines
    assert lines[0] == f"error: {tmp_path / 'nope.png'} does not exist; check the file name."
    assert "none.keras does not exist" in lines[1]


def test_cli_missing_file_and_bad_command_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    assert_one_error_line(cli(tmp_path / "nope.png", env=cli_env), "nope.png does not exist")
    assert_one_error_line(cli(env=cli_env), "usage: mnist-predict")
    assert_one_error_line(cli(REPO / "README.md", env=cli_env), "not an image")


@pytest.mark.e2e  # runs the real command in a process of its own
def test_cli_model_errors(cli_env: dict[str, str], tmp_path: Path) -> None:
    image = write_one(tmp_path / "digit.png")
    assert_one_error_line(cli(image, "--model", tmp_path / "none.keras", env=cli_env), "none.keras does not exist")
    store = tmp_path / "no-store.db"
    missing_store = cli(image, env={**cli_env, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert_one_error_line(missing_store, "there is no MLflow store")
    assert not store.exists(), "predicting must not create an empty store"
    dead = cli(image, env={**cli_env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert_one_error_line(dead, "is unreachable")


@pytest.mark.e2e  # runs the real command in a process of its own
def test_cli_no_registered_model(cli_env: dict[str, str], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'empty.db'}"
    MlflowClient(tracking_uri=store, registry_uri=store).search_experiments()  # an empty, valid store
    image = write_one(tmp_path / "digit.png")
    done = cli(image, env={**cli_env, "MLFLOW_TRACKING_URI": store})
    assert_one_error_line(done, "Registered Model with name=mnist-bn-mlp not found")


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small network trained four epochs on 10,000 offline MNIST training images, saved as the stage saves it."""
    defaults = load_params(REPO / "params.yaml")
    train, validation = offline_splits()
    fitted = fit(
        defaults.model.model_copy(update={"hidden_units": [64, 32]}),
        defaults.train.model_copy(update={"learning_rate": 0.1, "epochs": 4}),
        Split(train.x[:10_000], train.y[:10_000]),
        validation,
    )
    assert fitted.history[-1].metrics["val_accuracy"] > 0.9
    path = tmp_path_factory.mktemp("model") / "model.keras"
    save(fitted.model, path)
    return path


@pytest.mark.e2e  # runs the real command in a process of its own
def test_cli_classifies_real_digits_in_both_polarities(
    trained_model: Path, test_digits: tuple[np.ndarray, np.ndarray], cli_env: dict[str, str], tmp_path: Path
) -> None:
    images, labels = test_digits
    files = []
    for i, digit in enumerate(images):
        for dark_on_light, suffix in ((False, "png"), (True, "jpg")):
            files.append(tmp_path / f"{i}-{'dark' if dark_on_light else 'light'}.{suffix}")
            enlarge(digit, dark_on_light=dark_on_light).save(files[-1])
    done = cli(*files, "--model", trained_model, env=cli_env)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert [row[0] for row in rows] == [str(f) for f in files]
    assert all(0.1 <= float(probability) <= 1 for _, _, probability in rows)
    predicted = np.array([int(digit) for _, digit, _ in rows]).reshape(10, 2)
    for column in (0, 1):  # white on black, black on white
        assert (predicted[:, column] == labels).sum() >= 8, predicted[:, column]


@pytest.mark.e2e  # runs the real command in a process of its own
def test_cli_classifies_the_good_files_and_reports_each_bad_one(
    trained_model: Path, test_digits: tuple[np.ndarray, np.ndarray], cli_env: dict[str, str], tmp_path: Path
) -> None:
    images, labels = test_digits
    seven, two = (enlarge(images[i]) for i in (0, 1))
    seven.save(tmp_path / "seven.png")
    two.save(tmp_path / "two.png")
    (tmp_path / "notes.png").write_text("not an image")
    blank_png(tmp_path / "huge.png", 12000, 12000)
    names = ["seven.png", "missing.png", "two.png", "notes.png", "huge.png"]
    done = cli(*(tmp_path / name for name in names), "--model", trained_model, env=cli_env)
    assert done.returncode == 1
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert [row[0] for row in rows] == [str(tmp_path / "seven.png"), str(tmp_path / "two.png")]
    assert [int(row[1]) for row in rows] == [labels[0], labels[1]] == [7, 2]
    assert error_lines(done, model_ran=True) == [
        f"error: {tmp_path / 'missing.png'} does not exist; check the file name.",
        f"error: {tmp_path / 'notes.png'} cannot be read (not an image Pillow can read); "
        "pass a PNG or JPEG image of one digit.",
        too_large(tmp_path / "huge.png", 12000, 12000),
    ]


@pytest.mark.e2e  # runs the real command in a process of its own
def test_cli_one_good_one_bad(trained_model: Path, cli_env: dict[str, str], tmp_path: Path) -> None:
    good = write_one(tmp_path / "one.png")
    done = cli(good, tmp_path / "nope.png", "--model", trained_model, env=cli_env)
    assert done.returncode == 1
    assert done.stdout.splitlines()[0].startswith(f"{good}\t") and len(done.stdout.splitlines()) == 1
    assert error_lines(done, model_ran=True) == [f"error: {tmp_path / 'nope.png'} does not exist; check the file name."]


def test_classify_raises_without_on_error_and_collects_with_it(trained_model: Path, tmp_path: Path) -> None:
    good = write_one(tmp_path / "one.png")
    with pytest.raises(DataError, match=r"nope\.png does not exist"):
        predict.classify([good, tmp_path / "nope.png"], str(trained_model))
    failed: list[DataError] = []
    results = predict.classify([tmp_path / "nope.png", good], str(trained_model), on_error=failed.append)
    assert [path for path, _, _ in results] == [good]
    assert len(failed) == 1 and "nope.png does not exist" in str(failed[0])
    assert predict.classify([tmp_path / "nope.png"], str(tmp_path / "none.keras"), on_error=failed.append) == []


# --- pipes, devices and hostile file names ------------------------------------------------------------


@pytest.fixture
def short_wait(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(predict, "STREAM_WAIT", 0.5)
    return 0.5


def test_a_fifo_nobody_writes_is_refused_after_the_wait(tmp_path: Path, short_wait: float) -> None:
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(DataError, match=r"fifo\.png is a pipe that gave no data for 0\.5 s; pass an image file"):
        predict.load_image(fifo)
    assert time.monotonic() - started < 5


def test_a_fifo_another_process_writes_an_image_into_is_read(tmp_path: Path) -> None:
    image = write_one(tmp_path / "one.png")
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", 'sleep 0.3; cat "$0" > "$1"', image, fifo])
    try:
        np.testing.assert_array_equal(predict.load_image(fifo), predict.load_image(image))
    finally:
        writer.wait(timeout=30)


def test_devices_are_read_with_limits(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"/dev/zero is a device that gave more than 64 MiB without ending"):
        predict.load_image(Path("/dev/zero"))
    with pytest.raises(DataError, match=r"/dev/null cannot be read \(not an image Pillow can read\)"):
        predict.load_image(Path("/dev/null"))
    with pytest.raises(DataError, match=r"cannot be read \(.*directory"):
        predict.load_image(tmp_path)


def unescaped(field: str) -> str:
    """A file name as mnist-predict's tab-separated output escapes it, read back (docs/serving.md)."""
    return field.encode("latin-1", "backslashreplace").decode("unicode_escape")


HOSTILE = ["tab\there.png", "new\nline.png", "esc\x1b[31mape.png", "back\\slash.png", "quote\"'.png", "é 数字.png"]


def test_each_record_is_one_line_of_three_fields_whatever_the_name() -> None:
    for name in HOSTILE:
        line = predict.record((Path(name), 7, 0.99751), as_json=False)
        fields = line.split("\t")
        assert len(line.splitlines()) == 1 and len(fields) == 3, line
        assert unescaped(fields[0]) == name
        assert fields[1:] == ["7", "0.9975"]
        assert json.loads(predict.record((Path(name), 7, 0.99751), as_json=True)) == {
            "file": name,
            "digit": 7,
            "probability": 0.99751,
        }


@pytest.mark.e2e  # runs the real command in a process of its own
def test_cli_fifo_never_hangs_and_stdin_still_works(
    trained_model: Path, cli_env: dict[str, str], tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    started = time.monotonic()
    assert_one_error_line(cli(fifo, env=cli_env), f"{fifo} is a pipe that gave no data for 5 s")
    assert time.monotonic() - started < 30
    image = write_one(tmp_path / "one.png")
    command = [sys.executable, "-m", "pipeline.predict", "/dev/stdin", "--model", str(trained_model)]
    with image.open("rb") as piped:
        done = subprocess.run(command, stdin=piped, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("/dev/stdin\t1\t")


@pytest.mark.e2e  # runs the real command in a process of its own
def test_cli_hostile_names_give_one_parseable_record_or_error_line_each(
    trained_model: Path, cli_env: dict[str, str], tmp_path: Path
) -> None:
    files = [write_one(tmp_path / name) for name in [*HOSTILE, os.fsdecode(b"not-utf8-\xff.png")]]
    missing = tmp_path / "missing\nfile\t.png"
    for as_json in (False, True):
        done = cli(*files, missing, "--model", trained_model, *(["--json"] if as_json else []), env=cli_env)
        assert done.returncode == 1
        lines = done.stdout.splitlines()
        assert len(lines) == len(files), lines
        if as_json:
            read = [json.loads(line)["file"] for line in lines]
        else:
            assert all(len(line.split("\t")) == 3 for line in lines), lines
            read = [unescaped(line.split("\t")[0]) for line in lines]
        assert read == [str(path) for path in files]
        assert error_lines(done, model_ran=True) == [
            f"error: {tmp_path}/missing\\nfile\\t.png does not exist; check the file name."
        ]


def opens(pid: int, path: Path) -> bool:
    """Whether process `pid` holds `path` open (a descriptor may close while we look)."""
    target = path.resolve()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            if fd.readlink() == target:
                return True
    return False


@pytest.mark.e2e  # runs the real command in a process of its own
def test_cli_interrupted_says_what_it_left(cli_env: dict[str, str], tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    command = [sys.executable, "-m", "pipeline.predict", str(fifo)]
    process = subprocess.Popen(command, cwd=REPO, env=cli_env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # it has opened the pipe and waits for data: the moment to press Ctrl-C
        while not opens(process.pid, fifo):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        stderr = process.communicate(timeout=60)[1]
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr == "error: interrupted (Ctrl-C); no image was classified.\n"


@pytest.mark.e2e  # runs the real command in a process of its own
def test_cli_hostile_model_files(trained_model: Path, cli_env: dict[str, str], tmp_path: Path) -> None:
    """A .keras archive with members outside it (`../`, an absolute path) classifies as its model does,
    writes nothing outside and prints no warning of zipfile's; a model holding code (a Lambda layer whose
    function leaves a file when it runs) is refused in one line saying so, and its code never runs."""
    import zipfile

    import keras

    image = write_one(tmp_path / "digit.png")
    traversal = tmp_path / "models" / "traversal.keras"
    traversal.parent.mkdir()
    with zipfile.ZipFile(trained_model) as source, zipfile.ZipFile(traversal, "w") as archive:
        for info in source.infolist():
            archive.writestr(info, source.read(info))
        archive.writestr("../escaped.txt", "outside")
        archive.writestr(str(tmp_path / "absolute.txt"), "outside")
    done = cli(image, "--model", traversal, env=cli_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == cli(image, "--model", trained_model, env=cli_env).stdout != ""
    assert "Skipping invalid path" not in done.stderr and "Warning" not in done.stderr, done.stderr
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "absolute.txt").exists()

    marker = tmp_path / "the-lambda-ran"
    inputs = keras.Input(shape=(784,))
    where = str(marker)  # a closure's values are saved with the code
    ran = keras.layers.Lambda(lambda x: x + float(open(where, "w").close() is None) * 0.0)(inputs)  # noqa: PTH123
    keras.Model(inputs, keras.layers.Dense(10)(ran)).save(tmp_path / "lambda.keras")
    marker.unlink()  # building the model ran it once, here
    refused = cli(image, "--model", tmp_path / "lambda.keras", env=cli_env)
    assert_one_error_line(refused, "lambda.keras holds code (a Lambda layer or another stored Python function), which")
    assert "never runs" in refused.stderr
    assert not marker.exists()
