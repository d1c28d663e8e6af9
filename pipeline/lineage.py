"""Lineage: what leads from a run back to its code, configuration, data and DVC experiment.

Git's commit and whether a tracked input differs from it, the MD5s that dvc.lock records for the data,
and the name of the DVC experiment being run. Nothing here knows MLflow: the tracking boundary records
these as tags.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import flatten

# The pipeline's own outputs, which it rewrites on every run: not inputs, so they never make a run dirty.
PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "plots", "runs")
RUN_NAME_LENGTH = 250  # MLflow's column for a run's name (PostgreSQL enforces it)


def file_md5(path: Path) -> str:
    """The MD5 that DVC records for a file in dvc.lock, so a run can be matched to its data."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def data_tags(files: dict[str, Path]) -> dict[str, str]:
    """`data_md5.<split>` tags: the same MD5s that dvc.lock records for the prepared data."""
    return {f"data_md5.{name}": file_md5(path) for name, path in files.items()}


def lineage_tags(params_file: Path, data_files: dict[str, Path]) -> dict[str, str]:
    """Tags that lead from a run back to its code, configuration, data and DVC experiment."""
    tags = {"params_md5": file_md5(params_file), **data_tags(data_files)}
    if commit := _git("rev-parse", "HEAD"):
        tags["git_commit"] = commit
        # Dirty = a tracked input differs from the commit; the pipeline's own outputs (dvc.lock, the
        # metrics and plots it rewrites) are not inputs and would otherwise make every run dirty.
        tags["git_dirty"] = str(_changed()).lower()
    if exp_name := os.environ.get("DVC_EXP_NAME"):  # `dvc exp run` names the experiment it runs
        tags["dvc_experiment"] = exp_name
    return tags


def _changed(*excluded: str) -> bool:
    """Whether a tracked file other than the pipeline's outputs and `excluded` differs from the commit."""
    paths = (f":!{path}" for path in (*PIPELINE_OUTPUTS, *excluded))
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", *paths))


def changed_params(flat: dict[str, Any], params_file: Path) -> list[str]:
    """Each value of params.yaml (`flat`) that differs from the committed one, as `key=value`; none where
    git does not have params.yaml (or what it has is not a params document)."""
    try:
        document = yaml.safe_load(_git("show", f"HEAD:./{params_file.as_posix()}") or "")
    except yaml.YAMLError:
        return []
    if not isinstance(document, dict):
        return []
    committed = flatten(document)
    return [
        f"{key}={value if isinstance(value, str) else json.dumps(value)}"
        for key, value in flat.items()
        if key not in committed or committed[key] != value
    ]


def run_name(flat: dict[str, Any], params_file: Path) -> str:
    """What a list of runs says this run was: the DVC experiment's name under `dvc exp run`, else the
    short git commit, `-dirty` if a tracked file other than params.yaml and the pipeline's outputs
    differs from it; then each value of params.yaml (`flat`) that differs from the committed one (the
    experiment's baseline): `1a2b3c4 train.learning_rate=0.05 train.epochs=50`, `lr-005 train.learning_rate=0.05`."""
    if not (head := os.environ.get("DVC_EXP_NAME")):
        commit = _git("rev-parse", "--short", "HEAD")
        if not commit:
            return "uncommitted"  # no git repository here, or no commit yet
        head = f"{commit}-dirty" if _changed(params_file.as_posix()) else commit
    return " ".join([head, *changed_params(flat, params_file)])[:RUN_NAME_LENGTH]
