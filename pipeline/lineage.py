"""Lineage: what leads from a run back to its code, configuration, data and DVC experiment.

Git's commit and whether a tracked input differs from it, the MD5s that dvc.lock records for the data,
and the name of the DVC experiment being run. Nothing here knows MLflow: the tracking boundary records
these as tags.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

# The pipeline's own outputs, which it rewrites on every run: not inputs, so they never make a run dirty.
PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "plots")


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
        outputs = (f":!{path}" for path in PIPELINE_OUTPUTS)
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *outputs)
        tags["git_dirty"] = str(bool(changed)).lower()
    if exp_name := dvc_experiment():
        tags["dvc_experiment"] = exp_name
    return tags

