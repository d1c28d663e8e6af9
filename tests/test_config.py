"""params.yaml is validated before any work: bad values stop a stage with one sentence, never a traceback."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st
from workspace import REPO

from pipeline.config import (
    CONFUSION_FILE,
    CONFUSION_PNG,
    CURVES_FILE,
    HISTORY_FILE,
    MISTAKES_PNG,
    MNIST_FILES,
    MODEL_FILE,
    RAW_DIR,
    REPORT_FILE,
    RUN_FILE,
    TEST_METRICS,
    TRAIN_METRICS,
    DownloadParams,
    Params,
    load_params,
    prepared_file,
    project_root,
    validate_params,
)
from pipeline.errors import ConfigError

REPO_PARAMS = REPO / "params.yaml"


def default_document() -> dict[str, Any]:
    """A fresh copy of the repository's params.yaml as parsed YAML (tests mutate it freely)."""
    return yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))


def write_params(folder: Path, document: dict[str, Any]) -> Path:
    """Write `document` as folder/params.yaml and return its path."""
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def config_error(tmp_path: Path, section: str, key: str, value: Any) -> str:
    """The ConfigError message for params.yaml with `section.key` set to `value` (it must fail)."""
    document = default_document()
    document[section][key] = value
    path = write_params(tmp_path, document)
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    return str(caught.value)


# --- the repository's own file ------------------------------------------------------------------


def test_repository_params_validate_to_the_reference_defaults() -> None:
    """The committed params.yaml must reproduce the tutorial's reference run."""
    params = load_params(REPO_PARAMS)
    assert params.data.validation_size == 5000
    assert params.model.hidden_units == [300, 100]
    assert params.model.activation == "elu"
    assert params.model.batch_norm_momentum == 0.9
    assert params.model.batch_norm_logits is False
    assert params.train.optimizer == "sgd"
    assert params.train.learning_rate == 0.01
    assert params.train.epochs == 25
    assert params.train.batch_size == 250
    assert params.train.seed == 42
    # the knobs beyond the tutorial are all off
    assert params.model.dropout == 0
    assert (params.train.momentum, params.train.nesterov, params.train.weight_decay) == (0, False, 0)
    assert (params.train.schedule, params.train.warmup_epochs) == ("constant", 0)
    assert (params.train.label_smoothing, params.train.shift_pixels) == (0, 0)
    assert params.download.sources[-1].rstrip("/") == "data/offline"
    assert all(source.startswith("https://") for source in params.download.sources[:-1])


def test_flat_names_every_key_with_its_section() -> None:
    """`flat()` is what MLflow logs: one `section.key` per leaf of params.yaml."""
    flat = load_params(REPO_PARAMS).flat()
    document = default_document()
    assert set(flat) == {f"{section}.{key}" for section, values in document.items() for key in values}
    assert flat["train.learning_rate"] == 0.01


# --- one bad value, one sentence ----------------------------------------------------------------

BAD_VALUES = [
    # (section, key, bad value, a piece of the message saying what is allowed)
    ("train", "learning_rate", -0.01, "greater than 0"),
    ("train", "learning_rate", 0, "greater than 0"),
    ("train", "learning_rate", 0.0, "greater than 0"),
    ("train", "epochs", 0, "greater than or equal to 1"),
    ("train", "batch_size", 0, "greater than or equal to 2"),
    ("train", "batch_size", 1, "batch normalization needs at least 2 rows per batch"),
    ("train", "optimizer", "adagrad", "'adamw'"),
    ("train", "schedule", "linear", "'cosine'"),
    ("train", "momentum", 1.0, "less than 1"),
    ("train", "label_smoothing", -0.1, "greater than or equal to 0"),
    ("train", "shift_pixels", 9, "less than or equal to 8"),
    ("model", "dropout", 1.0, "less than 1"),
    ("model", "batch_norm_momentum", 1.0, "less than 1"),
    ("model", "batch_norm_momentum", -0.1, "greater than or equal to 0"),
    ("model", "hidden_units", [], "at least 1 item"),
    ("data", "validation_size", 0, "greater than or equal to 1"),
    ("data", "validation_size", 60000, "less than 60000"),
    ("model", "activation", "softmaxx", "'elu'"),
    ("train", "optimizer", "adagrad", "'sgd'"),
    ("train", "learning_rate", "0.01", "valid number"),
    ("train", "epochs", True, "valid integer"),
    ("download", "sources", ["http://yann.lecun.com/exdb/mnist/"], "https://"),
]


@pytest.mark.parametrize(("section", "key", "value", "allowed"), BAD_VALUES)
def test_bad_value_names_file_key_value_and_what_is_allowed(
    tmp_path: Path, section: str, key: str, value: Any, allowed: str
) -> None:
    """Each message must let the user fix the file without reading the code."""
    message = config_error(tmp_path, section, key, value)
    assert str(tmp_path / "params.yaml") in message
    assert f"{section}.{key}" in message
    assert repr(value) in message
    assert allowed in message


def test_hidden_unit_zero_points_at_the_list_item(tmp_path: Path) -> None:
    """A zero-width layer is named by its index so the user knows which number to change."""
    message = config_error(tmp_path, "model", "hidden_units", [300, 0])
    assert "model.hidden_units.1" in message
    assert "= 0 " in message
    assert "greater than 0" in message


def test_batch_size_larger_than_the_training_set(tmp_path: Path) -> None:
    """The training set is 60000 - validation_size images; a bigger batch cannot be drawn."""
    document = default_document()
    document["data"]["validation_size"] = 5000
    document["train"]["batch_size"] = 55001
    with pytest.raises(ConfigError) as caught:
        load_params(write_params(tmp_path, document))
    message = str(caught.value)
    assert "params.yaml" in message
    assert "train.batch_size" in message
    assert "55001" in message
    assert "between 2 and 55000" in message

    document["train"]["batch_size"] = 55000  # the largest allowed value is accepted
    assert load_params(write_params(tmp_path, document)).train.batch_size == 55000


def test_http_source_is_rejected_https_and_local_folders_are_not() -> None:
    """Downloads are only trusted over HTTPS (the checksum protects content, TLS protects the mirror list)."""
    with pytest.raises(ConfigError, match=r"download\.sources.*must be an https:// URL or a local folder"):
        validate_params(
            {**default_document(), "download": {**default_document()["download"], "sources": ["http://x/"]}}
        )
    ok = DownloadParams(sources=["https://example.org/mnist/", "data/offline/"], timeout_seconds=1, max_megabytes=1)
    assert ok.sources == ["https://example.org/mnist/", "data/offline/"]


# --- unknown and missing keys -------------------------------------------------------------------


def test_typo_in_a_key_suggests_the_right_one(tmp_path: Path) -> None:
    """A typo must not be silently ignored while the default is used."""
    document = default_document()
    document["train"]["lerning_rate"] = document["train"].pop("learning_rate")
    with pytest.raises(ConfigError) as caught:
        load_params(write_params(tmp_path, document))
    message = str(caught.value)
    assert "train.lerning_rate" in message
    assert "did you mean 'learning_rate'" in message


def test_unknown_section_lists_the_known_ones(tmp_path: Path) -> None:
    """An extra top-level section (e.g. a misplaced block) is an error, with the allowed sections."""
    document = default_document()
    document["evaluation"] = {"batch_size": 100}
    with pytest.raises(ConfigError) as caught:
        load_params(write_params(tmp_path, document))
    message = str(caught.value)
    assert "unknown key 'evaluation'" in message
    assert "download, data, model, train" in message


@pytest.mark.parametrize(("section", "key"), [("train", "epochs"), ("model", "activation"), ("download", "sources")])
def test_missing_key_is_reported_not_defaulted(tmp_path: Path, section: str, key: str) -> None:
    """Every value is explicit in params.yaml; a deleted line must not fall back to a hidden default."""
    document = default_document()
    del document[section][key]
    with pytest.raises(ConfigError) as caught:
        load_params(write_params(tmp_path, document))
    assert f"'{section}.{key}' is missing" in str(caught.value)


@pytest.mark.parametrize("key", ["lerning_rate\nseed", "epochs\r", "\x1b[31mred"])
def test_unknown_key_with_control_characters_stays_on_one_line(key: str) -> None:
    """Stages print the message as ONE line on stderr; a quoted YAML key must not break it apart."""
    document = default_document()
    document["train"][key] = 1
    with pytest.raises(ConfigError) as caught:
        validate_params(document)
    message = str(caught.value)
    assert message.isprintable(), message
    assert "unknown key 'train." in message


def test_missing_section_is_reported(tmp_path: Path) -> None:
    """A whole section removed is reported by name."""
    document = default_document()
    del document["model"]
    with pytest.raises(ConfigError, match="'model' is missing"):
        load_params(write_params(tmp_path, document))


# --- files that are not params documents --------------------------------------------------------


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    """A syntax error is located, so the user does not have to bisect the file."""
    lines = REPO_PARAMS.read_text(encoding="utf-8").splitlines()
    number = next(i for i, line in enumerate(lines, start=1) if line.strip().startswith("epochs:"))
    lines[number - 1] = "  epochs: [25"  # an unclosed flow sequence
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    message = str(caught.value)
    assert "not valid YAML" in message
    reported = int(message.split("line ", 1)[1].split(",", 1)[0])
    assert number <= reported <= number + 1  # PyYAML flags the unclosed bracket on its line or the next


def test_bad_indentation_reports_its_line(tmp_path: Path) -> None:
    """The common hand-editing mistake: a key indented differently from its siblings."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 25\n    seed: 42\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 3"):
        load_params(path)


def test_missing_params_file_is_a_clear_error(tmp_path: Path) -> None:
    """Running a stage from the wrong folder says so instead of raising FileNotFoundError."""
    with pytest.raises(ConfigError) as caught:
        load_params(tmp_path / "params.yaml")
    assert "params.yaml not found" in str(caught.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- list\n", "just a string\n", "42\n"])
def test_document_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    """An empty file or a list is reported as such, not as an AttributeError deep in pydantic."""
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_params(path)


# --- a real stage on a broken params.yaml -------------------------------------------------------


def test_stage_stops_with_one_line_and_leaves_outputs_alone(tmp_path: Path) -> None:
    """`python -m pipeline.download` must fail before touching data/raw/, with one line and no traceback."""
    document = default_document()
    document["download"]["timeout_seconds"] = -1
    write_params(tmp_path, document)
    existing = tmp_path / "data" / "raw" / "train-images-idx3-ubyte"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"an earlier, valid output")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    result = subprocess.run(
        [sys.executable, "-m", "pipeline.download"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert "download.timeout_seconds" in lines[0]
    assert "-1" in lines[0]
    assert existing.read_bytes() == b"an earlier, valid output"
    assert sorted(p.name for p in existing.parent.iterdir()) == ["train-images-idx3-ubyte"]


# --- property-based: any document gives Params or ConfigError -----------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_keys = st.text(max_size=15) | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (dict keys and list indexes) from the root to a node, the root excluded."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    paths = []
    for key, child in children:
        paths.append((*prefix, key))
        paths.extend(_paths(child, (*prefix, key)))
    return paths


def _containers(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every dict in the document, the root included."""
    found = [prefix] if isinstance(node, dict) else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in children:
        found.extend(_containers(child, (*prefix, key)))
    return found


def _at(document: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        document = document[part]
    return document


_DEFAULT = yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))
_DEFAULT_PATHS = _paths(_DEFAULT)
_DEFAULT_DICTS = _containers(_DEFAULT)


@st.composite
def mutated_defaults(draw: st.DrawFn) -> dict[str, Any]:
    """The valid document with one to three edits: a node replaced, a key added, a key deleted."""
    document = copy.deepcopy(_DEFAULT)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["replace", "add", "delete"]))
        path = draw(st.sampled_from(_DEFAULT_DICTS if kind == "add" else _DEFAULT_PATHS))
        try:
            if kind == "add":
                _at(document, path)[draw(_keys)] = draw(_values)
                continue
            parent = _at(document, path[:-1])
            if kind == "replace":
                parent[path[-1]] = draw(_values)
            else:
                del parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed or replaced this part of the document
    return document


@settings(max_examples=300, deadline=None)
@given(st.one_of(_values, mutated_defaults()))
def test_any_document_gives_params_or_config_error(document: Any) -> None:
    """Whatever a user writes, the stage stops with our one-sentence error, never a stray exception."""
    try:
        params = validate_params(document)
    except ConfigError as error:
        message = str(error)
        assert message.startswith("params.yaml")
        assert message.isprintable(), message  # one line on stderr, whatever the keys and values
    else:
        assert isinstance(params, Params)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200) | st.builds(yaml.safe_dump, mutated_defaults()))
def test_any_file_text_gives_params_or_config_error(text: str) -> None:
    """The same guarantee for raw file contents, YAML parsing included (tabs, bad escapes, odd tags)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "params.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            params = load_params(path)
        except ConfigError as error:
            assert str(error).startswith(str(path))
        else:
            assert isinstance(params, Params)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optimizer": "adam", "momentum": 0.9}, "train.momentum applies to sgd and rmsprop, not adam"),
        ({"nesterov": True}, "train.nesterov needs train.optimizer: sgd and train.momentum > 0"),
        ({"warmup_epochs": 2}, "train.warmup_epochs applies to train.schedule: cosine"),
        ({"schedule": "cosine", "warmup_epochs": 25}, "train.warmup_epochs = 25 leaves no epoch to decay in"),
    ],
)
def test_inconsistent_training_knobs_are_explained(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    document = default_document()
    document["train"].update(changes)
    with pytest.raises(ConfigError) as caught:
        load_params(write_params(tmp_path, document))
    assert str(caught.value).startswith(f"{tmp_path / 'params.yaml'}: {message}")
    assert "{" not in str(caught.value), "the section's values are not dumped into the message"


# What each stage writes, through the paths of pipeline/config.py (outs and metrics in dvc.yaml).
STAGE_OUTPUTS: dict[str, tuple[Path, ...]] = {
    "download": tuple(RAW_DIR / name for name in MNIST_FILES),
    "prepare": tuple(prepared_file(split) for split in ("train", "validation", "test")),
    "train": (MODEL_FILE, CURVES_FILE, HISTORY_FILE, TRAIN_METRICS, RUN_FILE),
    "evaluate": (REPORT_FILE, CONFUSION_FILE, CONFUSION_PNG, MISTAKES_PNG, TEST_METRICS),
}


def test_paths_in_dvc_yaml_are_the_ones_the_stages_write() -> None:
    """dvc.yaml and pipeline/config.py name the same outputs, stage by stage."""
    stages = yaml.safe_load((REPO_PARAMS.parent / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_OUTPUTS)
    for name, stage in stages.items():
        entries = [entry for key in ("outs", "metrics") for entry in stage.get(key, [])]
        declared = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]
        assert sorted(declared) == sorted(str(path) for path in STAGE_OUTPUTS[name]), name
        assert stage["cmd"] == f"python -m pipeline.{name}"
        assert f"pipeline/{name}.py" in stage["deps"]


def test_metrics_are_the_results_people_compare_and_the_run_id_is_an_output() -> None:
    """`dvc exp show` and `dvc metrics diff` compare validation and test results only; the MLflow run
    that holds the rest is named in an output that git keeps (a stage output, not a metric)."""
    stages = yaml.safe_load((REPO_PARAMS.parent / "dvc.yaml").read_text())["stages"]
    metrics = {name: [next(iter(entry)) for entry in stage.get("metrics", [])] for name, stage in stages.items()}
    assert metrics == {"download": [], "prepare": [], "train": [str(TRAIN_METRICS)], "evaluate": [str(TEST_METRICS)]}
    outs = {next(iter(entry)): entry[next(iter(entry))] for entry in stages["train"]["outs"]}
    assert outs[str(RUN_FILE)] == {"persist": True, "cache": False}
    assert str(RUN_FILE) in stages["evaluate"]["deps"]  # evaluation logs into the run that trained the model
    committed = {path: json.loads((REPO_PARAMS.parent / path).read_text()) for path in (TRAIN_METRICS, TEST_METRICS)}
    assert {path: sorted(values) for path, values in committed.items()} == {
        TRAIN_METRICS: ["val_accuracy", "val_loss"],
        TEST_METRICS: ["accuracy", "log_loss"],
    }
    assert all(isinstance(value, float) for values in committed.values() for value in values.values())
    assert json.loads((REPO_PARAMS.parent / RUN_FILE).read_text())["mlflow_run_id"]


def _module_file(name: str) -> Path | None:
    base = REPO_PARAMS.parent.joinpath(*name.split("."))
    return next((path for path in (base.with_suffix(".py"), base / "__init__.py") if path.is_file()), None)


def _imported_names(tree: ast.Module) -> Iterator[str]:
    """Every module an import in the file may load: at the top or inside functions, not under TYPE_CHECKING."""
    nodes: list[ast.AST] = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            nodes.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module  # `from pipeline import io` loads pipeline.io: both names are tried
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        nodes.extend(ast.iter_child_nodes(node))


def imported_files(module: str) -> set[str]:
    """The package's files that running `python -m <module>` can import, parent packages included."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        parts = pending.pop().split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name in seen or (path := _module_file(name)) is None:
                continue
            seen.add(name)
            names = _imported_names(ast.parse(path.read_text(encoding="utf-8")))
            pending.extend(found for found in names if found.split(".")[0] == "pipeline")
    return {str(path.relative_to(REPO_PARAMS.parent)) for name in seen if (path := _module_file(name))}


def test_each_stage_lists_every_module_it_runs_as_a_dep() -> None:
    """A change in any module a stage imports can change its outputs, so DVC must re-run it: the code deps
    of each stage in dvc.yaml are exactly the package files its imports reach."""
    stages = yaml.safe_load((REPO_PARAMS.parent / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        code = {dep for dep in stage["deps"] if dep.startswith("pipeline/")}
        assert code == imported_files(f"pipeline.{name}"), name


def test_the_import_walk_finds_imports_inside_functions() -> None:
    """The walk sees what evaluate imports only inside functions (the model, the tracking boundary)."""
    files = imported_files("pipeline.evaluate")
    assert {"pipeline/model.py", "pipeline/tracking/store.py", "pipeline/__init__.py"} <= files
    assert "pipeline/tune/study.py" not in files and "pipeline/predict.py" not in files


def test_project_root_is_the_repository_holding_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "repo" / "pipeline").mkdir(parents=True)
    (tmp_path / "repo" / "dvc.yaml").write_text("stages: {}\n")
    assert project_root(tmp_path / "repo" / "pipeline") == tmp_path / "repo"
    assert project_root(tmp_path / "repo") == tmp_path / "repo"
    assert project_root(tmp_path) == tmp_path  # outside any repository: where the command runs


def test_project_root_of_a_dvc_experiment_copy_is_the_main_repository() -> None:
    copy = Path("/home/me/repo/.dvc/tmp/exps/tmpab12cd")
    assert project_root(copy) == Path("/home/me/repo")
