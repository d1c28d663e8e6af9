"""How the commands start TensorFlow: the XLA cache's folder, Keras' optional imports kept out, and
TensorFlow's errors of a compiled training in one line: real trainings in processes of their own
(tests/xla_training.py) meet a damaged cache entry."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from workspace import REPO

from pipeline import runtime
from pipeline.errors import PipelineError, ResourceError


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


# --- the XLA cache, shared by the processes of a machine ----------------------------------------------

TRAINING = REPO / "tests" / "xla_training.py"
WAIT = 300  # seconds a test process may take


def training(root: Path, units: int) -> subprocess.Popen[str]:
    """tests/xla_training.py in a process of its own (the XLA flags of this process, so the same folder)."""
    command = [sys.executable, str(TRAINING), str(root), str(units)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=WAIT)
    return process.returncode, stdout, stderr


def trained(process: subprocess.Popen[str]) -> None:
    code, stdout, stderr = finish(process)
    assert (code, stdout) == (0, "trained\n"), stderr


def error_line(process: subprocess.Popen[str]) -> str:
    """The one `error:` line of a failed training (and nothing else on stderr: no traceback)."""
    code, _, stderr = finish(process)
    assert code == 1, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def entry(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    """The cache entry (name, bytes) that a real training of a 32-wide network writes."""
    root = tmp_path_factory.mktemp("xla")
    trained(training(root, 32))
    (written,) = runtime.xla_cache_dir(root).glob("*.pb")
    return written.name, written.read_bytes()


DAMAGE = {  # how an entry can be damaged, and what TensorFlow says when it reads it
    "cut-short": lambda data: data[: len(data) // 2],  # OutOfRangeError "Read less bytes than requested"
    "not-protobuf": lambda data: bytes(range(256)) * 4,  # DataLossError "Can't parse <file> as binary proto"
    "empty": lambda data: b"",  # InvalidArgumentError "Serialized cache key does not match."
}


@pytest.mark.e2e  # real trainings in processes of their own
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_one_line_that_says_how_to_clear_the_cache(
    tmp_path: Path, entry: tuple[str, bytes], damage: str
) -> None:
    folder = runtime.xla_cache_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / entry[0]).write_bytes(DAMAGE[damage](entry[1]))
    line = error_line(training(tmp_path, 32))
    assert line.startswith("error: TensorFlow failed while training (") and "\n" not in line
    assert f"XLA compilation cache {folder} is damaged" in line and "delete that folder" in line
    shutil.rmtree(folder)  # as the line says; the next run compiles afresh and writes a whole entry
    trained(training(tmp_path, 32))
    assert [path.name for path in folder.glob("*.pb")] == [entry[0]]


def test_other_tensorflow_errors_name_the_cache_only_where_it_is_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorflow as tf

    monkeypatch.setattr(runtime, "_cache_dir", None)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Input to reshape"), runtime.cache_errors_explained():
        tf.reshape(tf.ones(6), (4,))
    monkeypatch.setattr(runtime, "_cache_dir", tmp_path)
    failed = pytest.raises(PipelineError, match=r"^TensorFlow failed while training \(.*Input to reshape")
    with failed as raised, runtime.cache_errors_explained():
        tf.reshape(tf.ones(6), (4,))
    assert f"cache {tmp_path} is damaged" in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.e2e  # TensorFlow retries a failed allocation for 10 s before it gives up
def test_out_of_memory_is_a_resource_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    monkeypatch.setattr(runtime, "_cache_dir", tmp_path)  # not taken for the cache's fault
    with pytest.raises(ResourceError) as raised, runtime.cache_errors_explained():
        tf.zeros((1 << 20, 1 << 20))  # 4 TiB
    message = str(raised.value)
    assert message.startswith("TensorFlow ran out of memory while training (") and "\n" not in message
    assert "OOM when allocating tensor" in message and "model.hidden_units" in message
