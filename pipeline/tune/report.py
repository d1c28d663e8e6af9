"""What a worker shows and records of its study: a line per trial, the study's standing on its MLflow
parent run, and the best trial with the `dvc exp run` command that reproduces it."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from pipeline import recipe, tracking
from pipeline.config import Params
from pipeline.tune.space import differences
from pipeline.tune.study import Study

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no trial completed yet
        return None


def trial_line(study: optuna.Study, trial: FrozenTrial) -> str:
    """`trial 3: COMPLETE val_accuracy 0.9712; best so far 0.9731 (trial 1)`."""
    state = trial.state.name
    at = "" if state == "COMPLETE" else " at"  # a pruned trial's value is its last epoch's
    figure = "" if trial.value is None else f"{at} val_accuracy {trial.value:.4f}"
    why = f" ({trial.user_attrs['fail_reason']})" if state == "FAIL" and "fail_reason" in trial.user_attrs else ""
    best = best_trial(study)
    so_far = f"best so far {best.value:.4f} (trial {best.number})" if best else "no trial complete yet"
    return f"trial {trial.number}: {state}{figure}{why}; {so_far}"


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
    """The study's standing so far on its parent run (at the step of the trial count, so the fullest
    standing is the one shown); whether the run ends is the workers' to settle (tune/workers.py)."""
    trials = shared.study.get_trials(deepcopy=False)
    metrics: dict[str, float] = {
        f"trials_{s.lower()}": sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")
    }
    tags: dict[str, str] = {}
    if best := best_trial(shared.study):
        metrics |= {"best_val_accuracy": float(best.value or 0.0), "best_trial": best.number}
        if run_id := best.user_attrs.get("mlflow_run_id"):
            tags["best_run_id"] = run_id
    tracking.log_run(shared.parent_run_id, metrics=metrics, tags=tags, step=len(trials))
