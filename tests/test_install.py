"""A regular (non-editable) install finds the store of the repository it runs in, not of site-packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from workspace import clone, sh, venv_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package installed as `pip install .` would, into a folder of its own (dependencies come from the venv)."""
    target = tmp_path_factory.mktemp("site")
    source = clone(tmp_path_factory.mktemp("source") / "repo")  # setuptools builds inside the source folder
    sh(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, source, cwd=source, timeout=600)
    assert not (target / "pipeline" / "__init__.py").is_symlink()
    return target


def test_installed_commands_use_the_store_of_the_repository_they_run_in(installed: Path, tmp_path: Path) -> None:
    repo = clone(tmp_path / "repo")
    (repo / "plots").mkdir(exist_ok=True)
    environment = venv_env(PYTHONPATH=str(installed))
    # -P: the current directory is not put on sys.path, so `pipeline` comes from the installed copy
    code = "import pipeline, pipeline.tracking as t; print(pipeline.__file__); print(t.tracking_uri())"
    done = sh(sys.executable, "-P", "-c", code, cwd=repo / "plots", env=environment)
    module_file, uri = done.stdout.split()
    assert Path(module_file).is_relative_to(installed)
    assert uri == f"sqlite:///{repo / 'mlflow.db'}?timeout=60"

    image = tmp_path / "digit.png"  # a white bar on black: a "1"
    digit = Image.new("L", (28, 28), 0)
    digit.paste(255, (12, 4, 16, 24))
    digit.save(image)
    done = subprocess.run(
        [installed / "bin" / "mnist-predict", image],
        cwd=repo,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: there is no MLflow store at {repo / 'mlflow.db'}; run `dvc repro` to train and register a model, "
        "set MLFLOW_TRACKING_URI, or pass --model models/model.keras."
    )
    assert "site-packages" not in done.stderr and str(installed) not in done.stderr
    assert os.access(installed / "bin" / "mnist-tune", os.X_OK)
