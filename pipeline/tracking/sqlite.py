"""The local store's database file, checked before MLflow opens it: damaged, or held locked by another
process, each said in one line that names the file and what to do.

MLflow would fail on a damaged file with a long SQLAlchemy traceback, and wait silently on a locked one.
`check` reads the schema inside a write transaction that it rolls back at once: it needs the lock any
writer needs and reads what MLflow reads first. A lock held longer than a moment is said at once, with
the process that holds it where Linux tells (`/proc/locks`), and waited for up to the store's timeout.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

import psutil

from pipeline.errors import TrackingError, chain, escaped

log = logging.getLogger("pipeline.tracking")

SAY_AFTER = 2.0  # seconds of waiting for a lock before saying who holds it
_DAMAGED = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}
_LOCKED = {"SQLITE_BUSY", "SQLITE_LOCKED"}


def _reason(error: sqlite3.Error) -> str:
    return getattr(error, "sqlite_errorname", "") or type(error).__name__


def _attempt(connection: sqlite3.Connection, writing: bool) -> None:
    """Take the lock a writer (or a reader) needs and read the schema, then give the lock back."""
    connection.execute("BEGIN IMMEDIATE" if writing else "BEGIN")
    try:
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    finally:
        connection.execute("ROLLBACK")


def lock_holders(database: Path) -> list[str]:
    """The other processes holding a lock on `database` ("process 4242 (`sqlite3 mlflow.db`)"), from
    /proc/locks; empty where that is not known (not Linux, another machine on a network file system)."""
    try:
        status = database.stat()
        locks = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    inode = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    pids: list[int] = []
    for line in locks:
        fields = line.split()
        # "1: POSIX  ADVISORY  WRITE 4242 fe:00:2228227 1073741824 1073742335"; "->" marks a waiter
        if len(fields) >= 6 and "->" not in fields and fields[5] == inode and fields[4].isdigit():
            pids.append(int(fields[4]))
    return [f"process {pid}{_command(pid)}" for pid in dict.fromkeys(pids) if pid != os.getpid()]


def _command(pid: int) -> str:
    try:
        line = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""
    return f" (`{escaped(line[:100])}`)" if line else ""


def check(database: Path, wait: float, writing: bool = True) -> None:
    """Raise a TrackingError if the SQLite file `database` is damaged or cannot be used (written, with
    `writing`), or if another process holds it locked for more than `wait` seconds (saying who, after
    `SAY_AFTER`); nothing if the file does not exist yet (MLflow creates it)."""
    if not database.is_file():
        return
    url = f"file:{quote(str(database))}?mode={'rw' if writing else 'ro'}"
    try:
        with closing(sqlite3.connect(url, uri=True, timeout=SAY_AFTER, isolation_level=None)) as connection:
            try:
                _attempt(connection, writing)
            except sqlite3.OperationalError as error:
                if _reason(error) not in _LOCKED:
                    raise
                log.warning(
                    "%s is locked by %s; waiting up to %.0f s for it to be released",
                    database,
                    ", ".join(lock_holders(database)) or "another process",
                    wait,
                )
                connection.execute(f"PRAGMA busy_timeout = {int(max(wait - SAY_AFTER, 0) * 1000)}")
                _attempt(connection, writing)
    except sqlite3.Error as error:  # opening or reading it: damaged, locked past `wait`, not readable
        raise TrackingError(f"{unusable(database, error, wait)}. Nothing was changed.") from None


def problem(database: Path, error: sqlite3.Error, waited: float = 0) -> str | None:
    """What is wrong with the SQLite store and what to do, if it is damaged or locked; else None."""
    reason = _reason(error)
    if reason in _DAMAGED:
        return (
            f"the MLflow database {database} is damaged ({error}); restore it from a backup, or move it aside "
            f"to start a fresh store (`mv {database} {database}.damaged`; the runs it held are then no longer "
            "shown, their files stay in mlartifacts/)"
        )
    if reason in _LOCKED:
        holders = ", ".join(lock_holders(database)) or "another process"
        held = f" for more than {waited:.0f} s" if waited else ""
        return f"the MLflow database {database} is locked by {holders}{held}; let it finish or end it, then run again"
    return None


def unusable(database: Path, error: sqlite3.Error, waited: float = 0) -> str:
    """`problem`, or else that the file cannot be used and why."""
    return problem(database, error, waited) or (
        f"the MLflow database {database} cannot be used ({error}); check that the file and its folder are "
        "writable and that the disk has space"
    )


def cause(error: BaseException) -> sqlite3.Error | None:
    """The SQLite error behind an MLflow or SQLAlchemy error, if there is one."""
    return next((found for found in chain(error) if isinstance(found, sqlite3.Error)), None)
