"""Typed configuration: the schema of params.yaml, and the project's fixed paths.

Every stage calls `load_params()` before doing any work, so a typo or an out-of-range value stops the
pipeline with one sentence naming the file, the key, the bad value and what is allowed, instead of
silently falling back to a default or failing half-way through a run.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from pipeline.errors import ConfigError

PARAMS_FILE = Path("params.yaml")
XLA_CACHE_DIR = Path(".cache/xla")  # compiled training epochs (pipeline/runtime.py); never an output

# Every file a stage reads or writes, relative to the repository root (where DVC runs the stages).
# dvc.yaml declares the same paths; tests/test_config.py checks that the two agree.
OFFLINE_DIR = Path("data/offline")
CHECKSUMS_FILE = OFFLINE_DIR / "SHA256SUMS"
RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
MODEL_FILE = Path("models/model.keras")
TRAIN_METRICS = Path("metrics/train.json")
TEST_METRICS = Path("metrics/test.json")
RUN_FILE = Path("runs/train.json")  # the MLflow run that trained the model: an output, not a metric
REPORT_FILE = Path("metrics/classification_report.json")
HISTORY_FILE = Path("plots/history.csv")
CURVES_FILE = Path("plots/learning_curves.png")
CONFUSION_FILE = Path("plots/confusion.csv")
CONFUSION_PNG = Path("plots/confusion.png")
MISTAKES_PNG = Path("plots/misclassified.png")
SEARCH_SPACE_FILE = Path("recipes/search_space.yaml")  # what `mnist-tune` varies

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST_TRAIN_SIZE = 60_000
# The data's shape, stated once: 28x28 grey images, stored and served as rows of 784 pixels; the
# classes are the digits 0-9, each the index of its logit.
SIDE = 28
PIXELS = SIDE * SIDE
IMAGE = (SIDE, SIDE, 1)  # one image as a convolutional network sees it (height, width, channels)
CLASSES = 10


def project_root(start: Path | None = None) -> Path:
    """The repository the command runs in: the nearest folder up from `start` (the current directory)
    holding dvc.yaml, mapped from DVC's experiment copies under `<root>/.dvc/tmp/exps/` to `<root>`, so
    queued and `--temp` experiments use the main repository's stores and caches. Independent of where the
    package is installed."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return next((folder for folder in (here, *here.parents) if (folder / "dvc.yaml").is_file()), here)


def prepared_file(split: str) -> Path:
    """The .npz file of one split (`train`, `validation` or `test`)."""
    return PREPARED_DIR / f"{split}.npz"


class _Section(BaseModel):
    # strict: "0.01" (a string) or true (a bool) is not silently turned into a number;
    # forbid: an unknown key is a typo, never ignored.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class DownloadParams(_Section):
    """Where MNIST comes from: HTTPS mirrors, then the offline copy kept in the repository."""

    sources: Annotated[list[str], Field(min_length=1)]
    timeout_seconds: Annotated[float, Field(gt=0, le=600)]
    max_megabytes: Annotated[float, Field(gt=0, le=1000)]

    @field_validator("sources")
    @classmethod
    def _https_or_local(cls, sources: list[str]) -> list[str]:
        for source in sources:
            if "://" in source and not source.startswith("https://"):
                raise ValueError(f"source {source!r} must be an https:// URL or a local folder")
        return sources

    @property
    def max_bytes(self) -> int:
        """`max_megabytes` in bytes: the cap on a download, compressed or not."""
        return int(self.max_megabytes * 1_000_000)


class DataParams(_Section):
    """How the 60,000 training images are split."""

    validation_size: Annotated[int, Field(ge=1, lt=MNIST_TRAIN_SIZE)]


class ModelParams(_Section):
    """The network: dense layers without activation, each followed by batch norm and the activation."""

    hidden_units: Annotated[list[Annotated[int, Field(gt=0, le=100_000)]], Field(min_length=1)]
    activation: Literal["elu", "relu", "selu", "gelu", "tanh", "sigmoid", "swish"]
    batch_norm_momentum: Annotated[float, Field(ge=0, lt=1)]
    batch_norm_logits: bool
    dropout: Annotated[float, Field(ge=0, lt=1)]


class TrainParams(_Section):
    """The optimisation: plain SGD on mini-batches of a fresh permutation every epoch by default."""

    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"]
    learning_rate: Annotated[float, Field(gt=0, le=100)]
    momentum: Annotated[float, Field(ge=0, lt=1)]
    nesterov: bool
    weight_decay: Annotated[float, Field(ge=0, le=1)]
    schedule: Literal["constant", "cosine"]
    warmup_epochs: Annotated[int, Field(ge=0)]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    shift_pixels: Annotated[int, Field(ge=0, le=8)]
    epochs: Annotated[int, Field(ge=1, le=100_000)]
    batch_size: Annotated[int, Field(ge=2)]
    seed: Annotated[int, Field(ge=0, lt=2**32)]

    @field_validator("batch_size", mode="before")
    @classmethod
    def _two_rows_for_batch_norm(cls, value: Any) -> Any:
        if value == 1 and not isinstance(value, bool):
            raise ValueError("batch normalization needs at least 2 rows per batch to compute a variance; use 2 or more")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.momentum and self.optimizer not in ("sgd", "rmsprop"):
            raise ValueError(f"train.momentum applies to sgd and rmsprop, not {self.optimizer}; set it to 0")
        if self.nesterov and not (self.optimizer == "sgd" and self.momentum > 0):
            raise ValueError("train.nesterov needs train.optimizer: sgd and train.momentum > 0")
        if self.warmup_epochs and self.schedule != "cosine":
            raise ValueError("train.warmup_epochs applies to train.schedule: cosine; set it to 0")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs = {self.warmup_epochs} leaves no epoch to decay in; "
                f"use fewer than train.epochs = {self.epochs}"
            )
        return self


class Params(_Section):
    """The whole params.yaml."""

    download: DownloadParams
    data: DataParams
    model: ModelParams
    train: TrainParams

    @model_validator(mode="after")
    def _batch_fits_training_set(self) -> Params:
        train_size = MNIST_TRAIN_SIZE - self.data.validation_size
        if self.train.batch_size > train_size:
            raise ValueError(
                f"train.batch_size = {self.train.batch_size} is larger than the training set "
                f"({MNIST_TRAIN_SIZE} - data.validation_size = {train_size} images); "
                f"use a batch size between 2 and {train_size}"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """`section.key -> value` (`flatten`)."""
        return flatten(self.model_dump())


def flatten(document: dict[str, Any]) -> dict[str, Any]:
    """A params document's sections as `section.key -> value` (what is not a section is left out): the
    form logged to MLflow, shown by `dvc params diff` and written in recipes' overrides."""
    return {
        f"{section}.{key}": value
        for section, values in document.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }


def _describe(error: ErrorDetails, file: Path) -> str:
    """One sentence for one pydantic error: file, key, bad value, what is allowed."""
    loc = tuple(error["loc"])
    # repr() escapes newlines and control characters, so a key like "a\nb" cannot split the one-line message
    key = ".".join(repr(str(part))[1:-1] for part in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        # params.yaml is sections of keys: the unknown key is a section's (loc of two parts) or a section
        parent = cast(type[BaseModel], Params.model_fields[str(loc[0])].annotation) if len(loc) > 1 else Params
        known = list(parent.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(known)}."
        return f"{file}: unknown key '{key}'; {hint}"
    if error["type"] == "missing":
        return f"{file}: '{key}' is missing; add it (docs/parameters.md lists every key with its default)."
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and len(loc) <= 1:  # a rule across keys of a section or sections
        return f"{file}: {message}."
    value = error.get("input")
    return f"{file}: {key} = {value!r} is not allowed: {message[0].lower()}{message[1:]}."


def validate_params(document: Any, file: Path = PARAMS_FILE) -> Params:
    """Check a parsed params document against the schema; raise `ConfigError` naming the first problem."""
    if not isinstance(document, dict):
        raise ConfigError(
            f"{file}: expected a mapping of sections (download, data, model, train), got {type(document).__name__}."
        )
    try:
        return Params.model_validate(document)
    except ValidationError as error:
        # An unknown key first: a typo also makes the key it was meant to be "missing", and the
        # "did you mean" hint is the message that tells the user what to fix.
        problems = sorted(error.errors(include_url=False), key=lambda problem: problem["type"] != "extra_forbidden")
        more = f" ({len(problems) - 1} more problem(s) after fixing this one)" if len(problems) > 1 else ""
        raise ConfigError(_describe(problems[0], file) + more) from None


def read_yaml(file: Path, if_missing: str) -> Any:
    """Parse a YAML file that users edit (params.yaml, a recipe, the search space); every problem is a
    `ConfigError` naming the file, with the line and column of a syntax error. `if_missing` ends the
    sentence for a missing file: what to do about it."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file} not found{if_missing}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{file} cannot be read ({error}); restore it with `git checkout {file}`.") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{file} is not valid YAML{where}: {error.problem}; fix the syntax there.") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{file} is not valid YAML: {error}; fix the syntax.") from None


def load_params(file: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; every stage calls this before doing any work."""
    missing = f" in {Path.cwd()}; run the stages from the repository root (dvc repro does)."
    return validate_params(read_yaml(file, missing), file)
