"""The project's own errors, and the one place that turns them into a clear message for the user.

Every mistake a user can make (a bad params.yaml value, a missing file, a dead mirror, an unreachable
tracking server) raises a `PipelineError` whose text is one sentence saying what is wrong and how to
fix it. `run_stage` prints that sentence instead of a traceback and exits non-zero.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType


class PipelineError(Exception):
    """A problem the user can fix; its message says what is wrong and how."""


class UsageError(PipelineError):
    """The command line is wrong (a missing argument, an unknown option)."""


class ConfigError(PipelineError):
    """params.yaml is not valid YAML or breaks the schema."""


class DataError(PipelineError):
    """An input file is missing, corrupt or could not be downloaded."""


class TrackingError(PipelineError):
    """The MLflow tracking store cannot be reached or used."""


class ResourceError(PipelineError):
    """The machine lacks what the work needs: memory, disk space."""


class DivergedError(PipelineError):
    """The loss or the weights became NaN or infinite."""


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so cleanup runs as it does for Ctrl-C."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"terminated by signal {signum}")


def report(error: PipelineError) -> None:
    """One `error:` line on stderr: how every command states a problem the user can fix."""
    print(f"error: {error}", file=sys.stderr, flush=True)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`, turning expected failures into one line on stderr and an exit code."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    # Ctrl-C interrupts a stage even when it was started with SIGINT ignored (as shells and CI
    # runners do for background jobs), so an interruption always ends the MLflow run as KILLED.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except PipelineError as error:
        report(error)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); outputs written before were left as they were.", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("error: terminated (SIGTERM); outputs written before were left as they were.", file=sys.stderr)
        sys.exit(143)
