"""Lineage: the tags that lead from a run back to its commit, its params.yaml, its data and its experiment."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import lineage


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
