"""The project's own errors, and the one place that turns them into a clear message for the user.

Every mistake a user can make (a bad params.yaml value, a missing file, a dead mirror, an unreachable
tracking server) raises a `PipelineError` whose text is one sentence saying what is wrong and how to
fix it. `run_stage` prints that sentence instead of a traceback and exits non-zero.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType

from pipeline.secrets import redact_logging, redacted


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


class StoreUnavailableError(TrackingError):
    """A store (MLflow's, Optuna's) went away for now: its server or its database is down or restarting.
    `reason` is the short why (`connection refused`); waiting may heal it, unlike other TrackingErrors."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ResourceError(PipelineError):
    """The machine lacks what the work needs: memory, disk space."""


class DivergedError(PipelineError):
    """The loss or the weights became NaN or infinite."""


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so cleanup runs as it does for Ctrl-C."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"terminated by signal {signum}")


def escaped(text: str, backslash: bool = True) -> str:
    r"""`text` with Python's string-literal escape for every character that is not printable (a tab `\t`,
    a newline `\n`, other controls `\x1b`, a byte of a file name that is not UTF-8 `\udcff`) and, with
    `backslash`, for the backslash itself (`\\`), so that any file name is one field of one line and
    decodes back to itself; printable characters (spaces, accents, any script) stay as they are. Each
    escape is the one `repr` writes for that character alone."""
    return "".join(
        char if char.isprintable() and not (backslash and char == "\\") else repr(char)[1:-1] for char in text
    )


def chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then each error behind it (`__cause__`, `__context__`, a SQLAlchemy error's `orig`), once
    each: where the translations of errors look for the one that says what happened."""
    seen: set[int] = set()
    pending: list[object] = [error]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseException) and id(current) not in seen:
            seen.add(id(current))
            yield current
            pending += [getattr(current, "orig", None), current.__context__, current.__cause__]


def first_line(error: BaseException) -> str:
    """The first line of an error's message (MLflow's and TensorFlow's `.message` where there is one),
    past SQLAlchemy's "(raised as a result of Query-invoked autoflush ...)" preamble; else its type's
    name. Without secrets: MLflow's messages hold the URL it called."""
    lines = redacted(str(getattr(error, "message", "") or error)).strip().splitlines()
    while len(lines) > 1 and lines[0].startswith("(raised as a result of"):
        lines = lines[1:]
    return lines[0] if lines else type(error).__name__


_NO_ANSWER = (  # (words in an error of `requests` or urllib3, what a message says)
    ("Connection refused", "connection refused"),
    ("timed out", "timed out"),
    ("Failed to resolve", "unknown host name"),
    ("CERTIFICATE_VERIFY_FAILED", "its TLS certificate is not trusted"),
)


def unanswered(error: BaseException) -> str:
    """Why an HTTP request got no answer ("connection refused", "timed out", ...), from the errors behind
    `error`; else its first line."""
    for found in chain(error):
        for marker, reason in _NO_ANSWER:
            if marker in str(found):
                return reason
    return first_line(error)[:200]


def report(error: PipelineError) -> None:
    """One `error:` line on stderr: how every command states a problem the user can fix. Whatever the
    message holds (a file name with a newline, say), it stays one line, and no password shows in it."""
    print(f"error: {escaped(redacted(str(error)), backslash=False)}", file=sys.stderr, flush=True)


def run_stage(main: Callable[[], None], interrupted: str = "outputs written before were left as they were") -> None:
    """Run a stage's (or a command's) `main`, turning expected failures into one line on stderr and an
    exit code; `interrupted` says what Ctrl-C or SIGTERM left behind."""
    redact_logging()
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
        print(f"error: interrupted (Ctrl-C); {interrupted}.", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print(f"error: terminated (SIGTERM); {interrupted}.", file=sys.stderr)
        sys.exit(143)
