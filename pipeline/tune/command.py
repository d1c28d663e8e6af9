"""The `mnist-tune --study NAME --trials N` command: check everything, run this worker's trials, print
the study's best."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import database, io, lineage, quiet, tracking
from pipeline.cli import ArgumentParser, positive, seed
from pipeline.config import PARAMS_FILE, SEARCH_SPACE_FILE, load_params, prepared_file
from pipeline.errors import ConfigError, DataError, DivergedError, PipelineError, ResourceError, UsageError, run_stage
from pipeline.tune import outage, workers
from pipeline.tune.report import summary, trial_line, update_parent
from pipeline.tune.space import parse_set, read_space
from pipeline.tune.storage import DEFAULT_SETTING, GRACE_BEATS, HEARTBEAT_SECONDS, storage_url
from pipeline.tune.study import closing, make_objective, open_study

if TYPE_CHECKING:
    import argparse

    import optuna
    from optuna.trial import FrozenTrial

log = logging.getLogger("pipeline.tune")

STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Trial-level failures: recorded as FAIL, the study goes on. Anything else (the store failing) stops it.
INTERRUPTED = (
    "the trial this worker was training is failed and its MLflow run closed; run mnist-tune again to resume the study"
)
TRIAL_ERRORS: tuple[type[Exception], ...] = (DivergedError, ConfigError, ResourceError, DataError)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="mnist-tune", description="Search hyper-parameters with Optuna.")
    parser.add_argument("--study", required=True, help="the study's name: workers with one name share it")
    parser.add_argument("--trials", required=True, type=positive, metavar="N", help="trials this process runs")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="pinned", help="pin a params.yaml key"
    )
    parser.add_argument(
        "--space", type=Path, default=SEARCH_SPACE_FILE, metavar="FILE", help=f"default: {SEARCH_SPACE_FILE}"
    )
    parser.add_argument("--storage", metavar="URL", help="Optuna storage (default: OPTUNA_STORAGE, else optuna.db)")
    parser.add_argument("--seed", type=seed, default=0, metavar="S", help="sampler seed (default 0)")
    parser.add_argument(
        "--heartbeat",
        type=positive,
        default=HEARTBEAT_SECONDS,
        metavar="SECONDS",
        help=f"how often a worker records that its trial is alive; a trial silent for {GRACE_BEATS} times that "
        f"is failed by another worker (default {HEARTBEAT_SECONDS}; the same for every worker of a study)",
    )
    parser.add_argument(
        "--wait",
        type=positive,
        default=outage.WAIT_SECONDS,
        metavar="SECONDS",
        help=f"how long a worker waits for a database that went away mid-study (default {outage.WAIT_SECONDS})",
    )
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
    url, setting = storage_url(args.storage)
    database.check_driver(url, setting)
    if not PARAMS_FILE.is_file():
        raise ConfigError(f"{PARAMS_FILE} not found; run mnist-tune from the repository root.")
    base = load_params()
    space = read_space(args.space, base, parse_set(args.pinned, base))
    for split in ("train", "validation"):
        io.load_split(prepared_file(split))  # here, not once per trial: a missing or corrupt file stops the worker

    quiet_optuna()
    experiment_id = tracking.connect()  # fails in seconds on a dead server
    with tracking.store_errors("ending the runs of killed processes"):
        tracking.end_orphaned_runs(experiment_id)
    if setting == DEFAULT_SETTING and tracking.tracking_uri().startswith(("http://", "https://")):
        log.warning(
            "note: the study lives in %s on this machine; set OPTUNA_STORAGE=<the team's database URL> to "
            "share it with workers on other machines.",
            tracking.redacted(url),
        )
    origin = lineage.lineage_tags(PARAMS_FILE, {s: prepared_file(s) for s in ("train", "validation")})
    tags = {key: value for key, value in origin.items() if key != "params_md5"}  # a trial is not params.yaml
    tags["optuna.storage"] = tracking.redacted(url)
    shared = open_study(args.study, url, space, base, args.seed, experiment_id, tags, args.heartbeat)
    present = workers.Workers(shared.storage, shared.study_id(), shared.parent_run_id)
    with tracking.store_errors("joining the study's parent run"):
        present.join()  # the parent run is RUNNING from here until the last worker leaves
    objective = make_objective(shared, base, space, tags)
    mine: list[FrozenTrial] = []
    try:
        # a bar over this worker's trials on a terminal (a failed trial's line above it); a line per trial in logs
        with quiet.progress(args.trials, f"tune {args.study}", "trial") as step:

            def after(study: optuna.Study, trial: FrozenTrial) -> None:
                mine.append(trial)
                line = trial_line(study, trial)
                step(line, line.partition("; ")[2], trial.state.name == "FAIL")

            outage.optimize(shared, objective, args.trials, TRIAL_ERRORS, [after], url, args.wait)
    finally:
        with closing("closing the study's parent run"):
            try:
                update_parent(shared)
            finally:
                present.leave()  # the parent run ends FINISHED if no other worker is live
    print("\n".join(summary(shared.study, base)), flush=True)
    if mine and all(t.state.name == "FAIL" for t in mine):
        first = mine[0].user_attrs.get("fail_reason", "see its MLflow run")
        raise PipelineError(f"all {len(mine)} trials of this worker failed; the first: {first}")


def run() -> None:
    """The console script."""
    run_stage(lambda: main(sys.argv[1:]), interrupted=INTERRUPTED)
