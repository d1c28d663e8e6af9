"""The SQL databases behind the stores (MLflow's `MLFLOW_TRACKING_URI=postgresql://...`, Optuna's
`OPTUNA_STORAGE`): the driver a URL needs, the URL as messages show it (never its password), engine
options that outlive a restart of the database server, and which errors mean that the server went away.

SQLAlchemy opens both; for `postgresql://` its default driver is psycopg 3, which the `team` extra
installs. A URL's password never reaches a message, a log line or a run's tags: every text shown is
passed through `secrets.redacted`, with the URL, which hides its password also where a driver quotes it
bare.
"""

from __future__ import annotations

import sys
from typing import Any

from pipeline.errors import TrackingError, chain, first_line
from pipeline.secrets import redacted

TEAM_EXTRA = 'pip install -c requirements.lock -e ".[team]"'
CONNECT_SECONDS = 10


def check_driver(url: str, setting: str) -> bool:
    """Whether `url` names a database that SQLAlchemy opens (postgresql://, mysql://, sqlite:///...), having
    failed with one sentence, before anything connects, if its driver is not installed (`setting` names
    where the URL came from: OPTUNA_STORAGE, --storage, ...). URLs that are not SQLAlchemy's (http://,
    file:, a bad URL) are left to their own checks: False."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        return False
    try:
        dialect.import_dbapi()
    except ImportError as error:
        module = error.name or parsed.get_driver_name()
        if parsed.get_backend_name() == "postgresql":
            fix = f"install the project's team extra: {TEAM_EXTRA}"
        else:
            fix = f"install the Python package of the {module} driver"
        raise TrackingError(
            f"{setting} {redacted(url)} needs the {parsed.get_backend_name()} driver {module}, which cannot be "
            f"imported ({redacted(str(error), url)}); {fix}."
        ) from None
    return True


def engine_options(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options for a store's URL. A server database checks each pooled connection
    before use (`pool_pre_ping`), so the connections that a restart of the server closed are replaced
    instead of failing the next query, and gives up connecting after CONNECT_SECONDS (a firewalled
    host would otherwise hang for minutes); SQLite waits for other writers instead of "database is
    locked"."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    options: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        options["connect_args"] = {"connect_timeout": CONNECT_SECONDS}
    return options


def unusable(url: str) -> str | None:
    """Why the database server of `url` cannot be used now (refused, timed out, a wrong password), in one
    line without the password; None if a connection opens."""
    import sqlalchemy
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    engine = sqlalchemy.create_engine(url, **engine_options(url))
    try:
        with engine.connect():
            return None
    except SQLAlchemyError as error:
        return redacted(first_line(error.orig if isinstance(error, DBAPIError) and error.orig else error), url)
    finally:
        engine.dispose()


def connection_lost(error: BaseException) -> str | None:
    """If `error` (or an error it was raised from) says the database server went away (refused the
    connection, closed it, is shutting down or starting up), the first line of what the driver said;
    else None. A wrong query, a bad password or a missing database are not that: waiting heals none."""
    from sqlalchemy.exc import DBAPIError

    for current in chain(error):
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return first_line(current.orig or current)
        if _server_gone(current):
            return first_line(current)
    return None


# SQLSTATE classes of a server going away: 08 connection exception, 57 operator intervention (57P01
# admin_shutdown on a restart, 57P03 cannot_connect_now while it starts up or shuts down)
_GONE_CLASSES = ("08", "57")
# What the server says, before any SQLSTATE, to a connection it cannot take yet or any more
_NOT_ACCEPTING = "the database system is"


def _server_gone(error: BaseException) -> bool:
    """A psycopg error with no answer from the server (refused, closed, reset), one of the SQLSTATEs of
    a server going away, or a refused connection "the database system is starting up" (shutting down,
    in recovery); not a refusal for a reason that waiting does not change (a wrong password)."""
    psycopg = sys.modules.get("psycopg")  # an error of psycopg's comes from where it is imported
    if psycopg is None or not isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
        return False
    if error.sqlstate:
        return error.sqlstate.startswith(_GONE_CLASSES)
    text = str(error)  # a failed connection carries no SQLSTATE: the server's refusal, if any, is in the text
    return "FATAL:" not in text or _NOT_ACCEPTING in text
