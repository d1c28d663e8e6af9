"""The study that workers share: created or joined, its sampler and pruner, its MLflow parent run, and
the objective that trains one trial in its own MLflow child run."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline import recipe, tracking
from pipeline.config import Params
from pipeline.errors import ConfigError, PipelineError, Terminated, TrackingError
from pipeline.tune.space import SET_SOURCE, SearchSpace, describe, trial_params
from pipeline.tune.storage import HEARTBEAT_SECONDS, open_storage, poll

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial

    from pipeline.fit import EpochResult

log = logging.getLogger("pipeline.tune")

PARENT_ATTR = "mlflow_parent_run_id"
DEFINITION_ATTR = "definition"
PARENT_WAIT_SECONDS = 120.0
PRUNER_STARTUP_TRIALS = 5


def make_sampler(seed: int) -> optuna.samplers.BaseSampler:
    """TPE with the constant liar, reseeded before each trial from `(seed, study name, trial number)`: a
    trial's draws are distinct per study and trial, the same every time for the same `--seed`."""
    import numpy as np
    from optuna.samplers import TPESampler

    class TrialSeededTPE(TPESampler):
        def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
            super().before_trial(study, trial)
            entropy = [seed, zlib.crc32(study.study_name.encode()), trial.number]
            state = int(np.random.SeedSequence(entropy).generate_state(1)[0])
            # TPE and its random start-up sampler each hold one RandomState (Optuna 5; pinned <6)
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


@dataclass
class Study:
    """An Optuna study and its MLflow parent run, shared by every worker; and the MLflow run of each
    trial this worker started (by trial number), to close it if the trial's own cleanup could not."""

    study: optuna.Study
    storage: RDBStorage
    parent_run_id: str
    experiment_id: str
    runs: dict[int, str] = field(default_factory=dict)

    def study_id(self) -> int:
        """The study's id in the storage."""
        return self.storage.get_study_id_from_name(self.study.study_name)

    def trial_id(self, number: int) -> int:
        """The storage's id of trial `number` (Optuna's storage speaks ids, its study trial numbers)."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id(), number)


def _create_parent(
    study: optuna.Study, experiment_id: str, space: SearchSpace, base: Params, tags: dict[str, str]
) -> str:
    name = study.study_name
    with tracking.store_errors(f"creating the parent run of study {name}"):
        run_id = tracking.create_run(experiment_id, name, tags={"optuna.study": name, **tags})
        context = recipe.apply(base, space.fixed, SET_SOURCE).flat()
        params = {key: value for key, value in context.items() if key not in space.distributions}
        params |= {f"search.{key}": describe(space.distributions[key]) for key in space.distributions}
        tracking.log_run(run_id, params=params)
    study.set_user_attr(DEFINITION_ATTR, space.definition())
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def _check_definition(study: optuna.Study, space: SearchSpace) -> None:
    """A resumed study may change its space or fixed values (noted), not a parameter's kind or choices."""
    from optuna.distributions import check_distribution_compatibility, json_to_distribution

    before, now = study.user_attrs.get(DEFINITION_ATTR), json.loads(json.dumps(space.definition()))
    if not before or before == now:
        return
    for key, old in before["space"].items():
        if key in space.distributions:
            started = json_to_distribution(json.dumps(old))
            try:
                check_distribution_compatibility(started, space.distributions[key])
            except ValueError:
                raise ConfigError(
                    f"study {study.study_name} searched {key} as {describe(started)}, not "
                    f"{describe(space.distributions[key])}; a study cannot change a key's kind, log scale or "
                    "choices: restore that entry, or start another --study."
                ) from None
    changed = {
        key
        for part in ("space", "fixed")
        for key in {*before[part], *now[part]}
        if before[part].get(key) != now[part].get(key)
    }
    log.warning(
        "note: study %s started with another search space or fixed values (%s differ); its earlier trials "
        "were drawn from that one, the new trials from this one.",
        study.study_name,
        ", ".join(sorted(changed)),
    )


def open_study(
    name: str,
    url: str,
    space: SearchSpace,
    base: Params,
    seed: int,
    experiment_id: str,
    tags: dict[str, str],
    heartbeat: int = HEARTBEAT_SECONDS,
) -> Study:
    """Create the study or join it; exactly one worker creates its MLflow parent run."""
    import optuna
    from optuna.exceptions import DuplicatedStudyError
    from optuna.study import StudyDirection

    storage = open_storage(url, close_stale_run, heartbeat)
    created: int | None = None  # the new study's id, if this worker creates it
    with contextlib.suppress(DuplicatedStudyError):
        created = storage.create_new_study([StudyDirection.MAXIMIZE], name)
    study = optuna.load_study(
        study_name=name, storage=storage, sampler=make_sampler(seed), pruner=make_pruner(space, base)
    )
    if study.direction != StudyDirection.MAXIMIZE:
        raise ConfigError(
            f"study {name} in {tracking.redacted(url)} is not a maximization made by mnist-tune; use another --study."
        )
    if created is None:
        _check_definition(study, space)
        parent = poll(lambda: study.user_attrs.get(PARENT_ATTR), PARENT_WAIT_SECONDS, 0.5)
        if parent is None:  # its creator stopped between creating the study and its run
            log.warning("note: study %s had no MLflow parent run; this worker creates it.", name)
            parent = _create_parent(study, experiment_id, space, base, tags)
        if not tracking.run_exists(parent):
            raise TrackingError(
                f"the MLflow parent run {parent} of study {name} is not in the store {tracking.shown_store()}; "
                "point MLFLOW_TRACKING_URI at the store the study started with, or use another --study."
            )
    else:
        try:
            parent = _create_parent(study, experiment_id, space, base, tags)
        except BaseException:  # refused (a user who may only read): no study left waiting for a parent run
            with contextlib.suppress(Exception):
                storage.delete_study(created)
            raise
    return Study(study, storage, parent, experiment_id)


def closing(what: str) -> contextlib.AbstractContextManager[None]:
    """`tracking.store_errors` for a cleanup; while an error is already on its way out, the store's
    own error is silenced instead, so that it does not hide that one."""
    return contextlib.suppress(Exception) if sys.exc_info()[0] else tracking.store_errors(what)


def trial_run(shared: Study, number: int, tags: dict[str, str]) -> str:
    """A new RUNNING run `<study>/trial-<number>` under the study's parent run, kept in `shared.runs`."""
    name = shared.study.study_name
    run_id = tracking.create_run(
        shared.experiment_id,
        f"{name}/trial-{number}",
        parent_run_id=shared.parent_run_id,
        tags={"optuna.study": name, "optuna.trial_number": str(number), **tags},
    )
    shared.runs[number] = run_id
    return run_id


def close_stale_run(study: optuna.Study, trial: FrozenTrial) -> None:
    """Heartbeat callback: a trial of a worker that died was failed; close its run as FAILED too."""
    if run_id := trial.user_attrs.get("mlflow_run_id"):
        reason = "its worker stopped sending heartbeats (killed, or its machine was lost)"
        with contextlib.suppress(Exception):  # best effort: never stop this worker over another's run
            tracking.end_run(run_id, "FAILED", {"optuna.state": "FAIL", "optuna.fail_reason": reason})
    log.warning("trial %d of study %s was failed: its worker stopped", trial.number, study.study_name)


def make_objective(
    shared: Study, base: Params, space: SearchSpace, tags: dict[str, str]
) -> Callable[[optuna.Trial], float]:
    """Train one trial (in a fresh process), recorded in its own MLflow child run, pruned when clearly behind."""
    import optuna
    from optuna.trial import TrialState

    def objective(trial: optuna.Trial) -> float:
        from pipeline.fit import final_figures
        from pipeline.tune.apart import fit_apart

        with tracking.store_errors(f"creating the run of trial {trial.number}"):
            # host and pid: the next pipeline run on this host ends it KILLED if this worker is killed
            # outright (tracking.end_orphaned_runs); the next worker fails it (heartbeat)
            run_id = trial_run(shared, trial.number, {**tags, **tracking.process_tags()})
        trial.set_user_attr("mlflow_run_id", run_id)
        status, state, reason = "FAILED", "FAIL", ""

        def on_epoch(result: EpochResult) -> None:
            with tracking.store_errors(f"logging epoch {result.epoch} of trial {trial.number}"):
                tracking.log_history(run_id, [result])
            trial.report(result.metrics["val_accuracy"], result.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_accuracy {result.metrics['val_accuracy']:.4f} at epoch {result.epoch}")

        try:
            params = trial_params(base, space, trial)
            flat = params.flat()
            trial.set_user_attr("params", flat)
            with tracking.store_errors(f"logging the parameters of trial {trial.number}"):
                tracking.log_run(run_id, params=flat)
            with tracking.system_metrics(run_id):
                history, seconds = fit_apart(params, on_epoch)
            final = final_figures(history)
            with tracking.store_errors(f"logging trial {trial.number}"):
                tracking.log_run(run_id, metrics={**final, "train_seconds": seconds})
            status, state = "FINISHED", "COMPLETE"
            return final["val_accuracy"]
        except optuna.TrialPruned:
            status, state = "KILLED", "PRUNED"
            raise
        except KeyboardInterrupt:
            reason = "INTERRUPTED"
            raise
        except Terminated:  # Optuna re-raises SIGTERM's exception untouched, leaving the trial RUNNING
            reason = "TERMINATED"
            with contextlib.suppress(Exception):
                shared.storage.set_trial_state_values(shared.trial_id(trial.number), TrialState.FAIL)
            raise
        except Exception as error:
            reason = str(error) if isinstance(error, PipelineError) else f"{type(error).__name__}: {error}"
            trial.set_user_attr("fail_reason", reason[:1000])
            raise
        finally:
            ending = {"optuna.state": state} | ({"optuna.fail_reason": reason[:5000]} if reason else {})
            with closing(f"closing the run of trial {trial.number}"):
                tracking.end_run(run_id, status, ending)

    return objective
