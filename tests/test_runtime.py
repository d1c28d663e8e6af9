"""How the commands start TensorFlow: the XLA cache's folder, Keras' optional imports kept out, and
TensorFlow's errors of a compiled training told apart. The cache is shared by every process of the
machine: real trainings in processes of their own (tests/xla_training.py) damage, remove and write its
entries in forced orders."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_for
from workspace import REPO

from pipeline import runtime
from pipeline.errors import ResourceError


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


def training(root: Path, units: int, *hold: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """tests/xla_training.py in a process of its own (the XLA flags of this process, so the same folder)."""
    command = [*prefix, sys.executable, str(TRAINING), str(root), str(units), *map(str, hold)]
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
def entries(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[str, bytes]]:
    """The cache entry (name, bytes) that a real training of a 32- and of a 48-wide network writes."""
    root = tmp_path_factory.mktemp("xla")
    found: dict[int, tuple[str, bytes]] = {}
    for units in (32, 48):
        before = set(runtime.xla_cache_dir(root).glob("*.pb"))
        trained(training(root, units))
        (new,) = set(runtime.xla_cache_dir(root).glob("*.pb")) - before
        found[units] = (new.name, new.read_bytes())
    return found


def cache_with(root: Path, entries: dict[int, tuple[str, bytes]], damaged: bytes | None) -> dict[int, Path]:
    """A cache folder under `root` holding both entries, the 32-wide one replaced by `damaged` bytes."""
    folder = runtime.xla_cache_dir(root)
    folder.mkdir(parents=True)
    paths = {}
    for units, (name, data) in entries.items():
        paths[units] = folder / name
        paths[units].write_bytes(damaged if units == 32 and damaged is not None else data)
    return paths


DAMAGE = {  # how an entry can be damaged, and what TensorFlow says when it reads it
    "cut-short": lambda data: data[: len(data) // 2],  # "Read less bytes than requested"
    "not-protobuf": lambda data: bytes(range(256)) * 4,  # "Can't parse <file> as binary proto"
    "empty": lambda data: b"",  # "Serialized cache key does not match."
}


@pytest.mark.e2e  # real trainings in processes of their own
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_one_line_and_removed_alone(
    tmp_path: Path, entries: dict[int, tuple[str, bytes]], damage: str
) -> None:
    paths = cache_with(tmp_path, entries, DAMAGE[damage](entries[32][1]))
    line = error_line(training(tmp_path, 32))
    assert "XLA compilation cache" in line and f"the damaged entry {paths[32].name}" in line
    assert line.endswith("was removed; run the command again.")
    assert not paths[32].exists()
    assert paths[48].read_bytes() == entries[48][1]  # another shape's entry stays, as does the folder
    if damage == "cut-short":  # and the next run compiles afresh, writing a whole entry
        trained(training(tmp_path, 32))
        assert runtime.entry_is_intact(paths[32])


def test_entries_are_checked_against_their_names(tmp_path: Path) -> None:
    """Bytes that parse but are no entry for the name they are stored under are not intact."""
    assert not runtime.entry_is_intact(tmp_path / "missing.pb")
    (tmp_path / "x.pb").write_bytes(b"\x0a\x00")  # a message with an empty field 1 and nothing else
    assert not runtime.entry_is_intact(tmp_path / "x.pb")


@pytest.mark.e2e
def test_intact_entries_pass_the_check(tmp_path: Path, entries: dict[int, tuple[str, bytes]]) -> None:
    paths = cache_with(tmp_path, entries, None)
    assert all(runtime.entry_is_intact(path) for path in paths.values())
    renamed = paths[32].with_name(paths[48].name)
    paths[48].unlink()
    paths[32].rename(renamed)  # a whole entry under another key's name
    assert not runtime.entry_is_intact(renamed)


def strace_delaying_renames(seconds: float) -> tuple[str, ...]:
    """A command prefix that runs a process with each of its renames held `seconds` before it happens
    (strace's fault injection); the test skips where strace is missing or may not trace."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    calls = "rename,renameat,renameat2"
    prefix = ("strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e", f"trace={calls}")
    prefix += ("-e", f"inject={calls}:delay_enter={int(seconds * 1e6)}")
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()[:200]}")
    return prefix


@pytest.mark.e2e
def test_removing_a_damaged_entry_spares_an_entry_being_written(
    tmp_path: Path, entries: dict[int, tuple[str, bytes]]
) -> None:
    """Forced order: process C has found its entry damaged and is held just before removing it; process
    W compiles another shape and has written its entry to its temporary file, its rename into place held
    by strace; C removes; then W renames. W trains to the end (removing the folder, as this module did
    before, fails W's rename: its temporary file is gone)."""
    prefix = strace_delaying_renames(15)
    paths = cache_with(tmp_path, {32: entries[32]}, DAMAGE["cut-short"](entries[32][1]))
    folder, hold = paths[32].parent, tmp_path / "hold"
    clearer = training(tmp_path, 32, hold)
    wait_for(hold.with_suffix(".reached").exists, "C at its removal", WAIT, process=clearer)
    writer = training(tmp_path, 48, prefix=prefix)
    wait_for(lambda: any(folder.glob("*.tmp")), "W's temporary entry", WAIT, process=writer)
    hold.with_suffix(".go").touch()
    assert "damaged entry" in error_line(clearer)
    assert not paths[32].exists()
    assert list(folder.glob("*.tmp")), "W renamed before C removed: the order was not the one forced"
    trained(writer)
    assert [path.name for path in folder.iterdir()] == [entries[48][0]]
    assert runtime.entry_is_intact(folder / entries[48][0])


@pytest.mark.e2e
def test_removing_a_damaged_entry_spares_entries_written_meanwhile(
    tmp_path: Path, entries: dict[int, tuple[str, bytes]]
) -> None:
    """Forced order: C found its entry damaged and is held before removing it while W trains another
    shape to the end, its entry written; C removes: W's entry stays and the next W loads it."""
    paths = cache_with(tmp_path, {32: entries[32]}, DAMAGE["not-protobuf"](b""))
    hold = tmp_path / "hold"
    clearer = training(tmp_path, 32, hold)
    wait_for(hold.with_suffix(".reached").exists, "C at its removal", WAIT, process=clearer)
    trained(training(tmp_path, 48))
    hold.with_suffix(".go").touch()
    assert "damaged entry" in error_line(clearer)
    written = paths[32].parent / entries[48][0]
    assert not paths[32].exists() and runtime.entry_is_intact(written)


def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's cache folder set to one holding an entry that is not intact."""
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "damaged.pb").write_bytes(b"not an entry")
    monkeypatch.setattr(runtime, "_cache_dir", folder)
    return folder / "damaged.pb"


def test_other_tensorflow_errors_pass_through_and_remove_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorflow as tf

    entry = planted(tmp_path, monkeypatch)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Input to reshape"), runtime.cache_errors_explained():
        tf.reshape(tf.ones(6), (4,))
    assert entry.exists()


@pytest.mark.e2e  # TensorFlow retries a failed allocation for 10 s before it gives up
def test_out_of_memory_is_a_resource_error_and_removes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorflow as tf

    entry = planted(tmp_path, monkeypatch)
    with pytest.raises(ResourceError) as raised, runtime.cache_errors_explained():
        tf.zeros((1 << 20, 1 << 20))  # 4 TiB
    message = str(raised.value)
    assert message.startswith("TensorFlow ran out of memory while training (") and "\n" not in message
    assert "OOM when allocating tensor" in message and "model.hidden_units" in message
    assert entry.exists()
