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
PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "plots")
RUN_NAME_LENGTH = 250  # MLflow's column for a run's name (PostgreSQL enforces it)


def dvc_experiment() -> str | None:
    """The name of the DVC experiment being run (`dvc exp run` sets it), else None."""
    return os.environ.get("DVC_EXP_NAME")


def file_md5(path: Path) -> str:
    """The MD5 that DVC records for a file in dvc.lock, so a run can be matched to its data."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
    if exp_name := dvc_experiment():
        tags["dvc_experiment"] = exp_name
    return tags


def _changed(*excluded: str) -> bool:
    """Whether a tracked file other than the pipeline's outputs and `excluded` differs from the commit."""
    paths = (f":!{path}" for path in (*PIPELINE_OUTPUTS, *excluded))
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", *paths))


def _committed_params(params_file: Path) -> dict[str, Any] | None:
    """params.yaml as committed, as `section.key -> value`; None where git does not have it."""
    text = _git("show", f"HEAD:./{params_file.as_posix()}")
    try:
        document = yaml.safe_load(text) if text is not None else None
    except yaml.YAMLError:
        return None
    return flatten(document) if isinstance(document, dict) else None


def run_name(flat: dict[str, Any], params_file: Path) -> str:
    """What a list of runs says this run was: the DVC experiment's name under `dvc exp run`; otherwise
    the short git commit, `-dirty` if a tracked file other than params.yaml and the pipeline's outputs
    differs from it, then each value of params.yaml (`flat`) that differs from the committed one:
    `1a2b3c4 train.learning_rate=0.05 train.epochs=50`."""
    if name := dvc_experiment():
        return name
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return "uncommitted"  # no git repository here, or no commit yet
    parts = [f"{commit}-dirty" if _changed(params_file.as_posix()) else commit]
    if (committed := _committed_params(params_file)) is not None:
        missing = object()  # a key the committed file lacks differs whatever its value
        parts += [
            f"{key}={value if isinstance(value, str) else json.dumps(value)}"
            for key, value in flat.items()
            if committed.get(key, missing) != value
        ]
    return " ".join(parts)[:RUN_NAME_LENGTH]
