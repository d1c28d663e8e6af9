"""`mnist-tune`: the search space and its checks, sampling, and real studies (no mocks).

Unit tests check every way a search space or `--set` can be wrong (one sentence naming the file, the key,
the value and what is allowed) and that a small study in memory samples only parameters that params.yaml's
schema accepts. The end-to-end tests run two workers of one study at the same time against a real
`mlflow server` and a shared SQLite Optuna storage, resume the study with a third, train the printed
best trial as a DVC experiment, and interrupt a worker with Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from helpers import wait_for
from workspace import REPO, clone, sh, venv_env

from pipeline.config import SEARCH_SPACE_FILE, Params, load_params
from pipeline.errors import ConfigError, ResourceError, UsageError
from pipeline.fit import EpochResult
from pipeline.tune.apart import fit_apart
from pipeline.tune.command import INTERRUPTED, parse_args
from pipeline.tune.space import SearchSpace, differences, parse_set, read_space, trial_params
from pipeline.tune.storage import GRACE_BEATS
from pipeline.tune.study import make_sampler

BASE = load_params(REPO / "params.yaml")


def space_file(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def space_error(tmp_path: Path, document: object, pinned: dict | None = None) -> str:
    with pytest.raises(ConfigError) as error:
        read_space(space_file(tmp_path, document), BASE, pinned or {})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "space.yaml"))
    return message


# --- the search space -------------------------------------------------------------------------------


def test_the_committed_space_is_valid() -> None:
    space = read_space(REPO / SEARCH_SPACE_FILE, BASE, {})
    assert "train.learning_rate" in space.distributions
    assert space.fixed["train.optimizer"] == "adamw"


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"space": {"train.learning_rat": {"low": 0.001, "high": 0.1}}}, "did you mean 'train.learning_rate'?"),
        ({"space": {"train.dropout": {"low": 0.0, "high": 0.3}}}, "did you mean 'model.dropout'?"),
        ({"fixed": {"train.epoch": 3}, "space": {"model.dropout": {"low": 0.0, "high": 0.3}}}, "'train.epochs'"),
        ({"spaces": {}}, "unknown section 'spaces'; did you mean 'space'?"),
        ({"space": {"train.epochs": {"low": 5, "hihg": 10}}}, "unknown field 'hihg'; did you mean 'high'?"),
    ],
    ids=["key", "section", "fixed-key", "top-level", "field"],
)
def test_unknown_names_are_suggested(tmp_path: Path, document: dict, expected: str) -> None:
    assert expected in space_error(tmp_path, document)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"low": 0.01, "high": 0.001}, "low = 0.01 must be below high = 0.001"),
        ({"low": 0.01, "high": 0.01}, "low = 0.01 must be below high = 0.01"),
        ({"low": 0.0, "high": 0.1, "log": True}, "low = 0.0 is not allowed with log: true; a log scale needs low > 0"),
        ({"low": 0.001, "high": 100.5}, "high 100.5 is not allowed: input should be less than or equal to 100"),
        ({"low": "0.001", "high": 0.1}, "low = '0.001' is not allowed: it must be a number"),
        ({"choices": []}, "choices = [] must be a non-empty list"),
        ({"choices": [0.01, 0.01]}, "lists a value twice"),
        ({"choices": [0.1, -1]}, "choice -1 is not allowed: input should be greater than 0"),
        ({"choices": [0.1], "low": 0.1}, "choices cannot be combined with low"),
        ({"low": 0.001, "high": 0.1, "log": True, "step": 0.001}, "cannot be combined with log: true"),
        (0.01, "is not a distribution"),
    ],
    ids=[
        "low>high",
        "low=high",
        "log<=0",
        "outside-schema",
        "string",
        "empty",
        "twice",
        "bad-choice",
        "mixed",
        "log+step",
        "scalar",
    ],
)
def test_bad_distributions_are_one_sentence(tmp_path: Path, spec: object, expected: str) -> None:
    message = space_error(tmp_path, {"space": {"train.learning_rate": spec}})
    assert "space train.learning_rate" in message
    assert expected in message


def test_choices_are_checked_against_the_schema_with_the_fixed_values(tmp_path: Path) -> None:
    message = space_error(tmp_path, {"space": {"train.optimizer": {"choices": ["adam", "adamx"]}}})
    assert "choice 'adamx' is not allowed: input should be 'sgd', 'adam', 'adamw' or 'rmsprop'" in message
    # a rule across keys: warm-up epochs need the cosine schedule, which params.yaml does not set
    message = space_error(tmp_path, {"space": {"train.warmup_epochs": {"choices": [0, 2]}}})
    assert "choice 2 breaks a rule of params.yaml: train.warmup_epochs applies to train.schedule: cosine" in message
    # ... and fixed values count: with cosine fixed, the same choices are fine
    fixed = {"train.schedule": "cosine"}
    read_space(space_file(tmp_path, {"space": {"train.warmup_epochs": {"choices": [0, 2]}}, "fixed": fixed}), BASE, {})


def test_integer_bounds_of_an_integer_key_sample_integers(tmp_path: Path) -> None:
    space = read_space(space_file(tmp_path, {"space": {"train.epochs": {"low": 2, "high": 10, "step": 2}}}), BASE, {})
    assert isinstance(space.distributions["train.epochs"], optuna.distributions.IntDistribution)
    space = read_space(space_file(tmp_path, {"space": {"model.dropout": {"low": 0, "high": 0.5}}}), BASE, {})
    assert isinstance(space.distributions["model.dropout"], optuna.distributions.FloatDistribution)
    message = space_error(tmp_path, {"space": {"train.epochs": {"low": 2, "high": 9, "step": 2}}})
    assert "high - low = 7 is not a multiple of step = 2" in message


def test_data_and_download_keys_cannot_be_tuned(tmp_path: Path) -> None:
    message = space_error(tmp_path, {"space": {"data.validation_size": {"low": 1000, "high": 5000}}})
    assert "cannot vary per trial" in message and "dvc repro prepare" in message


def test_a_key_cannot_be_both_searched_and_fixed(tmp_path: Path) -> None:
    document = {"space": {"model.dropout": {"low": 0.0, "high": 0.3}}, "fixed": {"model.dropout": 0.1}}
    assert "model.dropout is both in space: and in fixed:" in space_error(tmp_path, document)


def test_set_values_are_yaml_and_checked() -> None:
    assert parse_set(["train.epochs=2", "model.hidden_units=[64,32]", "train.optimizer=adam"], BASE) == {
        "train.epochs": 2,
        "model.hidden_units": [64, 32],
        "train.optimizer": "adam",
    }
    with pytest.raises(ConfigError, match=r"^--set: unknown key 'train.epoch'; did you mean 'train.epochs'\?$"):
        parse_set(["train.epoch=2"], BASE)
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        parse_set(["train.epochs"], BASE)
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_set(["model.hidden_units=[64,"], BASE)
    # the value is checked against the schema, over the space's fixed values
    with pytest.raises(ConfigError, match=r"^--set: train.epochs = 0 is not allowed: input should be greater than"):
        read_space(REPO / SEARCH_SPACE_FILE, BASE, parse_set(["train.epochs=0"], BASE))
    with pytest.raises(ConfigError, match=r"^--set: train.warmup_epochs = 1 leaves no epoch to decay in"):
        read_space(REPO / SEARCH_SPACE_FILE, BASE, parse_set(["train.epochs=1"], BASE))


def test_a_rule_across_keys_names_where_each_value_came_from(tmp_path: Path) -> None:
    """The space file's fixed: holds train.warmup_epochs = 1; --set train.epochs=1 clashes with it."""
    space = REPO / SEARCH_SPACE_FILE
    with pytest.raises(ConfigError) as caught:
        read_space(space, BASE, parse_set(["train.epochs=1"], BASE))
    assert str(caught.value) == (
        "--set: train.warmup_epochs = 1 leaves no epoch to decay in; use fewer than train.epochs = 1 "
        f"(train.warmup_epochs = 1 is from fixed: in {space}, train.epochs = 1 from --set): pin "
        f"train.warmup_epochs with --set as well, or change it in fixed: in {space}."
    )
    with pytest.raises(ConfigError) as caught:
        read_space(space, BASE, parse_set(["train.schedule=constant"], BASE))
    assert "(train.warmup_epochs = 1 is from fixed: in " in str(caught.value)
    assert "train.schedule = constant from --set): pin train.warmup_epochs with --set as well" in str(caught.value)
    # the space file's fixed: against params.yaml
    searched = {"train.learning_rate": {"low": 0.001, "high": 0.1}}
    message = space_error(tmp_path, {"space": searched, "fixed": {"train.nesterov": True}})
    assert "(train.nesterov = true is from fixed: in " in message
    assert "train.optimizer = sgd from params.yaml" in message
    assert message.endswith("hold train.optimizer in fixed: as well, or change it in params.yaml.")
    # one place only: the schema's sentence as it is
    assert " from " not in space_error(tmp_path, {"space": searched, "fixed": {"train.epochs": 0}})


def test_set_pins_a_key_over_the_space_and_the_fixed_values() -> None:
    pinned = parse_set(["train.learning_rate=0.002", "train.epochs=3"], BASE)
    space = read_space(REPO / SEARCH_SPACE_FILE, BASE, pinned)
    assert "train.learning_rate" not in space.distributions
    assert space.fixed["train.learning_rate"] == 0.002 and space.fixed["train.epochs"] == 3


def test_command_line_errors_are_one_sentence() -> None:
    with pytest.raises(UsageError, match="--study 'a b' is not allowed"):
        parse_args(["--study", "a b", "--trials", "1"])
    with pytest.raises(UsageError, match="expected a positive whole number"):
        parse_args(["--study", "s", "--trials", "0"])
    with pytest.raises(UsageError, match="required: --trials"):
        parse_args(["--study", "s"])


# --- sampling ---------------------------------------------------------------------------------------


def sample(space: SearchSpace, trials: int, seed: int = 0, name: str = "study") -> list[optuna.trial.FrozenTrial]:
    """A real study in memory whose objective builds each trial's params.yaml as mnist-tune does."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name=name, direction="maximize", sampler=make_sampler(seed))

    def objective(trial: optuna.Trial) -> float:
        params = trial_params(BASE, space, trial)  # raises if the schema refuses the combination
        trial.set_user_attr("params", params.flat())
        return float(sum(params.model.hidden_units)) + params.train.learning_rate

    study.optimize(objective, n_trials=trials)
    return study.trials


def test_a_small_study_samples_only_legal_parameters(tmp_path: Path) -> None:
    document = yaml.safe_load((REPO / SEARCH_SPACE_FILE).read_text())
    document["space"]["model.hidden_units"] = {"choices": [[64, 32], [128]]}  # list choices too
    space = read_space(space_file(tmp_path, document), BASE, parse_set(["train.epochs=4"], BASE))
    trials = sample(space, 25)  # more than TPE's 10 random start-up trials
    assert all(t.state.name == "COMPLETE" for t in trials)
    for trial in trials:
        flat = trial.user_attrs["params"]
        for key, distribution in space.distributions.items():
            value = flat[key]
            if isinstance(distribution, optuna.distributions.CategoricalDistribution):
                assert value in ([[64, 32], [128]] if key == "model.hidden_units" else distribution.choices)
            else:
                assert distribution.low <= value <= distribution.high
        assert flat["train.optimizer"] == "adamw" and flat["train.epochs"] == 4  # fixed, then --set
        assert flat["train.seed"] == BASE.train.seed  # not searched: params.yaml's
    assert len({t.user_attrs["params"]["model.hidden_units"][0] for t in trials}) == 2


def test_trials_draw_from_the_seed_and_their_number() -> None:
    space = read_space(REPO / SEARCH_SPACE_FILE, BASE, {})
    first, again, other_seed = (sample(space, 3, seed) for seed in (0, 0, 1))
    assert [t.params for t in first] == [t.params for t in again]  # reproducible
    assert [t.params for t in first] != [t.params for t in other_seed]
    assert [t.params for t in first] != [t.params for t in sample(space, 3, 0, "another-study")]
    assert first[0].params != first[1].params  # two workers starting at once get distinct trial numbers


def test_a_resumed_study_may_change_ranges_but_not_choices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.tune.study import DEFINITION_ATTR, _check_definition

    study = optuna.create_study(study_name="defined", direction="maximize")
    study.set_user_attr(DEFINITION_ATTR, read_space(REPO / SEARCH_SPACE_FILE, BASE, {}).definition())
    _check_definition(study, read_space(REPO / SEARCH_SPACE_FILE, BASE, {}))
    assert not caplog.records
    document = yaml.safe_load((REPO / SEARCH_SPACE_FILE).read_text())
    document["space"]["train.label_smoothing"]["high"] = 0.3
    _check_definition(study, read_space(space_file(tmp_path, document), BASE, parse_set(["train.epochs=5"], BASE)))
    assert "(train.epochs, train.label_smoothing differ)" in caplog.text
    document["space"]["train.batch_size"]["choices"] = [64, 256]
    with pytest.raises(ConfigError, match=r"searched train.batch_size as one of \[128, 256\], not one of \[64, 256\]"):
        _check_definition(study, read_space(space_file(tmp_path, document), BASE, {}))


def test_a_study_whose_parent_run_was_refused_is_not_left_waiting(store: str, tmp_path: Path) -> None:
    """The first worker cannot create the study's MLflow parent run (here: a real store refusing an
    experiment it does not hold; a user who may only read gets a 403 at the same step): the study goes
    with it, so the next worker creates both at once instead of waiting for a parent run."""
    from pipeline import tracking
    from pipeline.errors import TrackingError
    from pipeline.tune.study import PARENT_WAIT_SECONDS, open_study

    space, url = read_space(REPO / SEARCH_SPACE_FILE, BASE, {}), f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(TrackingError):
        open_study("refused", url, space, BASE, 0, "999999", {})
    assert "refused" not in [s.study_name for s in optuna.study.get_all_study_summaries(storage=url)]
    started = time.monotonic()
    shared = open_study("refused", url, space, BASE, 0, tracking.connect(), {})
    assert time.monotonic() - started < PARENT_WAIT_SECONDS / 4
    assert tracking.run_status(shared.parent_run_id) == "RUNNING"


def test_differences_are_what_params_yaml_lacks() -> None:
    flat = BASE.flat() | {"train.learning_rate": 0.003, "model.hidden_units": [64, 32]}
    assert differences(BASE, flat) == {"model.hidden_units": [64, 32], "train.learning_rate": 0.003}


# --- end to end: workers, a tracking server, a shared storage --------------------------------------

STUDY = "s"
QUICK_SET = ["--set", "train.epochs=2", "--set", "model.hidden_units=[64,32]"]


@pytest.fixture(scope="module")
def tune_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real `mlflow server` on 127.0.0.1 and a shared SQLite Optuna storage, as the workers' environment."""
    from test_server import mlflow_server

    root = tmp_path_factory.mktemp("tune-server")
    env = venv_env()
    with mlflow_server(root, env) as url:
        # system metrics sampled every 0.2 s instead of 1 s: a quick trial here trains for about a second
        yield env | {
            "MLFLOW_TRACKING_URI": url,
            "OPTUNA_STORAGE": f"sqlite:///{root}/optuna.db",
            "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2",
        }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tune_env: dict[str, str]) -> Path:
    """A clone with the prepared data (the real `dvc repro prepare`), and nothing trained."""
    root = clone(tmp_path_factory.mktemp("tune") / "repo")
    sh("dvc", "repro", "prepare", cwd=root, env=tune_env, timeout=300)
    return root


def tune(workspace: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "pipeline.tune", *args]
    return subprocess.Popen(command, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str], timeout: float = 600) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"exited {process.returncode}\n{stdout}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    return stdout, stderr


def study_runs(env: dict[str, str], study: str) -> tuple[list, list]:
    """The parent runs and the child runs of `study` on the server."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("mnist-batchnorm")
    if experiment is None:  # no worker has connected yet
        return [], []
    runs = client.search_runs([experiment.experiment_id], f"tags.`optuna.study` = '{study}'", max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, sorted(children, key=lambda r: int(r.data.tags["optuna.trial_number"]))


@pytest.fixture(scope="module")
def two_workers(workspace: Path, tune_env: dict[str, str]) -> tuple[list[str], list[str], float]:
    """Two workers of one study started together, two trials each: stdouts, stderrs, seconds."""
    tracked_before = sh("git", "status", "--porcelain", "--untracked-files=no", cwd=workspace).stdout
    started = time.monotonic()
    processes = [tune(workspace, tune_env, "--study", STUDY, "--trials", "2", *QUICK_SET) for _ in range(2)]
    outputs = [finish(process) for process in processes]
    seconds = time.monotonic() - started
    # trials write no pipeline output
    assert sh("git", "status", "--porcelain", "--untracked-files=no", cwd=workspace).stdout == tracked_before
    assert not (workspace / "models/model.keras").exists()
    return [out for out, _ in outputs], [err for _, err in outputs], seconds


@pytest.mark.e2e
def test_two_workers_share_one_study(two_workers: tuple, tune_env: dict[str, str]) -> None:
    from mlflow import MlflowClient

    stdouts, stderrs, seconds = two_workers
    print(f"two workers, 2 trials each: {seconds:.0f} s")
    parents, children = study_runs(tune_env, STUDY)
    assert [p.info.run_name for p in parents] == [STUDY]
    assert parents[0].info.status == "FINISHED"
    assert [c.info.run_name for c in children] == [f"{STUDY}/trial-{n}" for n in range(4)]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    client = MlflowClient(tracking_uri=tune_env["MLFLOW_TRACKING_URI"])
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["optuna.state"] == "COMPLETE"
        history = client.get_metric_history(child.info.run_id, "epoch/val_accuracy")
        assert [m.step for m in history] == [1, 2]
        assert child.data.metrics["val_accuracy"] == history[-1].value  # the final figure, once
        assert yaml.safe_load(child.data.params["train.epochs"]) == 2
        assert yaml.safe_load(child.data.params["model.hidden_units"]) == [64, 32]
        assert child.data.params["train.optimizer"] == "adamw"  # the space's fixed value
        assert "train_seconds" in child.data.metrics
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(child.data.metrics)
    assert client.search_model_versions() == []  # trials register nothing

    study = optuna.load_study(study_name=STUDY, storage=tune_env["OPTUNA_STORAGE"])
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    for stdout, stderr in zip(stdouts, stderrs, strict=True):
        assert f"dvc exp run -n {STUDY}-trial-" in stdout
        assert stderr.count("trial ") >= 2  # one line per trial of this worker (stderr is not a terminal)


@pytest.mark.e2e
def test_a_third_worker_resumes_the_study(
    two_workers: tuple, workspace: Path, tune_env: dict[str, str], tmp_path: Path
) -> None:
    """Joining the finished study re-opens its parent run while it works (held at its exit here)."""
    assert [p.info.status for p in study_runs(tune_env, STUDY)[0]] == ["FINISHED"]
    hold = tmp_path / "hold"
    third = held_at_exit(workspace, tune_env, hold, "--study", STUDY, "--trials", "1", *QUICK_SET)
    wait_for_file(hold.with_suffix(".reached"), third)
    assert [p.info.status for p in study_runs(tune_env, STUDY)[0]] == ["RUNNING"]
    hold.with_suffix(".go").touch()
    stdout, _ = finish(third)
    parents, children = study_runs(tune_env, STUDY)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert [c.info.run_name for c in children] == [f"{STUDY}/trial-{n}" for n in range(5)]
    assert children[4].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert f"best trial of study {STUDY} (5 trials: 5 complete)" in stdout


@pytest.mark.e2e
def test_the_printed_command_trains_the_best_trial(
    two_workers: tuple, workspace: Path, tune_env: dict[str, str]
) -> None:
    import json

    study = optuna.load_study(study_name=STUDY, storage=tune_env["OPTUNA_STORAGE"])
    line = next(line for line in two_workers[0][0].splitlines() if "dvc exp run" in line)
    command = shlex.split(line)
    number = int(command[command.index("-n") + 1].rsplit("-", 1)[1])
    sh(*command, cwd=workspace, env=tune_env, timeout=600)
    trained = json.loads((workspace / "metrics/train.json").read_text())
    assert trained["val_accuracy"] == pytest.approx(study.trials[number].value, abs=1e-6)  # deterministic


@pytest.mark.e2e
def test_ctrl_c_fails_the_trial_and_closes_its_run(workspace: Path, tune_env: dict[str, str]) -> None:
    study = f"{STUDY}-interrupted"
    args = ["--study", study, "--trials", "1", "--set", "train.epochs=200", "--set", "model.hidden_units=[64,32]"]
    process = tune(workspace, tune_env, *args)
    try:
        wait_for_first_epoch(tune_env, study, process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
    assert "Traceback" not in stderr
    parents, children = study_runs(tune_env, study)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert [c.info.status for c in children] == ["FAILED"]
    assert children[0].data.tags["optuna.fail_reason"] == "INTERRUPTED"
    trials = optuna.load_study(study_name=study, storage=tune_env["OPTUNA_STORAGE"]).trials
    assert [t.state.name for t in trials] == ["FAIL"]


@pytest.mark.e2e
def test_ctrl_c_at_the_terminal_is_one_line_for_the_search(workspace: Path, tune_env: dict[str, str]) -> None:
    """SIGINT to the whole process group, as Ctrl-C sends it, while the stderr filter's process runs
    (a trial's training process starts it around TensorFlow's import and each first epoch): one line that says what a
    search leaves, no traceback from the worker or the filter."""
    command = [sys.executable, "-m", "pipeline.tune", "--study", f"{STUDY}-ctrl-c", "--trials", "1", *QUICK_SET]
    process = subprocess.Popen(
        command,
        cwd=workspace,
        env=tune_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        worker = psutil.Process(process.pid)

        def filtering() -> bool:
            with contextlib.suppress(psutil.Error):  # a child that ended while it was looked at
                return any(
                    "pass_through" in " ".join(child.cmdline()) and time.time() - child.create_time() > 1.0
                    for child in worker.children(recursive=True)
                )  # a filter past its start-up, reading lines
            return False

        wait_for(filtering, "the stderr filter's process", 120, process=process, every=0.05)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == f"error: interrupted (Ctrl-C); {INTERRUPTED}."
    assert "outputs written before" not in stderr


@pytest.mark.e2e
def test_a_worker_runs_trial_after_trial_in_flat_memory(workspace: Path, tune_env: dict[str, str]) -> None:
    """One worker, 10 one-epoch trials of a [32] network, the resident memory of the worker and its
    children sampled from outside: each trial trains in a process of its own that ends with the trial, so
    the peak per trial does not grow (it grew by ~200 MiB per trial when TensorFlow held every trial's
    data, by ~27 when it kept only each trial's compiled programs; benchmarks/tune_memory.py runs longer)."""
    tiny = ["--set", "model.hidden_units=[32]", "--set", "train.epochs=1", "--set", "train.warmup_epochs=0"]
    process = tune(workspace, tune_env, "--study", f"{STUDY}-memory", "--trials", "10", *tiny)
    worker, peaks, trainer_pids = psutil.Process(process.pid), [0.0], set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                children = worker.children(recursive=True)
                # direct children only: a trainer's own child (its stderr filter) carries the trainer's command
                # line for a moment between fork and exec
                trainer_pids.update(trainer.pid for trainer in trainers(worker))
                total = worker.memory_info().rss + sum(c.memory_info().rss for c in children)
                peaks[-1] = max(peaks[-1], total / 2**20)

    threading.Thread(target=sample, daemon=True).start()
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if re.match(r"trial \d+: ", line):
                peaks.append(0.0)
        assert process.wait(timeout=600) == 0
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
    peaks = peaks[:-1]
    assert len(peaks) == 10 and len(trainer_pids) == 10  # a training process per trial
    per_trial = (sum(peaks[7:10]) - sum(peaks[1:4])) / 3 / 6
    print(f"peak RSS (MiB) of the worker and its children per trial: {[round(p) for p in peaks]}; {per_trial:.1f}")
    assert per_trial < 15, peaks


def wait_for_first_epoch(env: dict[str, str], study: str, process: subprocess.Popen[str]) -> None:
    """Until the study's first trial has logged an epoch: training is under way."""

    def logged() -> bool:
        _, children = study_runs(env, study)
        return bool(children) and "epoch/val_accuracy" in children[0].data.metrics

    wait_for(logged, f"an epoch of study {study}", 300, process=process, every=1)


@pytest.mark.e2e
def test_the_trial_of_a_killed_worker_is_failed_by_the_next(workspace: Path, tune_env: dict[str, str]) -> None:
    study = f"{STUDY}-killed"
    # a 1 s heartbeat, so a trial is stale after 4 s instead of 120 s
    args = ["--study", study, "--trials", "1", "--heartbeat", "1", "--set", "model.hidden_units=[64,32]"]
    command = [sys.executable, "-m", "pipeline.tune", *args]
    killed = subprocess.Popen(
        [*command, "--set", "train.epochs=200"], cwd=workspace, env=tune_env, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_first_epoch(tune_env, study, killed)
        killed.kill()  # SIGKILL: no cleanup at all, its trial and runs stay RUNNING
        killed.wait(timeout=60)
    finally:
        if killed.poll() is None:
            killed.kill()
    _, children = study_runs(tune_env, study)
    assert [c.info.status for c in children] == ["RUNNING"]
    time.sleep(1 + GRACE_BEATS)  # past the grace period
    done = subprocess.run(
        [*command, "--set", "train.epochs=2"], cwd=workspace, env=tune_env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert f"note: study {study} started with another search space or fixed values (train.epochs differ)" in done.stderr
    parents, children = study_runs(tune_env, study)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert [c.info.status for c in children] == ["FAILED", "FINISHED"]
    assert "stopped sending heartbeats" in children[0].data.tags["optuna.fail_reason"]
    trials = optuna.load_study(study_name=study, storage=tune_env["OPTUNA_STORAGE"]).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]


# The real command, held at its exit point (before it records that it leaves) until HOLD.go exists.
HELD_AT_EXIT = """
import os, pathlib, time
from pipeline.tune import command, workers
hold, leave = pathlib.Path(os.environ["HOLD"]), workers.Workers.leave
def held(self):
    hold.with_suffix(".reached").touch()
    while not hold.with_suffix(".go").exists():
        time.sleep(0.1)
    return leave(self)
workers.Workers.leave = held
command.run()
"""


def held_at_exit(workspace: Path, env: dict[str, str], hold: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", HELD_AT_EXIT, *args]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(command, cwd=workspace, env=env | {"HOLD": str(hold)}, **popen)  # type: ignore[call-overload]


def wait_for_file(path: Path, process: subprocess.Popen[str]) -> None:
    wait_for(path.exists, str(path), 600, process=process, every=0.2)


def tune_in(folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`mnist-tune --study s --trials 1` run in `folder` with this repository's code."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.tune", "--study", "s", "--trials", "1", *extra],
        cwd=folder,
        env=venv_env() | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_data_is_one_line(tmp_path: Path) -> None:
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "recipes").mkdir()
    shutil.copy2(REPO / SEARCH_SPACE_FILE, tmp_path / SEARCH_SPACE_FILE)
    done = tune_in(tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: data/prepared/train.npz is missing; run `dvc repro prepare` to create it."
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_mnist_tune_names_where_clashing_values_came_from(tmp_path: Path) -> None:
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "recipes").mkdir()
    shutil.copy2(REPO / SEARCH_SPACE_FILE, tmp_path / SEARCH_SPACE_FILE)
    done = tune_in(tmp_path, "--set", "train.epochs=1")
    assert done.returncode == 1
    assert done.stderr.startswith("error: --set: train.warmup_epochs = 1 leaves no epoch to decay in")
    assert done.stderr.endswith(
        "(train.warmup_epochs = 1 is from fixed: in recipes/search_space.yaml, train.epochs = 1 from --set): pin "
        "train.warmup_epochs with --set as well, or change it in fixed: in recipes/search_space.yaml.\n"
    )


def test_a_bad_space_file_is_one_line(tmp_path: Path) -> None:
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    space_file(tmp_path, {"space": {"train.learning_rat": {"low": 0.001, "high": 0.1}}})
    done = tune_in(tmp_path, "--space", "space.yaml")
    assert done.returncode == 1
    assert (
        done.stderr
        == "error: space.yaml: unknown key 'train.learning_rat' in space; did you mean 'train.learning_rate'?\n"
    )


# --- a trial's training process (pipeline/tune/apart.py) ------------------------------------------------


def quick_params(epochs: int) -> Params:
    """params.yaml's values with a [32] network for `epochs` epochs."""
    return BASE.model_copy(
        update={
            "model": BASE.model.model_copy(update={"hidden_units": [32]}),
            "train": BASE.train.model_copy(update={"epochs": epochs, "warmup_epochs": 0}),
        }
    )


def is_trainer(process: psutil.Process) -> bool:
    """Whether `process` is a trial's training process (`python -m pipeline.tune.apart`); False for one
    that ended while we looked."""
    try:
        return "pipeline.tune.apart" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def trainers(worker: psutil.Process | None = None) -> list[psutil.Process]:
    """The training processes of `worker` (default: this process)."""
    return [p for p in (worker or psutil.Process()).children() if is_trainer(p)]


@pytest.mark.e2e
def test_a_trial_trains_apart_to_the_figures_of_the_same_training_here(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import io, runtime
    from pipeline.config import prepared_file
    from pipeline.fit import fit

    monkeypatch.chdir(workspace)
    seen: list[EpochResult] = []
    history, seconds = fit_apart(quick_params(2), seen.append)
    assert seen == history and [r.epoch for r in history] == [1, 2] and seconds > 0
    assert not trainers(), "the training process ends with the trial"
    runtime.import_tensorflow(workspace)
    train, validation = (io.load_split(prepared_file(split)) for split in ("train", "validation"))
    here = fit(quick_params(2).model, quick_params(2).train, train, validation)
    assert history == here.history  # bit for bit: the same seeds, the same program


@pytest.mark.e2e
def test_a_training_process_killed_outright_fails_the_trial_in_one_line(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace)

    def kill(result: EpochResult) -> None:
        for trainer in trainers():
            trainer.kill()  # as the out-of-memory killer does

    with pytest.raises(ResourceError, match="killed \\(SIGKILL: the system's out-of-memory killer"):
        fit_apart(quick_params(50), kill)


@pytest.mark.e2e
def test_the_training_process_ends_when_its_worker_is_killed(workspace: Path) -> None:
    script = (
        "import sys; from pipeline.config import load_params; from pipeline.tune.apart import fit_apart; "
        "p = load_params(); p = p.model_copy(update={'train': p.train.model_copy(update={'epochs': 500})}); "
        "fit_apart(p, lambda r: print('epoch', r.epoch, flush=True))"
    )
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=workspace, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().startswith("epoch 1")
        (trainer,) = trainers(psutil.Process(worker.pid))
        worker.kill()
        worker.wait(timeout=60)
        wait_for(lambda: not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE, "the trainer's end", 30)
    finally:
        worker.kill()
