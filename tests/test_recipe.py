"""`mnist-recipe`: a committed partial params.yaml, checked like params.yaml, run as a DVC experiment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from workspace import QUICK, REPO, reproduced, sh, venv_env

from pipeline import recipe
from pipeline.config import load_params
from pipeline.errors import ConfigError


def write(folder: Path, document: object) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # recipes are read over the repository's params.yaml


def test_committed_recipe_is_valid_and_keeps_the_tutorials_network(in_repo: None) -> None:
    overrides = recipe.read_overrides(REPO / "recipes/tuned.yaml")
    params = recipe.apply(load_params(), overrides, Path("recipes/tuned.yaml"))
    assert params.model.hidden_units == [300, 100]
    assert params.model.activation == "elu"
    assert not any(key.startswith(("model.hidden_units", "model.activation", "data.")) for key in overrides)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"train": {"lerning_rate": 0.1}}, "unknown key 'train.lerning_rate'; did you mean 'learning_rate'?"),
        ({"train": {"batch_size": 1}}, "batch normalization needs at least 2 rows"),
        ({"trian": {"epochs": 3}}, "unknown section 'trian'"),
        (["train.epochs=3"], "expected sections of params.yaml"),
    ],
)
def test_a_bad_recipe_is_one_sentence_naming_the_file(
    in_repo: None, tmp_path: Path, document: object, message: str
) -> None:
    path = write(tmp_path, document)
    with pytest.raises(ConfigError, match=message) as caught:
        recipe.read_overrides(path)
    assert str(caught.value).startswith(str(path))


def test_exp_run_command_round_trips_through_yaml() -> None:
    overrides = {"train.learning_rate": 1e-5, "model.hidden_units": [300, 100], "train.optimizer": "adamw"}
    command = recipe.exp_run_command(overrides, name="x")
    assert command[:5] == ["dvc", "exp", "run", "-n", "x"]
    parsed = dict(arg.split("=", 1) for arg in command[6::2])
    assert {key: yaml.safe_load(value) for key, value in parsed.items()} == overrides  # 1e-05 would be a string


@pytest.mark.e2e
def test_recipe_runs_as_a_named_dvc_experiment_and_mlflow_run(tmp_path: Path) -> None:
    env = venv_env()
    repo = reproduced(tmp_path / "repo", "prepare", env=env, **QUICK)
    quick = repo / "recipes" / "quick.yaml"
    quick.parent.mkdir(exist_ok=True)
    quick.write_text("train:\n  optimizer: adamw\n  learning_rate: 0.003\n  shift_pixels: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.recipe", "recipes/quick.yaml"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    assert "+ dvc exp run -n quick -S 'train.optimizer=\"adamw\"'" in done.stderr
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo, env=env).stdout)
    names = [exp.get("name") for row in shown for exp in (row.get("experiments") or [])]
    assert "quick" in names
    runs = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}").search_runs(["1"])
    assert [(r.info.run_name, r.data.params["train.optimizer"], r.info.status) for r in runs] == [
        ("quick", "adamw", "FINISHED")
    ]


def test_a_missing_recipe_is_one_usage_line() -> None:
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match=r"^the following arguments are required: recipe; usage: mnist-recipe RECIPE"):
        recipe.main([])
    with pytest.raises(UsageError, match=r"usage: mnist-recipe RECIPE\.yaml"):
        recipe.main(["--temp"])
