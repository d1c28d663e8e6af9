"""How the commands start TensorFlow: the XLA cache's folder, and Keras' optional imports kept out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from workspace import REPO

from pipeline import runtime


def test_cache_folder_depends_on_xla_flags_and_nothing_else_of_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("TF_XLA_FLAGS", raising=False)
    plain = runtime.xla_cache_dir(tmp_path)
    assert plain.parent == tmp_path / ".cache" / "xla"
    assert plain.name.startswith("tensorflow-2.")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert runtime.xla_cache_dir(tmp_path) == plain
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")  # other machine code: other folder
    assert runtime.xla_cache_dir(tmp_path) != plain


@pytest.mark.e2e  # a process of its own
def test_keras_optional_integrations_stay_out_and_import_later() -> None:
    """In a fresh process: after the import, Keras has not loaded pandas, scikit-learn or matplotlib,
    and the pipeline can still import them."""
    code = (
        "import sys\nfrom pipeline import runtime\nruntime.import_tensorflow()\n"
        "print(sorted(m for m in ('pandas', 'sklearn', 'matplotlib') if m in sys.modules))\n"
        "import pandas, sklearn.metrics, matplotlib\nprint('later ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "later ok"]


@pytest.mark.e2e  # a process of its own
def test_keras_still_imports_its_optional_integrations_unless_hidden() -> None:
    """The hiding has a purpose only while Keras imports these at start-up (0.5 s of CPU and 60 MiB per
    stage, docs/performance.md): the day a Keras release stops, this fails, and runtime._KERAS_EXTRAS goes."""
    code = (
        "import sys\nfrom pipeline import runtime\nruntime._KERAS_EXTRAS = ()\nruntime.import_tensorflow()\n"
        "print(sorted(m for m in ('pandas', 'sklearn', 'matplotlib') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() != ["[]"], "Keras no longer imports its optional integrations: drop the hiding"
