"""Fault injection against the real stages: interruptions, a dead or broken tracking store, bad params,
a diverging training, a network larger than memory, and a full disk (a real, small tmpfs).

Each must end in one `error:` line and a non-zero exit, never a traceback, never a run left RUNNING,
never a new registered model version, and never a changed or half-written output: every `outs` and
`metrics` path that dvc.yaml declares, and dvc.lock, stay byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from helpers import wait_for
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from workspace import QUICK, REPO, free_port, reproduced, set_params, sh, venv_env

pytestmark = pytest.mark.e2e

ENV = venv_env()
MODEL_NAME = "mnist-bn-mlp"
MB = 1_000_000


# --- the shared clone and what is guarded in it ------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone after a complete quick `dvc repro`, so there are outputs to protect."""
    root = reproduced(tmp_path_factory.mktemp("faults") / "repo", env=ENV, **QUICK)
    assert {"data/prepared/train.npz", "models/model.keras", "metrics/test.json"} < set(declared_outputs(root))
    return root


@pytest.fixture(autouse=True)
def restore_params(repo: Path) -> Iterator[None]:
    """Whatever a test does to params.yaml, the next test finds it as committed, also after a failure."""
    original = (repo / "params.yaml").read_bytes()
    yield
    (repo / "params.yaml").write_bytes(original)


def stage_outputs(repo: Path, stage: str) -> list[str]:
    """The `outs` and `metrics` paths that dvc.yaml declares for `stage`."""
    declared = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]
    paths = []
    for kind in ("outs", "metrics"):
        for entry in declared.get(kind, []):
            paths.extend([entry] if isinstance(entry, str) else entry)  # `- path` or `- path: {options}`
    return paths


def declared_outputs(repo: Path) -> list[str]:
    """Every output of every stage of dvc.yaml, and dvc.lock: what a failing stage must leave as it was."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return [path for stage in stages for path in stage_outputs(repo, stage)] + ["dvc.lock"]


def fingerprint(root: Path, paths: list[str]) -> dict[str, str]:
    """SHA-256 of each file (all must exist: a missing output is a change too)."""
    digests = {}
    for name in paths:
        with (root / name).open("rb") as handle:
            digests[name] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def leftovers(root: Path, paths: list[str]) -> list[Path]:
    """Temporary files (`.name.XXXX.tmp...`) left beside the outputs."""
    folders = {(root / name).parent for name in paths}
    return [tmp for folder in folders for tmp in folder.glob(".*.tmp*")]


# --- the MLflow store --------------------------------------------------------------------------------


def store_uri(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlflow.db'}"


def client(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=store_uri(repo), registry_uri=store_uri(repo))


def all_runs(repo: Path) -> list[Run]:
    store = client(repo)
    experiments = [e.experiment_id for e in store.search_experiments(view_type=ViewType.ALL)]
    return list(store.search_runs(experiments, run_view_type=ViewType.ALL, max_results=5000))


def model_versions(repo: Path) -> int:
    return len(client(repo).search_model_versions(f"name='{MODEL_NAME}'"))


@dataclass(frozen=True)
class Before:
    """What a failing command must not change: the outputs, and the store's runs and model versions."""

    root: Path
    paths: list[str]
    digests: dict[str, str]
    run_ids: set[str]
    versions: int


def snapshot(repo: Path, root: Path | None = None, paths: list[str] | None = None) -> Before:
    """The state of `paths` under `root` (default: every declared output of the clone) and of the clone's store."""
    root = root or repo
    paths = paths if paths is not None else declared_outputs(repo)
    return Before(root, paths, fingerprint(root, paths), {r.info.run_id for r in all_runs(repo)}, model_versions(repo))


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def assert_failed_cleanly(repo: Path, before: Before, returncode: int, output: str, *words: str) -> list[Run]:
    """The failure contract; returns the runs the command added to the store, for further checks."""
    assert returncode != 0, output
    line = error_line(output)
    print(line)  # shown with `pytest -rP`: the message a user would read
    for word in words:
        assert word in line, line
    assert fingerprint(before.root, before.paths) == before.digests, "a failing stage must not touch the outputs"
    assert not leftovers(before.root, before.paths), "no temporary file left beside the outputs"
    runs = all_runs(repo)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], "no run may stay RUNNING"
    assert model_versions(repo) == before.versions, "a failing training must register no model version"
    return [r for r in runs if r.info.run_id not in before.run_ids]


def run(
    *command: str | Path, cwd: Path, env: dict[str, str] = ENV, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# --- interruptions ----------------------------------------------------------------------------------


@contextmanager
def started(command: list[str], **popen: object) -> Iterator[subprocess.Popen]:
    """A process that is killed if the test leaves before it ended."""
    process = subprocess.Popen(command, text=True, **popen)
    try:
        yield process
    finally:
        if process.poll() is None:
            if popen.get("start_new_session"):  # dvc and the stage it runs
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait(timeout=60)


def read_until(process: subprocess.Popen, marker: str) -> list[str]:
    """The process's stderr lines up to the first that holds `marker`."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if marker in line:
            break
    return lines


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_interrupted_training_is_killed_cleanly(repo: Path, signum: int, code: int) -> None:
    set_params(repo, train__epochs=500)  # long enough to be interrupted mid-training
    before = snapshot(repo)
    command = [sys.executable, "-m", "pipeline.train"]
    with started(command, cwd=repo, env=ENV, stderr=subprocess.PIPE) as process:
        lines = read_until(process, "epoch 2/")  # wait until training is under way
        process.send_signal(signum)
        stderr = "".join(lines) + process.stderr.read()
        assert process.wait(timeout=60) == code
    new = assert_failed_cleanly(repo, before, code, stderr, "error: ")
    assert [r.info.status for r in new] == ["KILLED"]


# --- the tracking store -----------------------------------------------------------------------------


def test_unreachable_tracking_server_fails_fast_before_training(repo: Path) -> None:
    before = snapshot(repo)
    uri = f"http://127.0.0.1:{free_port()}"
    started_at = time.monotonic()
    done = run(sys.executable, "-m", "pipeline.train", cwd=repo, env=ENV | {"MLFLOW_TRACKING_URI": uri}, timeout=120)
    elapsed = time.monotonic() - started_at
    assert done.returncode == 1
    assert_failed_cleanly(repo, before, done.returncode, done.stderr, uri, "unreachable")
    assert "epoch 1/" not in done.stderr, "must fail before training starts"
    assert elapsed < 30  # seconds: interpreter and TensorFlow start-up, then one refused connection


def test_a_server_that_stops_answering_mid_training_is_said_within_a_minute(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `mlflow server` paused after epoch 3 (SIGSTOP: its socket still accepts connections and
    nothing answers, as on a paused host): one line within about a minute, no urllib3 retry lines, the
    outputs as they were; the run, which nothing could end, is ended by the next run on this host."""
    from test_server import server_process

    from pipeline import tracking

    set_params(repo, train__epochs=500)
    before = snapshot(repo)
    with server_process(tmp_path, ENV) as (url, server):
        env = ENV | {"MLFLOW_TRACKING_URI": url}
        command = [sys.executable, "-m", "pipeline.train"]
        with started(command, cwd=repo, env=env, stderr=subprocess.PIPE) as process:
            lines = read_until(process, "epoch 3/")
            os.killpg(server.popen.pid, signal.SIGSTOP)
            paused = time.monotonic()
            try:
                stderr = "".join(lines) + process.stderr.read()
                code = process.wait(timeout=300)
                noticed = time.monotonic() - paused
            finally:
                os.killpg(server.popen.pid, signal.SIGCONT)
        print(f"said {noticed:.0f} s after the server stopped answering")
        assert_failed_cleanly(repo, before, code, stderr, url, "did not answer (timed out)")
        assert "Retrying" not in stderr and "urllib3" not in stderr, stderr
        assert noticed < 90
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        ended = tracking.end_orphaned_runs(tracking.connect())  # what the next run on this host does first
        runs = MlflowClient(tracking_uri=url).search_runs([tracking.connect()])
        assert [r.info.status for r in runs] == ["KILLED"] and [r.info.run_id for r in runs] == ended


AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{folder}/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def test_a_user_who_may_only_read_is_told_which_permission_to_ask_for(repo: Path, tmp_path: Path) -> None:
    """MLflow's own authentication (`mlflow server --app-name basic-auth`), a user with its default READ
    permission on the experiment an admin created: the train stage and `mnist-tune` each say in one line
    which user may not write and how to get the permission; nothing is written, no password shown."""
    from test_server import server_process

    (tmp_path / "auth.ini").write_text(AUTH_INI.format(folder=tmp_path))
    admin = ("admin", "admin-Secret-1")
    server_env = ENV | {
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-key-for-the-forms",
    }
    before = snapshot(repo)
    with server_process(tmp_path, server_env, options=("--app-name", "basic-auth")) as (url, _):
        as_admin = requests.Session()
        as_admin.auth = admin
        created = as_admin.post(f"{url}/api/2.0/mlflow/experiments/create", json={"name": "mnist-batchnorm"})
        user = {"username": "reader", "password": "reader-Secret-2"}
        assert created.ok and as_admin.post(f"{url}/api/2.0/mlflow/users/create", json=user).ok
        env = ENV | {
            "MLFLOW_TRACKING_URI": url,
            "MLFLOW_TRACKING_USERNAME": user["username"],
            "MLFLOW_TRACKING_PASSWORD": user["password"],
        }
        asked = "ask an admin of the server to grant reader EDIT on the experiment mnist-batchnorm"
        done = run(sys.executable, "-m", "pipeline.train", cwd=repo, env=env)
        assert_failed_cleanly(repo, before, done.returncode, done.stderr, "user reader may not write there", asked)
        tune = run("mnist-tune", "--study", "read-only", "--trials", "1", cwd=repo, env=env)
        line = error_line(tune.stderr)
        assert tune.returncode == 1 and "user reader may not write there" in line and asked in line, line
        assert "check the store" not in line
        for output in (done.stdout, done.stderr, tune.stdout, tune.stderr):
            assert user["password"] not in output and admin[1] not in output
        runs = as_admin.post(
            f"{url}/api/2.0/mlflow/runs/search", json={"experiment_ids": [created.json()["experiment_id"]]}
        )
        assert runs.ok and runs.json().get("runs", []) == [], "the server holds no run of the refused user"


@contextmanager
def broken_artifact_store(repo: Path) -> Iterator[None]:
    """`mlartifacts/` replaced by a plain file: the database works, every artifact upload fails."""
    folder = repo / "mlartifacts"
    kept = repo.parent / "mlartifacts.kept"
    folder.rename(kept)
    try:
        folder.write_text("not a folder\n")
        yield
    finally:
        folder.unlink(missing_ok=True)
        kept.rename(folder)


def test_failing_artifact_store_while_recording_the_training(repo: Path) -> None:
    before = snapshot(repo)
    with broken_artifact_store(repo):
        done = run(sys.executable, "-m", "pipeline.train", cwd=repo)
    assert "epoch 2/" in done.stderr, "the store must fail in the middle of recording, after training"
    new = assert_failed_cleanly(repo, before, done.returncode, done.stderr, "MLflow store")
    assert [r.info.status for r in new] == ["FAILED"]


def test_failing_artifact_store_while_recording_the_evaluation(repo: Path) -> None:
    before = snapshot(repo)
    with broken_artifact_store(repo):
        done = run(sys.executable, "-m", "pipeline.evaluate", cwd=repo)
    new = assert_failed_cleanly(repo, before, done.returncode, done.stderr, "MLflow store")
    assert new == [], "evaluate records into the training's run, it starts none"
    trained_in = client(repo).get_run(json.loads((repo / "runs/train.json").read_text())["mlflow_run_id"])
    assert trained_in.info.status == "FINISHED", "a failed evaluation does not undo a finished training"
    assert trained_in.data.tags.get("resume_failed"), "the run says its evaluation failed"


# --- no password in any message, log line or run record ------------------------------------------

SECRET = "s3cret"


def with_password(url: str) -> str:
    """`http://127.0.0.1:port` as a team's URL with credentials in it: `http://alice:s3cret@127.0.0.1:port`."""
    return url.replace("://", f"://alice:{SECRET}@", 1)


def hidden(url: str) -> str:
    return url.replace(SECRET, "***")


def answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
    except requests.RequestException:
        return False
    return True


@contextmanager
def web_server_that_is_not_mlflow(folder: Path) -> Iterator[str]:
    """Python's own file server on 127.0.0.1: it answers every request, 404 for MLflow's API."""
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with started(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/"), "the web server", 30)
        yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("verbose", ["0", "1"], ids=["quiet", "PIPELINE_VERBOSE"])
def test_no_password_in_the_messages_about_a_server(repo: Path, tmp_path: Path, verbose: str) -> None:
    before = snapshot(repo)
    dead = with_password(f"http://127.0.0.1:{free_port()}")
    with web_server_that_is_not_mlflow(tmp_path) as foreign:
        for uri, says in ((dead, "is unreachable"), (with_password(foreign), "is not an MLflow tracking server")):
            env = ENV | {"MLFLOW_TRACKING_URI": uri, "PIPELINE_VERBOSE": verbose}
            done = run(sys.executable, "-m", "pipeline.train", cwd=repo, env=env, timeout=120)
            assert SECRET not in done.stdout + done.stderr
            assert_failed_cleanly(repo, before, done.returncode, done.stderr, hidden(uri), says)


def test_no_password_in_what_mnist_tune_and_mnist_predict_say(repo: Path, tmp_path: Path) -> None:
    dead = with_password(f"http://127.0.0.1:{free_port()}")
    tune = [sys.executable, "-m", "pipeline.tune", "--study", "s", "--trials", "1"]
    image = tmp_path / "digit.png"
    shutil.copy2(REPO / "docs/images/confusion.png", image)  # any image: the store fails first
    storage = f"postgresql://bob:{SECRET}@127.0.0.1:{free_port()}/optuna"
    cases = [
        (tune, {"MLFLOW_TRACKING_URI": dead}, f"{hidden(dead)} is unreachable"),
        ([*tune, "--storage", storage], {}, f"the Optuna storage {hidden(storage)} cannot be opened"),
        ([sys.executable, "-m", "pipeline.predict", image], {"MLFLOW_TRACKING_URI": dead}, "is unreachable"),
    ]
    for command, env, says in cases:
        done = run(*command, cwd=repo, env=ENV | env, timeout=120)
        assert SECRET not in done.stdout + done.stderr
        assert done.returncode == 1 and says in error_line(done.stderr), done.stderr


def test_no_password_when_recording_on_a_server_fails(repo: Path, tmp_path: Path) -> None:
    """A real `mlflow server` whose artifact store is broken: MLflow's own error names the URL it called,
    credentials included; the message, the log lines and the failed run's records must not."""
    from test_server import mlflow_server

    broken = tmp_path / "artifacts"
    broken.write_text("not a folder\n")
    before = snapshot(repo)
    with mlflow_server(tmp_path, ENV, artifacts=broken) as url:
        for verbose in ("0", "1"):
            env = ENV | {"MLFLOW_TRACKING_URI": with_password(url), "PIPELINE_VERBOSE": verbose}
            done = run(sys.executable, "-m", "pipeline.train", cwd=repo, env=env)
            assert SECRET not in done.stdout + done.stderr
            shown = hidden(with_password(url))
            assert_failed_cleanly(repo, before, done.returncode, done.stderr, "recording the run", shown)
        server = MlflowClient(tracking_uri=url)
        runs = server.search_runs([e.experiment_id for e in server.search_experiments()])
        assert [r.info.status for r in runs] == ["FAILED", "FAILED"]
        for found in runs:
            records = json.dumps([found.data.params, found.data.tags, found.info.run_name])
            assert SECRET not in records and "alice" not in records


# --- a damaged or locked mlflow.db ------------------------------------------------------------------


@contextmanager
def damaged_store(repo: Path, damage: str) -> Iterator[Path]:
    """The clone's mlflow.db cut to its 100-byte header, or overwritten with random bytes; put back after."""
    database = repo / "mlflow.db"
    kept = repo.parent / "mlflow.db.kept"
    shutil.copy2(database, kept)
    try:
        if damage == "truncated":
            os.truncate(database, 100)
        else:
            database.write_bytes(os.urandom(database.stat().st_size))
        yield database
    finally:
        shutil.copy2(kept, database)


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_a_damaged_store_is_one_line_for_every_command(repo: Path, tmp_path: Path, damage: str) -> None:
    set_params(repo, train__seed=11)  # a train.* change: `dvc repro` trains
    before = snapshot(repo)
    image = tmp_path / "digit.png"
    shutil.copy2(REPO / "docs/images/confusion.png", image)
    commands = [
        ["dvc", "repro"],
        [sys.executable, "-m", "pipeline.predict", image],
        [sys.executable, "-m", "pipeline.tune", "--study", "s", "--trials", "1"],
    ]
    with damaged_store(repo, damage) as database:
        outcomes = [run(*command, cwd=repo) for command in commands]
    for done in outcomes:
        line = error_line(done.stderr)
        assert done.returncode != 0 and "Traceback" not in done.stdout
        assert f"the MLflow database {database} is damaged (" in line, line
        assert f"`mv {database} {database}.damaged`" in line and "restore it from a backup" in line
    assert_failed_cleanly(repo, before, outcomes[0].returncode, outcomes[0].stderr, "is damaged")


def test_a_store_locked_for_a_while_is_waited_for_and_said(repo: Path) -> None:
    """The store is held locked (by this process) when the stage connects, and let go once it has said so."""
    command = [sys.executable, "-m", "pipeline.train"]
    with started(command, cwd=repo, env=ENV, stderr=subprocess.PIPE) as process:
        with locked_store(repo):
            lines = read_until(process, "is locked by")
        stderr = "".join(lines) + process.stderr.read()
        assert process.wait(timeout=300) == 0, stderr
    waiting = [line for line in stderr.splitlines() if "is locked by" in line]
    assert len(waiting) == 1, stderr
    assert waiting[0].startswith(f"{repo / 'mlflow.db'} is locked by process {os.getpid()} (`")  # this one
    assert waiting[0].endswith("`); waiting up to 60 s for it to be released")


@pytest.mark.parametrize("verbose", ["0", "1"], ids=["quiet", "PIPELINE_VERBOSE"])
def test_a_store_locked_from_epoch_1_fails_in_one_line_and_the_next_run_ends_the_run(repo: Path, verbose: str) -> None:
    set_params(repo, train__seed=13)
    before = snapshot(repo)
    command = [sys.executable, "-m", "pipeline.train"]
    env = ENV | {"PIPELINE_VERBOSE": verbose}
    with started(command, cwd=repo, env=env, stderr=subprocess.PIPE) as process:
        lines = read_until(process, "epoch 1/")
        with locked_store(repo):  # until the stage has given up
            stderr = "".join(lines) + process.stderr.read()
            process.wait(timeout=300)
    assert process.returncode == 1
    last = stderr.strip().splitlines()[-1]
    database = repo / "mlflow.db"
    assert last.startswith(f"error: recording the run failed: the MLflow database {database} is locked by process ")
    assert last.endswith(
        "; let it finish or end it, then run again. The previous outputs were left as they were; the run could "
        f"not be ended either: the next run on {socket.gethostname()} marks it KILLED."
    )
    if verbose == "0":
        assert error_line(stderr) == last and "Traceback" not in stderr
    else:
        assert "Traceback" in stderr and "database is locked" in stderr, "PIPELINE_VERBOSE shows MLflow's tracebacks"
    assert fingerprint(repo, before.paths) == before.digests and not leftovers(repo, before.paths)
    left = [r for r in all_runs(repo) if r.info.status == "RUNNING"]
    assert len(left) == 1, "the store refused to end it"
    sh(sys.executable, "-m", "pipeline.evaluate", cwd=repo, env=ENV)  # the next run on this machine
    assert client(repo).get_run(left[0].info.run_id).info.status == "KILLED"
    assert model_versions(repo) == before.versions


# --- bad parameters ---------------------------------------------------------------------------------


def test_bad_params_leave_everything_as_it_was(repo: Path) -> None:
    before = snapshot(repo)
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("learning_rate: 0.01", "lerning_rate: 0.01"))
    done = run("dvc", "repro", cwd=repo)
    assert "Traceback" not in done.stdout
    new = assert_failed_cleanly(
        repo, before, done.returncode, done.stderr, "unknown key 'train.lerning_rate'; did you mean 'learning_rate'?"
    )
    assert new == [], "params are checked before any run starts"


def test_batch_of_one_row_is_refused_by_the_schema(repo: Path) -> None:
    set_params(repo, train__batch_size=1)
    before = snapshot(repo)
    done = run("dvc", "repro", cwd=repo)
    assert "Traceback" not in done.stdout
    new = assert_failed_cleanly(
        repo, before, done.returncode, done.stderr, "train.batch_size", "batch normalization needs at least 2 rows"
    )
    assert new == [], "params are checked before any run starts"


def test_diverging_training_saves_and_registers_nothing(repo: Path) -> None:
    set_params(repo, train__learning_rate=100, model__hidden_units=[300, 100, 100, 100], train__epochs=2)
    before = snapshot(repo)
    done = run("dvc", "repro", cwd=repo)
    assert "Traceback" not in done.stdout
    new = assert_failed_cleanly(repo, before, done.returncode, done.stderr, "training diverged", "learning_rate")
    assert [r.info.status for r in new] == ["FAILED"]


@pytest.mark.e2e  # the 700-layer epoch takes about two minutes to trace and optimize on 2 cores
def test_a_network_of_700_hidden_layers_trains_or_stops_in_one_line(repo: Path) -> None:
    """Keras walked such a network with more frames than Python's default limit (RecursionError); it now
    trains (as a plain graph: XLA would compile it for minutes), and 700 layers of two units diverge on
    the CPUs we know (the divergence line)."""
    set_params(repo, model__hidden_units=[2] * 700, train__epochs=1)
    before = snapshot(repo)
    done = run(sys.executable, "-m", "pipeline.train", cwd=repo, timeout=1500)
    assert "Traceback" not in done.stderr and "RecursionError" not in done.stderr, done.stderr[-3000:]
    if done.returncode:  # NaN weights: never a model
        assert_failed_cleanly(repo, before, done.returncode, done.stderr, "training diverged")
    else:
        assert "trained 1 epochs" in done.stderr


def test_network_larger_than_memory_fails_before_training(repo: Path) -> None:
    set_params(repo, model__hidden_units=[100_000, 100_000])
    before = snapshot(repo)
    started_at = time.monotonic()
    done = run(sys.executable, "-m", "pipeline.train", cwd=repo, timeout=120)
    elapsed = time.monotonic() - started_at
    new = assert_failed_cleanly(repo, before, done.returncode, done.stderr, "needs about", "GB free")
    assert "epoch 1/" not in done.stderr, "must fail before training starts"
    assert elapsed < 30, f"{elapsed:.0f} s: the memory check must come before any training"
    assert new == [], "checked before an MLflow run is started"


# --- a full disk: a real, small tmpfs ---------------------------------------------------------------


@contextmanager
def tmpfs(mountpoint: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `mountpoint` (skips the test where that is not possible)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk) needs root")
    mountpoint.mkdir(parents=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=60, check=False)


def outside_env(repo: Path, **extra: str) -> dict[str, str]:
    """Run the clone's code from another folder, writing no bytecode there."""
    return ENV | {"PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"} | extra


def copy_into(repo: Path, root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, root / name)


def sizes(root: Path, names: list[str]) -> int:
    return sum((root / name).stat().st_size for name in names)


def test_full_disk_while_preparing_keeps_the_old_splits(repo: Path, tmp_path: Path) -> None:
    raw, prepared = stage_outputs(repo, "download"), stage_outputs(repo, "prepare")
    # Room for the inputs and the old splits, plus half of the new ones: validation_size 10000 writes as
    # many rows as 5000 (70,000 in all), so the new validation split fits and the new training split not.
    size = sizes(repo, ["params.yaml", "dvc.yaml", *raw, *prepared]) + sizes(repo, prepared) // 2
    with tmpfs(tmp_path / "disk", size) as root:
        copy_into(repo, root, ["params.yaml", "dvc.yaml", *raw])
        set_params(root, data__validation_size=5000)
        sh(sys.executable, "-m", "pipeline.prepare", cwd=root, env=outside_env(repo))
        assert fingerprint(root, prepared) == fingerprint(repo, prepared), "the old splits, made on the tmpfs"
        set_params(root, data__validation_size=10_000)
        before = snapshot(repo, root, [*raw, *prepared])
        done = run(sys.executable, "-m", "pipeline.prepare", cwd=root, env=outside_env(repo))
        line = error_line(done.stderr)
        assert "validation: 10000 images" in done.stderr, "the new validation split was written, then the disk was full"
        assert_failed_cleanly(
            repo, before, done.returncode, done.stderr, "no space left", "data/prepared/", "needs about"
        )
        assert " MB" in line, line
        assert not list((root / "data/prepared").glob(".*.tmp*"))


def test_full_disk_while_training_keeps_the_old_outputs(repo: Path, tmp_path: Path) -> None:
    outputs = [*stage_outputs(repo, "train"), *stage_outputs(repo, "evaluate"), "dvc.lock"]
    model = (repo / "models/model.keras").stat().st_size
    leave = min(300_000, model // 2)  # room for less than half a model
    size = sizes(repo, ["params.yaml", "dvc.yaml", *outputs]) + 4 * MB
    with tmpfs(tmp_path / "disk", size) as root:
        copy_into(repo, root, ["params.yaml", "dvc.yaml", *outputs])
        (root / "data").mkdir()
        (root / "data/prepared").symlink_to(repo / "data/prepared")
        with (root / "filler").open("wb") as filler:
            remaining = shutil.disk_usage(root).free - leave
            while remaining > 0:
                remaining -= filler.write(bytes(min(remaining, 1 << 20)))
        assert shutil.disk_usage(root).free < model // 2 + 8192
        before = snapshot(repo, root, outputs)
        # the store (SQLite and artifacts) is the clone's, outside the full disk
        done = run(
            sys.executable, "-m", "pipeline.train", cwd=root, env=outside_env(repo, MLFLOW_TRACKING_URI=store_uri(repo))
        )
        assert "epoch 2/" in done.stderr, "the disk must be full when the outputs are written, after training"
        new = assert_failed_cleanly(repo, before, done.returncode, done.stderr, "no space left", "models/model.keras")
        assert [r.info.status for r in new] == ["FAILED"]


# --- and after all of it ---------------------------------------------------------------------------


def test_killed_repro_recovers_on_the_next_run(repo: Path) -> None:
    set_params(repo, train__epochs=500)
    command = ["dvc", "repro"]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "start_new_session": True}
    with started(command, cwd=repo, env=ENV, **popen) as process:
        for line in process.stdout:
            if line.startswith("epoch 2/"):
                break
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
        process.communicate(timeout=120)
        assert process.returncode != 0
    assert not [r for r in all_runs(repo) if r.info.status == "RUNNING"]
    set_params(repo, **QUICK)
    sh("dvc", "repro", cwd=repo, env=ENV)
    assert "Running stage" not in sh("dvc", "repro", cwd=repo, env=ENV).stdout
    assert sh("dvc", "status", cwd=repo, env=ENV).stdout.strip().endswith("up to date.")


@contextmanager
def locked_store(repo: Path) -> Iterator[sqlite3.Connection]:
    """The clone's mlflow.db held under an exclusive SQLite lock, as another process writing to it would:
    nobody else can read or write it until the block ends."""
    holder = sqlite3.connect(repo / "mlflow.db", isolation_level=None, timeout=30)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        yield holder
    finally:
        holder.close()


def test_files_staged_by_a_stage_killed_while_logging_are_removed_by_the_next_run(repo: Path) -> None:
    """SIGKILL (nothing can clean up) while the stage records its run: its staged outputs stay on disk,
    held by no process; the next `dvc repro` removes them, and only them."""
    set_params(repo, train__seed=7)  # a training whose outputs differ from the committed ones
    outputs = stage_outputs(repo, "train")
    users_file = repo / "models" / ".model.keras.mine.tmp.keras"  # looks alike, but is not of our naming
    users_file.write_text("a user's notes\n")
    command = [sys.executable, "-m", "pipeline.train"]
    with started(command, cwd=repo, env=ENV, stderr=subprocess.PIPE) as process:
        # Staging the outputs needs no store, recording them does: a lock taken once the first staged file
        # appears lets the stage stage them all, then holds it at its next write to the store.
        wait_for(lambda: len(leftovers(repo, outputs)) > 1, "the first staged output", 300)
        with locked_store(repo):
            wait_for(lambda: len(leftovers(repo, outputs)) == len(outputs) + 1, "the staged outputs", 60)
            time.sleep(0.5)  # the last one is being written; the stage is then waiting for the store
            process.kill()
            process.wait(timeout=60)
        staged = [tmp for tmp in leftovers(repo, outputs) if tmp != users_file]
    assert len(staged) == len(outputs), staged
    killed = [r for r in all_runs(repo) if r.info.status == "RUNNING"]
    assert len(killed) == 1
    sh("dvc", "repro", cwd=repo, env=ENV)
    assert leftovers(repo, outputs) == [users_file]
    untracked = sh("git", "status", "--porcelain", "--untracked-files=all", cwd=repo).stdout.splitlines()
    assert [line for line in untracked if ".tmp" in line] == ["?? models/.model.keras.mine.tmp.keras"]
    assert client(repo).get_run(killed[0].info.run_id).info.status == "KILLED"
    users_file.unlink()


# --- the XLA compilation cache ------------------------------------------------------------------------


def test_damaged_xla_cache_entry_is_one_line_that_says_how_to_clear_it(repo: Path) -> None:
    """The trainings before left their compiled epochs in .cache/xla/; cut them short, as a disk error
    might: one line naming the folder, nothing touched; once it is deleted as told, the next run
    compiles afresh."""
    entries = list((repo / ".cache" / "xla").glob("*/*.pb"))
    assert entries
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:5000])
    before = snapshot(repo)
    done = run(sys.executable, "-m", "pipeline.train", cwd=repo)
    new = assert_failed_cleanly(
        repo, before, done.returncode, done.stderr, f"XLA compilation cache {entries[0].parent}", "delete that folder"
    )
    assert [r.info.status for r in new] == ["FAILED"]
    shutil.rmtree(entries[0].parent)
    sh(sys.executable, "-m", "pipeline.train", cwd=repo, env=ENV)
    assert len(list(entries[0].parent.glob("*.pb"))) == 1
