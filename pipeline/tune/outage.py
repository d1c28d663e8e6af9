"""What a worker does when a store goes away mid-study (the team's PostgreSQL restarts, the MLflow
server's database is down): ONE line saying which store went away and why, the trial in flight failed
(with its MLflow run), a wait for the store to answer again, then the trials the worker has left. A
store that is not back within `--wait` seconds is one `error:` line; the study resumes whenever a
worker is started again. Waiting is only for a store that went away: a wrong URL, password or query
stops the worker at once, as before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline import database, tracking
from pipeline.errors import StoreUnavailableError, TrackingError, chain
from pipeline.tune.storage import poll
from pipeline.tune.study import Study, trial_run

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


log = logging.getLogger("pipeline.tune")

WAIT_SECONDS = 600
POLL_SECONDS = 2.0


@dataclass(frozen=True)
class Outage:
    """Which store went away (as shown: no password) and the driver's or server's short reason."""

    store: str
    reason: str

    def __str__(self) -> str:
        return f"{self.store} went away ({self.reason})"


def outage_of(error: BaseException, url: str) -> Outage | None:
    """The outage that `error` reports, if it is one: the MLflow store (through tracking's
    StoreUnavailableError, or an HTTP error of its server) or the Optuna storage at `url`."""
    mlflow_store = f"the MLflow store {tracking.shown_store()}"
    for cause in chain(error):
        if isinstance(cause, StoreUnavailableError):
            return Outage(mlflow_store, cause.reason)
    if lost := database.connection_lost(error):
        return Outage(f"the Optuna storage {tracking.redacted(url)}", tracking.redacted(lost, url))
    if away := tracking.unavailable(error):
        return Outage(mlflow_store, away)
    return None


def _back(shared: Study) -> bool:
    """Whether both stores answer again (one still away raises)."""
    shared.study_id()
    tracking.probe()
    return True


def _refused(error: BaseException) -> bool:
    """Whether `error` is Optuna refusing to update a finished trial. For the trial a worker is training,
    only another worker finishes it: its heartbeat check failed it, the heartbeat being late (an outage
    longer than the grace period, a stalled machine)."""
    from optuna.exceptions import UpdateFinishedTrialError

    return any(
        isinstance(cause, UpdateFinishedTrialError) or str(cause).startswith("Cannot tell a FAIL trial")
        for cause in chain(error)
    )


def fail_in_flight(shared: Study, number: int, outage: Outage) -> None:
    """The trial that the outage interrupted: FAIL in the study (unless its end was recorded, or another
    worker failed it meanwhile) and its MLflow run FAILED with the reason."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = shared.storage
    reason = f"{outage}; the trial was interrupted"
    trial_id = shared.trial_id(number)
    state = storage.get_trial(trial_id).state
    if state == TrialState.RUNNING:
        with contextlib.suppress(UpdateFinishedTrialError):
            storage.set_trial_user_attr(trial_id, "fail_reason", reason[:1000])
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            state = TrialState.FAIL
    if state == TrialState.FAIL:
        with tracking.store_errors(f"closing the run of trial {number}", "run the worker again"):
            run_id = shared.runs.get(number) or trial_run(shared, number, {})  # the outage refused its creation
            tracking.end_run(run_id, "FAILED", {"optuna.state": "FAIL", "optuna.fail_reason": reason[:5000]})


def beat_running_trials(shared: Study) -> None:
    """One heartbeat for each RUNNING trial of the study. A connection cut while a worker commits a new
    trial leaves Optuna unsure whether it landed; it retries, and a first attempt that did land is a
    trial no worker trains and that never had a heartbeat, which Optuna never fails. One beat makes it
    stale after the grace period, so a worker's heartbeat check fails it; a live trial beats on anyway."""
    from optuna.trial import TrialState

    for trial in shared.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        shared.storage.record_heartbeat(shared.trial_id(trial.number))


def optimize(
    shared: Study,
    objective: Callable[[optuna.Trial], float],
    trials: int,
    catch: tuple[type[Exception], ...],
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]],
    url: str,
    wait: float = WAIT_SECONDS,
) -> None:
    """`study.optimize` for `trials` trials (a trial an outage failed counts as one), waiting out the
    outages of the stores as the module docstring says."""
    started: list[int] = []
    finished: set[int] = set()

    def counted(trial: optuna.Trial) -> float:
        started.append(trial.number)
        return objective(trial)

    def ended(study: optuna.Study, trial: FrozenTrial) -> None:
        finished.add(trial.number)

    while len(started) < trials:
        try:
            shared.study.optimize(counted, n_trials=trials - len(started), catch=catch, callbacks=[ended, *callbacks])
            return
        except Exception as error:
            outage = outage_of(error, url)
            in_flight = started[-1] if started and started[-1] not in finished else None
            if outage is None:
                if in_flight is None or not _refused(error):
                    raise
                finished.add(in_flight)
                log.warning(
                    "warning: trial %d was failed by another worker while this one trained it (its heartbeat "
                    "was late); this worker goes on.",
                    in_flight,
                )
                continue
        during = f"during trial {in_flight}, which fails" if in_flight is not None else "between trials"
        log.warning(
            "warning: %s %s; this worker waits up to %d s for it to come back, then goes on.", outage, during, wait
        )
        if not poll(lambda: _back(shared), wait, POLL_SECONDS):
            raise TrackingError(
                f"{outage} and did not come back within {wait:.0f} s; start it again, then this worker "
                "(the study resumes where it stopped)."
            )
        try:
            if in_flight is not None:
                fail_in_flight(shared, in_flight, outage)
                finished.add(in_flight)
            else:
                beat_running_trials(shared)
        except Exception as error:  # gone again already: the next round says so and waits again
            if outage_of(error, url) is None:
                raise
