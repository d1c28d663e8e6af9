"""Optuna's storage of the studies: a database that every worker opens (SQLite by default, the team's
PostgreSQL for several machines), with heartbeats so that the trials of a dead worker are failed.

A worker records a heartbeat for its trial every `--heartbeat` seconds; a trial whose heartbeat is
older than GRACE_BEATS of them is failed by the next worker that starts a trial (the workers of one
study should use the same value). A heartbeat that cannot be recorded while the database restarts is
skipped, not fatal: the next one is recorded when it is back.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline import database
from pipeline.config import project_root
from pipeline.errors import TrackingError, first_line
from pipeline.tracking import redacted

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial

HEARTBEAT_SECONDS = 30
GRACE_BEATS = 4  # a trial is stale after this many heartbeats missed: 120 s with the default
STORAGE_ATTEMPTS = 5

DEFAULT_SETTING = "the default storage"
T = TypeVar("T")


def storage_url(option: str | None) -> tuple[str, str]:
    """The storage URL (--storage, else OPTUNA_STORAGE, else optuna.db at the repository root) and
    where it came from, as messages name it."""
    if option:
        return option, "--storage"
    if env := os.environ.get("OPTUNA_STORAGE"):
        return env, "OPTUNA_STORAGE"
    return f"sqlite:///{project_root() / 'optuna.db'}", DEFAULT_SETTING


def poll(attempt: Callable[[], T], seconds: float, every: float) -> T | None:
    """`attempt()`'s first true answer (one that raises is false), tried every `every` seconds for up to
    `seconds`; None if none came."""
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(Exception):
            if answer := attempt():
                return answer
        if time.monotonic() >= deadline:
            return None
        time.sleep(every)


def _creation_race(error: Exception) -> bool:
    """Two workers creating the tables of a new database at once: the loser's error, worth a retry
    (SQLite: locked, or the table already exists; PostgreSQL: a duplicate row in its catalog, or the
    type of Optuna's enum columns created since it looked)."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    text = str(error)
    return isinstance(error, IntegrityError) or (
        isinstance(error, (OperationalError, ProgrammingError)) and ("already exists" in text or "locked" in text)
    )


def _storage_class() -> type[RDBStorage]:
    from optuna.storages import RDBStorage

    class Storage(RDBStorage):
        """RDBStorage whose heartbeat thread outlives a restart of the database: a beat that cannot be
        recorded because the server went away is skipped (Optuna's thread would die with a traceback)."""

        def record_heartbeat(self, trial_id: int) -> None:
            try:
                super().record_heartbeat(trial_id)
            except Exception as error:
                if database.connection_lost(error) is None:
                    raise

    return Storage


def open_storage(
    url: str, on_stale: Callable[[optuna.Study, FrozenTrial], None], heartbeat: int = HEARTBEAT_SECONDS
) -> RDBStorage:
    """Optuna's RDBStorage with heartbeats; a database that cannot be opened is one sentence."""
    options: dict[str, Any] = database.engine_options(url)
    attempt = 1
    while True:
        try:
            return _storage_class()(
                url,
                engine_kwargs=options,
                heartbeat_interval=heartbeat,
                grace_period=GRACE_BEATS * heartbeat,
                heartbeat_stale_trial_callback=on_stale,
            )
        except Exception as error:  # SQLAlchemy and driver errors: a bad URL, a dead server
            if not _creation_race(error) or attempt == STORAGE_ATTEMPTS:
                reason = first_line(error.__cause__ if isinstance(error.__cause__, Exception) else error)
                raise TrackingError(
                    f"the Optuna storage {redacted(url)} cannot be opened ({redacted(reason, url)}); "
                    "fix --storage or OPTUNA_STORAGE."
                ) from None
            attempt += 1
            time.sleep(1.0)  # the other worker's tables are there now
