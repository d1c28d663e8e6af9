"""Command `mnist-tune --study NAME --trials N`: search hyper-parameters with Optuna, every trial in MLflow.

The search space (`recipes/search_space.yaml`) names the params.yaml keys a study varies and the values
it holds fixed; `--set` pins a key. Everything is checked against params.yaml's schema before any trial.
Workers (processes, on one machine or many) share a study through Optuna's RDBStorage (`--storage`,
`OPTUNA_STORAGE`, else `optuna.db` at the repository root): unique trial numbers, resumable studies, and
the trials of a dead worker failed by the next one through heartbeats. MLflow gets one parent run per
study and a child run `STUDY/trial-N` per trial (params, per-epoch curves, state); trials register no
model and write no pipeline outputs. The objective is the last epoch's validation accuracy; the test
set is never read. Trial n samples from a seed made of `--seed`, the study and n, so workers never draw
the same values and a one-worker study reproduces. README "Search: mnist-tune" says why this storage.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import math
import os
import re
import shlex
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from pipeline import io, quiet, recipe, runtime, tracking
from pipeline.config import PARAMS_FILE, SEARCH_SPACE_FILE, Params, load_params, prepared_file, read_yaml
from pipeline.errors import (
    ConfigError,
    DataError,
    DivergedError,
    PipelineError,
    ResourceError,
    Terminated,
    TrackingError,
    run_stage,
)

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial

    from pipeline.fit import EpochResult

log = logging.getLogger("pipeline.tune")

SET_SOURCE = Path("--set")  # how errors in --set values name their source
TUNABLE_SECTIONS = ("model", "train")  # data.* and download.* shape the prepared data, not a trial
DISTRIBUTION_KEYS = ("low", "high", "log", "step", "choices")
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PARENT_ATTR = "mlflow_parent_run_id"
DEFINITION_ATTR = "definition"
PARENT_WAIT_SECONDS = 120.0
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
PRUNER_STARTUP_TRIALS = 5
STORAGE_ATTEMPTS = 5
# Trial-level failures: recorded as FAIL, the study goes on. Anything else (the store failing) stops it.
TRIAL_ERRORS: tuple[type[Exception], ...] = (DivergedError, ConfigError, ResourceError, DataError)


class UsageError(PipelineError):
    """The command line is wrong."""


# --- the search space -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """What a study varies (`distributions`) and holds (`fixed`: the file's fixed values and `--set`)."""

    distributions: dict[str, BaseDistribution]
    fixed: dict[str, Any]
    encoded: frozenset[str]  # keys whose choices are lists, held by Optuna as their JSON text

    def definition(self) -> dict[str, Any]:
        """A JSON-able description, kept with the study to notice when it resumes with another one."""
        from optuna.distributions import distribution_to_json

        return {
            "space": {key: json.loads(distribution_to_json(d)) for key, d in self.distributions.items()},
            "fixed": self.fixed,
        }

    def describe(self, key: str) -> str:
        """`float in [0.0005, 0.01], log` / `one of [128, 256]`: for the parent run's parameters."""
        return describe(self.distributions[key])


def describe(d: BaseDistribution) -> str:
    """A distribution in words; list choices (held as JSON text) shown as the lists they are."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(d, CategoricalDistribution):
        return f"one of {[_decoded(choice) for choice in d.choices]}"
    assert isinstance(d, (FloatDistribution, IntDistribution))
    kind = "float" if isinstance(d, FloatDistribution) else "int"
    extras = (", log" if d.log else "") + (f", step {d.step}" if d.step not in (None, 1) else "")
    return f"{kind} in [{d.low}, {d.high}]{extras}"


def _decoded(choice: Any) -> Any:
    if isinstance(choice, str) and choice.startswith(("[", "{")):
        with contextlib.suppress(ValueError):
            return json.loads(choice)
    return choice


def _flat_keys(base: Params) -> list[str]:
    return list(base.flat())


def _check_key(key: Any, base: Params, file: Path, where: str) -> str:
    """A `section.key` of params.yaml that a trial may vary; else one sentence with a suggestion."""
    known = _flat_keys(base)
    place = f" in {where}" if where else ""
    if not isinstance(key, str) or key not in known:
        leaf = str(key).rpartition(".")[2]  # train.dropout -> model.dropout: the name is right, the section not
        close = [k for k in known if k.rpartition(".")[2] == leaf] or difflib.get_close_matches(str(key), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "keys are params.yaml's, written section.key (train.epochs)."
        raise ConfigError(f"{file}: unknown key '{key}'{place}; {hint}")
    if key.partition(".")[0] not in TUNABLE_SECTIONS:
        allowed = " and ".join(f"{section}.*" for section in TUNABLE_SECTIONS)
        raise ConfigError(
            f"{file}: {key}{place} cannot vary per trial: trials train on the data that `dvc repro prepare` made; "
            f"only {allowed} keys can."
        )
    return key


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _schema_is_float(key: str) -> bool:
    section, _, name = key.partition(".")
    section_model = Params.model_fields[section].annotation
    return section_model.model_fields[name].annotation is float  # type: ignore[union-attr]


def _check_value(context: Params, key: str, role: str, value: Any, file: Path) -> None:
    """`value` as `key` over `context` must pass params.yaml's schema; the error names the role."""
    try:
        recipe.apply(context, {key: value}, file)
    except ConfigError as error:
        text = str(error).removeprefix(f"{file}: ")
        plain = f"{key} = {value!r} is not allowed: "
        if text.startswith(plain):
            raise ConfigError(f"{file}: space {key}: {role} {value!r} is not allowed: {text[len(plain) :]}") from None
        raise ConfigError(f"{file}: space {key}: {role} {value!r} breaks a rule of params.yaml: {text}") from None


def _distribution(key: str, spec: Any, context: Params, file: Path) -> tuple[BaseDistribution, bool]:
    """The Optuna distribution of one entry of `space:`, checked; and whether its choices are encoded."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"{file}: space {key}"
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(
            f"{where} = {spec!r} is not a distribution; write {{low: L, high: H}} (log: true, step: S optional) "
            "or {choices: [A, B, ...]}."
        )
    for name in spec:
        if name not in DISTRIBUTION_KEYS:
            close = difflib.get_close_matches(str(name), DISTRIBUTION_KEYS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(DISTRIBUTION_KEYS)}."
            raise ConfigError(f"{where}: unknown field '{name}'; {hint}")
    if "choices" in spec:
        if extra := [name for name in spec if name != "choices"]:
            raise ConfigError(f"{where}: choices cannot be combined with {', '.join(extra)}; use one or the other.")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices = {choices!r} must be a non-empty list of values, e.g. [128, 256].")
        if len({json.dumps(c, sort_keys=True) for c in choices}) < len(choices):
            raise ConfigError(f"{where}: choices = {choices!r} lists a value twice; list each value once.")
        for choice in choices:
            _check_value(context, key, "choice", choice, file)
        encoded = any(isinstance(c, (list, dict)) for c in choices)
        held = [json.dumps(c) for c in choices] if encoded else choices
        return CategoricalDistribution(held), encoded
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: give both low and high (or choices); got {spec!r}.")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for role, value in (("low", low), ("high", high)):
        if not _is_number(value):
            raise ConfigError(f"{where}: {role} = {value!r} is not allowed: it must be a number.")
    if not low < high:
        raise ConfigError(f"{where}: low = {low!r} must be below high = {high!r}; for one value use fixed: instead.")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log = {log!r} is not allowed: it must be true or false.")
    if log and low <= 0:
        raise ConfigError(f"{where}: low = {low!r} is not allowed with log: true; a log scale needs low > 0.")
    integer = _is_int(low) and _is_int(high) and not _schema_is_float(key)
    if step is not None:
        if log:
            raise ConfigError(f"{where}: step = {step!r} cannot be combined with log: true; drop one of them.")
        if not (_is_int(step) if integer else _is_number(step)) or step <= 0:
            kind = "a positive integer (low and high are integers)" if integer else "a positive number"
            raise ConfigError(f"{where}: step = {step!r} is not allowed: it must be {kind}.")
        if integer and (high - low) % step:
            raise ConfigError(f"{where}: high - low = {high - low} is not a multiple of step = {step}; adjust high.")
    _check_value(context, key, "low", low, file)
    _check_value(context, key, "high", high, file)
    if integer:
        return IntDistribution(low, high, log=log, step=step or 1), False
    return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step)), False


def parse_set(values: Sequence[str], base: Params) -> dict[str, Any]:
    """`--set section.key=value` options: values read as YAML, as `dvc exp run -S` reads them."""
    pinned: dict[str, Any] = {}
    for option in values:
        key, equals, text = option.partition("=")
        if not equals or not key:
            raise ConfigError(f"{SET_SOURCE} {option!r}: expected section.key=value, e.g. --set train.epochs=20.")
        _check_key(key, base, SET_SOURCE, "")
        try:
            pinned[key] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            reason = str(getattr(error, "problem", None) or error)
            raise ConfigError(f"{SET_SOURCE} {key}={text}: the value is not valid YAML ({reason}).") from None
    return pinned


def read_space(file: Path, base: Params, pinned: dict[str, Any]) -> SearchSpace:
    """The search space file, checked against params.yaml's schema; `pinned` (--set) overrides it."""
    document = read_yaml(file, f"; pass --space FILE, or restore {SEARCH_SPACE_FILE} with git.")
    document = {} if document is None else document
    if not isinstance(document, dict):
        raise ConfigError(f"{file}: expected the sections space: and fixed:, got {type(document).__name__}.")
    for section in document:
        if section not in ("space", "fixed"):
            close = difflib.get_close_matches(str(section), ("space", "fixed"), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "allowed: space, fixed."
            raise ConfigError(f"{file}: unknown section '{section}'; {hint}")
    space, fixed = document.get("space") or {}, document.get("fixed") or {}
    for name, section in (("space", space), ("fixed", fixed)):
        if not isinstance(section, dict):
            raise ConfigError(f"{file}: {name}: must map section.key names to values, got {section!r}.")
        for key in section:
            _check_key(key, base, file, name)
    if both := sorted(set(space) & set(fixed)):
        raise ConfigError(f"{file}: {both[0]} is both in space: and in fixed:; keep it in one of them.")
    fixed_params = recipe.apply(base, fixed, file)
    context = recipe.apply(fixed_params, pinned, SET_SOURCE)
    searched = {key: spec for key, spec in space.items() if key not in pinned}
    if not searched:
        raise ConfigError(f"{file}: space: names no key to search (or --set pins them all); add one.")
    distributions: dict[str, BaseDistribution] = {}
    encoded: set[str] = set()
    for key, spec in searched.items():
        distributions[key], is_encoded = _distribution(key, spec, context, file)
        if is_encoded:
            encoded.add(key)
    return SearchSpace(distributions, {**fixed, **pinned}, frozenset(encoded))


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """The trial's values for the searched keys."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    values: dict[str, Any] = {}
    for key, d in space.distributions.items():
        if isinstance(d, CategoricalDistribution):
            value = trial.suggest_categorical(key, d.choices)
            values[key] = json.loads(str(value)) if key in space.encoded else value
        elif isinstance(d, FloatDistribution):
            values[key] = trial.suggest_float(key, d.low, d.high, log=d.log, step=d.step)
        else:
            assert isinstance(d, IntDistribution)
            values[key] = trial.suggest_int(key, d.low, d.high, log=d.log, step=d.step)
    return values


def trial_params(base: Params, space: SearchSpace, trial: optuna.Trial) -> Params:
    """params.yaml with the study's fixed values and the trial's sampled ones; a combination the schema
    refuses (rules across keys) fails the trial with the schema's sentence."""
    return recipe.apply(base, {**space.fixed, **suggest(trial, space)}, Path(f"trial {trial.number}"))


def differences(base: Params, flat: dict[str, Any]) -> dict[str, Any]:
    """The values of `flat` that differ from params.yaml, in params.yaml's order."""
    return {key: flat[key] for key, value in base.flat().items() if key in flat and flat[key] != value}


# --- Optuna ---------------------------------------------------------------------------------------


def trial_seed(seed: int, study: str, number: int) -> int:
    """The seed of the random draws of trial `number` of `study`: distinct per study and trial, the same
    every time for the same `--seed`."""
    import numpy as np

    return int(np.random.SeedSequence([seed, zlib.crc32(study.encode()), number]).generate_state(1)[0])


def make_sampler(seed: int) -> optuna.samplers.BaseSampler:
    """TPE with the constant liar, reseeded before each trial from `(seed, study name, trial number)`."""
    from optuna.samplers import TPESampler

    class TrialSeededTPE(TPESampler):
        def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
            super().before_trial(study, trial)
            # TPE and its random start-up sampler each hold one RandomState (Optuna 5; pinned <6)
            state = trial_seed(seed, study.study_name, trial.number)
            self._rng.rng.seed(state)
            self._random_sampler._rng.rng.seed(state)

    return TrialSeededTPE(seed=seed, constant_liar=True, multivariate=True)


def make_pruner(space: SearchSpace, base: Params) -> optuna.pruners.BasePruner:
    """Median pruning from a third of the epochs on (of the fewest epochs a trial may have)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution
    from optuna.pruners import MedianPruner

    epochs = recipe.apply(base, space.fixed, SET_SOURCE).train.epochs
    distribution = space.distributions.get("train.epochs")
    if isinstance(distribution, CategoricalDistribution):
        epochs = min(int(str(choice)) for choice in distribution.choices)
    elif isinstance(distribution, IntDistribution):
        epochs = distribution.low
    return MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=max(epochs // 3, 1))


def storage_url(option: str | None) -> str:
    """--storage, else OPTUNA_STORAGE, else optuna.db at the repository root."""
    return option or os.environ.get("OPTUNA_STORAGE") or f"sqlite:///{tracking.project_root() / 'optuna.db'}"


def shown_url(url: str) -> str:
    """The URL with its password hidden, for messages and tags."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _creation_race(error: Exception) -> bool:
    """Two workers creating the tables of a new database at once: the loser's error, worth a retry."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    text = str(error)
    return isinstance(error, IntegrityError) or (
        isinstance(error, OperationalError) and ("already exists" in text or "locked" in text)
    )


def open_storage(url: str, on_stale: Callable[[optuna.Study, FrozenTrial], None]) -> RDBStorage:
    """Optuna's RDBStorage with heartbeats; a database that cannot be opened is one sentence."""
    from optuna.storages import RDBStorage

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=on_stale,
            )
        except Exception as error:  # SQLAlchemy and driver errors: a bad URL, a missing driver, a dead server
            if _creation_race(error) and attempt + 1 < STORAGE_ATTEMPTS:
                time.sleep(1.0)  # the other worker's tables are there now
                continue
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise TrackingError(
                f"the Optuna storage {shown_url(url)} cannot be opened ({reason}); fix --storage or OPTUNA_STORAGE."
            ) from None
    raise AssertionError("unreachable")


# --- MLflow ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def store_errors(what: str) -> Iterator[None]:
    """A failing MLflow store is one sentence (TrackingError), which stops the worker."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError, requests.RequestException) as error:
        reason = (str(getattr(error, "message", "") or error).strip().splitlines() or [type(error).__name__])[0]
        raise TrackingError(
            f"{what} in the MLflow store {tracking.tracking_uri()} failed ({type(error).__name__}: {reason}); "
            "check the store and run again (the study resumes where it stopped)."
        ) from None


def log_params(run_id: str, flat: dict[str, Any]) -> None:
    """Parameters as `mlflow.log_params` writes them (`str(value)`)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    MlflowClient().log_batch(run_id, params=[Param(key, str(value)) for key, value in flat.items()])


def close_run(run_id: str, status: str, tags: dict[str, str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    client.set_terminated(run_id, status)


def close_stale_run(study: optuna.Study, trial: FrozenTrial) -> None:
    """Heartbeat callback: a trial of a worker that died was failed; close its run as FAILED too."""
    if run_id := trial.user_attrs.get("mlflow_run_id"):
        reason = "its worker stopped sending heartbeats (killed, or its machine was lost)"
        with contextlib.suppress(Exception):  # best effort: never stop this worker over another's run
            close_run(run_id, "FAILED", {"optuna.state": "FAIL", "optuna.fail_reason": reason})
    log.warning("trial %d of study %s was failed: its worker stopped", trial.number, study.study_name)


# --- the study ------------------------------------------------------------------------------------


@dataclass
class Study:
    """An Optuna study and its MLflow parent run, shared by every worker."""

    study: optuna.Study
    storage: RDBStorage
    parent_run_id: str
    experiment_id: str


def _wait_for_parent(study: optuna.Study) -> str | None:
    deadline = time.monotonic() + PARENT_WAIT_SECONDS
    while time.monotonic() < deadline:
        if parent := study.user_attrs.get(PARENT_ATTR):
            return str(parent)
        time.sleep(0.5)
    return None


def _create_parent(
    study: optuna.Study, experiment_id: str, space: SearchSpace, base: Params, tags: dict[str, str]
) -> str:
    from mlflow import MlflowClient

    name = study.study_name
    with store_errors(f"creating the parent run of study {name}"):
        client = MlflowClient()
        run = client.create_run(experiment_id, run_name=name, tags={"optuna.study": name, **tags})
        context = recipe.apply(base, space.fixed, SET_SOURCE).flat()
        params = {key: value for key, value in context.items() if key not in space.distributions}
        params |= {f"search.{key}": space.describe(key) for key in space.distributions}
        log_params(run.info.run_id, params)
    study.set_user_attr(DEFINITION_ATTR, space.definition())
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    return run.info.run_id


def _check_definition(study: optuna.Study, space: SearchSpace) -> None:
    """A resumed study may change its space or fixed values (noted), not a parameter's kind or choices."""
    from optuna.distributions import check_distribution_compatibility, json_to_distribution

    before = study.user_attrs.get(DEFINITION_ATTR)
    if not before or before == json.loads(json.dumps(space.definition())):
        return
    for key, old in before["space"].items():
        if key in space.distributions:
            started = json_to_distribution(json.dumps(old))
            try:
                check_distribution_compatibility(started, space.distributions[key])
            except ValueError:
                raise ConfigError(
                    f"study {study.study_name} searched {key} as {describe(started)}, not "
                    f"{space.describe(key)}; a study cannot change a key's kind, log scale or choices: restore that "
                    "entry, or start another --study."
                ) from None
    changed = sorted(
        key
        for key in {*before["space"], *space.distributions, *before["fixed"], *space.fixed}
        if before["space"].get(key) != space.definition()["space"].get(key)
        or before["fixed"].get(key) != space.fixed.get(key)
    )
    log.warning(
        "note: study %s started with another search space or fixed values (%s differ); its earlier trials "
        "were drawn from that one, the new trials from this one.",
        study.study_name,
        ", ".join(changed),
    )


def open_study(
    name: str, url: str, space: SearchSpace, base: Params, seed: int, experiment_id: str, tags: dict[str, str]
) -> Study:
    """Create the study or join it; exactly one worker creates its MLflow parent run."""
    import optuna
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from optuna.exceptions import DuplicatedStudyError
    from optuna.study import StudyDirection

    storage = open_storage(url, close_stale_run)
    try:
        storage.create_new_study([StudyDirection.MAXIMIZE], name)
        created = True
    except DuplicatedStudyError:
        created = False
    study = optuna.load_study(
        study_name=name, storage=storage, sampler=make_sampler(seed), pruner=make_pruner(space, base)
    )
    if study.direction != StudyDirection.MAXIMIZE:
        raise ConfigError(
            f"study {name} in {shown_url(url)} is not a maximization made by mnist-tune; use another --study."
        )
    if created:
        parent = _create_parent(study, experiment_id, space, base, tags)
    else:
        _check_definition(study, space)
        found = _wait_for_parent(study)
        if found is None:  # its creator stopped between creating the study and its run
            log.warning("note: study %s had no MLflow parent run; this worker creates it.", name)
            found = _create_parent(study, experiment_id, space, base, tags)
        parent = found
        try:
            MlflowClient().get_run(parent)
        except MlflowException:
            raise TrackingError(
                f"the MLflow parent run {parent} of study {name} is not in the store {tracking.tracking_uri()}; "
                "point MLFLOW_TRACKING_URI at the store the study started with, or use another --study."
            ) from None
    return Study(study, storage, parent, experiment_id)


def mark_failed(shared: Study, trial: optuna.Trial) -> None:
    """Record a trial FAIL that Optuna would leave RUNNING (it re-raises SIGTERM's exception untouched)."""
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):
        study_id = shared.storage.get_study_id_from_name(shared.study.study_name)
        trial_id = shared.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        shared.storage.set_trial_state_values(trial_id, TrialState.FAIL)


def make_objective(
    shared: Study, base: Params, space: SearchSpace, train: io.Split, validation: io.Split, tags: dict[str, str]
) -> Callable[[optuna.Trial], float]:
    """Train one trial, recorded in its own MLflow child run, pruned when clearly behind."""
    import optuna
    from mlflow import MlflowClient

    name = shared.study.study_name

    def objective(trial: optuna.Trial) -> float:
        import keras

        from pipeline.fit import fit

        with store_errors(f"creating the run of trial {trial.number}"):
            run = MlflowClient().create_run(
                shared.experiment_id,
                run_name=f"{name}/trial-{trial.number}",
                tags={
                    "mlflow.parentRunId": shared.parent_run_id,
                    "optuna.study": name,
                    "optuna.trial_number": str(trial.number),
                    **tags,
                    # host and pid: the next pipeline run on this host ends it KILLED if this worker is
                    # killed outright (tracking.end_orphaned_runs); the next worker fails it (heartbeat)
                    **tracking.process_tags(),
                },
            )
        run_id = run.info.run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        status, state, reason = "FAILED", "FAIL", ""

        def on_epoch(result: EpochResult) -> None:
            with store_errors(f"logging epoch {result.epoch} of trial {trial.number}"):
                tracking.log_history(run_id, [result])
            trial.report(result.val_accuracy, result.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_accuracy {result.val_accuracy:.4f} at epoch {result.epoch}")

        try:
            params = trial_params(base, space, trial)
            flat = params.flat()
            trial.set_user_attr("params", flat)
            with store_errors(f"logging the parameters of trial {trial.number}"):
                log_params(run_id, flat)
            with runtime.cache_errors_explained():
                fitted = fit(params.model, params.train, train, validation, on_epoch=on_epoch)
            with store_errors(f"logging trial {trial.number}"):
                MlflowClient().log_metric(run_id, "train_seconds", fitted.train_seconds)
            status, state = "FINISHED", "COMPLETE"
            return fitted.history[-1].val_accuracy
        except optuna.TrialPruned:
            status, state = "KILLED", "PRUNED"
            raise
        except KeyboardInterrupt:
            status, reason = "FAILED", "INTERRUPTED"
            raise
        except Terminated:
            status, reason = "FAILED", "TERMINATED"
            mark_failed(shared, trial)
            raise
        except Exception as error:
            reason = str(error) if isinstance(error, PipelineError) else f"{type(error).__name__}: {error}"
            trial.set_user_attr("fail_reason", reason[:1000])
            raise
        finally:
            keras.backend.clear_session()  # free this trial's graphs before the next one
            closing = {"optuna.state": state} | ({"optuna.fail_reason": reason[:5000]} if reason else {})
            if sys.exc_info()[0] is None:
                with store_errors(f"closing the run of trial {trial.number}"):
                    close_run(run_id, status, closing)
            else:  # already failing: do not hide that error behind the store's
                with contextlib.suppress(Exception):
                    close_run(run_id, status, closing)

    return objective


# --- progress and the result ----------------------------------------------------------------------


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no trial completed yet
        return None


def trial_line(study: optuna.Study, trial: FrozenTrial) -> str:
    """`trial 3: COMPLETE val_accuracy 0.9712; best so far 0.9731 (trial 1)`."""
    state = trial.state.name
    if trial.value is not None and state == "COMPLETE":
        figure = f" val_accuracy {trial.value:.4f}"
    elif trial.value is not None:
        figure = f" at val_accuracy {trial.value:.4f}"
    else:
        figure = ""
    why = f" ({trial.user_attrs['fail_reason']})" if state == "FAIL" and "fail_reason" in trial.user_attrs else ""
    best = best_trial(study)
    so_far = f"best so far {best.value:.4f} (trial {best.number})" if best else "no trial complete yet"
    return f"trial {trial.number}: {state}{figure}{why}; {so_far}"


@contextlib.contextmanager
def progress(trials: int, name: str) -> Iterator[Callable[[optuna.Study, FrozenTrial], None]]:
    """A bar over this worker's trials on a terminal; one line per trial in logs."""
    from tqdm import tqdm

    with tqdm(total=trials, desc=f"tune {name}", unit="trial", disable=None, file=sys.stderr) as bar:

        def report(study: optuna.Study, trial: FrozenTrial) -> None:
            line = trial_line(study, trial)
            if bar.disable:
                log.info("%s", line)
            else:
                bar.set_postfix_str(line.partition("; ")[2], refresh=False)
                if trial.state.name == "FAIL":
                    bar.write(line, file=sys.stderr)
                bar.update()

        yield report


def summary(study: optuna.Study, base: Params) -> list[str]:
    """The best trial of the whole study, its parameters that differ from params.yaml, and the command
    that trains it as a DVC experiment."""
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state.name == state for t in trials) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    tally = ", ".join(f"{n} {state.lower()}" for state, n in counts.items() if n)
    best = best_trial(study)
    if best is None:
        return [f"study {study.study_name}: no trial has completed yet ({tally or 'no trials'})."]
    flat = best.user_attrs.get("params") or best.params
    changed = differences(base, flat)
    lines = [
        f"best trial of study {study.study_name} ({len(trials)} trial{'s' * (len(trials) != 1)}: {tally}): "
        f"trial {best.number}, val_accuracy {best.value:.4f}"
    ]
    lines += [f"  {key}: {recipe.yaml_value(value)}" for key, value in changed.items()]
    lines += [
        "train it as a DVC experiment:",
        "  " + shlex.join(recipe.exp_run_command(changed, name=f"{study.study_name}-trial-{best.number}")),
    ]
    return lines


def update_parent(shared: Study) -> None:
    """The study's standing so far on its parent run, which ends FINISHED (never left RUNNING)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    trials = shared.study.get_trials(deepcopy=False)
    metrics: dict[str, float] = {
        f"trials_{s.lower()}": sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")
    }
    if best := best_trial(shared.study):
        metrics |= {"best_val_accuracy": float(best.value or 0.0), "best_trial": best.number}
        if run_id := best.user_attrs.get("mlflow_run_id"):
            client.set_tag(shared.parent_run_id, "best_run_id", run_id)
    for key, value in metrics.items():
        client.log_metric(shared.parent_run_id, key, value, step=len(trials))
    client.set_terminated(shared.parent_run_id, "FINISHED")


# --- the command ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().removeprefix("usage: ").split())  # one line, however wide
        raise UsageError(f"{message}; usage: {usage}")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _seed(text: str) -> int:
    if not text.isdigit() or int(text) >= 2**32:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 2^32-1, got {text!r}")
    return int(text)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = _Parser(prog="mnist-tune", description="Search hyper-parameters with Optuna; every trial in MLflow.")
    parser.add_argument("--study", required=True, help="the study's name: workers with one name share it")
    parser.add_argument("--trials", required=True, type=_positive, metavar="N", help="trials this process runs")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="pinned", help="pin a params.yaml key"
    )
    parser.add_argument(
        "--space", type=Path, default=SEARCH_SPACE_FILE, metavar="FILE", help=f"default: {SEARCH_SPACE_FILE}"
    )
    parser.add_argument("--storage", metavar="URL", help="Optuna storage (default: OPTUNA_STORAGE, else optuna.db)")
    parser.add_argument("--seed", type=_seed, default=0, metavar="S", help="sampler seed (default 0)")
    args = parser.parse_args(argv)
    if not STUDY_NAME.fullmatch(args.study):
        raise UsageError(
            f"--study {args.study!r} is not allowed: use letters, digits, '.', '_' and '-' (it names DVC "
            "experiments and MLflow runs), starting with a letter or digit."
        )
    return args


def quiet_optuna() -> None:
    """Optuna's INFO lines (and, at WARNING, a traceback per failed trial) would drown the line per trial;
    the heartbeat and the constant liar are "experimental" arguments, which it warns about every time."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def main(argv: Sequence[str]) -> None:
    """Check everything, then run this worker's trials and print the study's best."""
    args = parse_args(argv)
    quiet.configure_logging()
    if not PARAMS_FILE.is_file():
        raise ConfigError(f"{PARAMS_FILE} not found; run mnist-tune from the repository root.")
    base = load_params()
    space = read_space(args.space, base, parse_set(args.pinned, base))
    train, validation = (io.load_split(prepared_file(split)) for split in ("train", "validation"))

    quiet_optuna()
    experiment_id = tracking.connect()  # fails in seconds on a dead server
    with store_errors("ending the runs of killed processes"):
        tracking.end_orphaned_runs(None, experiment_id)
    url = storage_url(args.storage)
    uri = tracking.tracking_uri()
    if not args.storage and not os.environ.get("OPTUNA_STORAGE") and uri.startswith(("http://", "https://")):
        log.warning(
            "note: the study lives in %s on this machine; set OPTUNA_STORAGE=<the team's database URL> to "
            "share it with workers on other machines.",
            shown_url(url),
        )
    lineage = tracking.lineage_tags(PARAMS_FILE, {s: prepared_file(s) for s in ("train", "validation")})
    tags = {key: value for key, value in lineage.items() if key != "params_md5"}  # a trial is not params.yaml
    tags["optuna.storage"] = shown_url(url)
    shared = open_study(args.study, url, space, base, args.seed, experiment_id, tags)
    runtime.import_tensorflow(tracking.project_root())  # before the first trial: its noise filtered, the cache on
    objective = make_objective(shared, base, space, train, validation, tags)
    mine: list[FrozenTrial] = []
    try:
        with progress(args.trials, args.study) as report:

            def after(study: optuna.Study, trial: FrozenTrial) -> None:
                mine.append(trial)
                report(study, trial)

            shared.study.optimize(objective, n_trials=args.trials, catch=TRIAL_ERRORS, callbacks=[after])
    finally:
        with contextlib.suppress(Exception) if sys.exc_info()[0] else store_errors("closing the study's parent run"):
            update_parent(shared)
    print("\n".join(summary(shared.study, base)), flush=True)
    if mine and all(t.state.name == "FAIL" for t in mine):
        first = mine[0].user_attrs.get("fail_reason", "see its MLflow run")
        raise PipelineError(f"all {len(mine)} trials of this worker failed; the first: {first}")


def run() -> None:
    """The console script."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    run_stage(lambda: main(sys.argv[1:]))


if __name__ == "__main__":
    run()
