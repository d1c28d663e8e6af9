"""Optuna's storage of the studies: a database that every worker opens (SQLite by default, the team's
PostgreSQL for several machines), with heartbeats so that the trials of a dead worker are failed."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.config import project_root
from pipeline.errors import TrackingError
from pipeline.tracking import redacted

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial

HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
STORAGE_ATTEMPTS = 5


def storage_url(option: str | None) -> str:
    """--storage, else OPTUNA_STORAGE, else optuna.db at the repository root."""
    return option or os.environ.get("OPTUNA_STORAGE") or f"sqlite:///{project_root() / 'optuna.db'}"


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
    attempt = 1
    while True:
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=on_stale,
            )
        except Exception as error:  # SQLAlchemy and driver errors: a bad URL, a missing driver, a dead server
            if _creation_race(error) and attempt < STORAGE_ATTEMPTS:
                attempt += 1
                time.sleep(1.0)  # the other worker's tables are there now
                continue
            reason = (redacted(str(error)).strip().splitlines() or [type(error).__name__])[0]
            raise TrackingError(
                f"the Optuna storage {redacted(url)} cannot be opened ({reason}); fix --storage or OPTUNA_STORAGE."
            ) from None

