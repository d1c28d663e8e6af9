"""Lineage: the tags that lead from a run back to its commit, its params.yaml, its data and its experiment,
and the name that says in a list of runs what each was (real git repositories)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from workspace import REPO, set_params, sh

from pipeline import lineage
from pipeline.config import PARAMS_FILE, load_params


def test_lineage_tags_name_commit_params_and_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("a: 1\n")
    data = tmp_path / "train.npz"
    data.write_bytes(b"abc")
    monkeypatch.setenv("DVC_EXP_NAME", "quick-fox")
    tags = lineage.lineage_tags(params, {"train": data})
    assert tags["data_md5.train"] == "900150983cd24fb0d6963f7d28e17f72"  # md5("abc"), as dvc.lock records it
    assert tags["params_md5"] == lineage.file_md5(params)
    assert tags["dvc_experiment"] == "quick-fox"
    assert len(tags["git_commit"]) == 40
    assert tags["git_dirty"] in {"true", "false"}


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository holding the committed params.yaml and a module, as the current directory."""
    root = tmp_path / "repo"
    (root / "pipeline").mkdir(parents=True)
    shutil.copyfile(REPO / PARAMS_FILE, root / PARAMS_FILE)
    (root / "pipeline/train.py").write_text("# the code\n")
    for output in ("metrics/train.json", "runs/train.json"):
        (root / output).parent.mkdir()
        (root / output).write_text("{}\n")
    sh("git", "init", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "c", cwd=root)
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return root


def short_commit(root: Path) -> str:
    return sh("git", "rev-parse", "--short", "HEAD", cwd=root).stdout.strip()


def name(root: Path) -> str:
    return lineage.run_name(load_params(root / PARAMS_FILE).flat(), PARAMS_FILE)


def test_a_run_of_the_committed_params_is_named_after_the_commit(repo: Path) -> None:
    (repo / "metrics/train.json").write_text('{"val_accuracy": 0.9}\n')  # the pipeline's own outputs
    (repo / "runs/train.json").write_text('{"mlflow_run_id": "abc"}\n')
    assert name(repo) == short_commit(repo)


def test_changed_params_are_named_with_their_values(repo: Path) -> None:
    set_params(repo, train__learning_rate=0.05, model__hidden_units=[64, 32], model__activation="relu")
    assert name(repo) == (
        f"{short_commit(repo)} model.hidden_units=[64, 32] model.activation=relu train.learning_rate=0.05"
    )


def test_changed_code_marks_the_commit_dirty(repo: Path) -> None:
    (repo / "pipeline/train.py").write_text("# changed\n")
    set_params(repo, train__epochs=50)
    assert name(repo) == f"{short_commit(repo)}-dirty train.epochs=50"


def test_a_dvc_experiment_is_named_with_what_it_changed(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "lr-005")
    assert name(repo) == "lr-005"
    set_params(repo, train__learning_rate=0.05)
    assert name(repo) == "lr-005 train.learning_rate=0.05"


def test_a_key_the_commit_lacks_is_named(repo: Path) -> None:
    """params.yaml committed before a key existed: the key is named, with its value."""
    committed = (repo / PARAMS_FILE).read_text().replace("  shift_pixels: 0 ", "  # shift_pixels: 0 ")
    (repo / PARAMS_FILE).write_text(committed)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qam", "older", cwd=repo)
    (repo / PARAMS_FILE).write_text(committed.replace("  # shift_pixels: 0 ", "  shift_pixels: 0 "))
    assert name(repo) == f"{short_commit(repo)} train.shift_pixels=0"


def test_without_git_the_run_is_uncommitted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copyfile(REPO / PARAMS_FILE, tmp_path / PARAMS_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above either
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True).returncode != 0
    assert name(tmp_path) == "uncommitted"


def test_a_long_name_fits_mlflows_column(repo: Path) -> None:
    set_params(repo, download__sources=[f"https://mirror-{n}.example/mnist/" for n in range(20)])
    assert len(name(repo)) == lineage.RUN_NAME_LENGTH
