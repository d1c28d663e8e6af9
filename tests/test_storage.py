"""pipeline/tune/storage.py on a real PostgreSQL: workers that create a new study database's tables at
the same moment all get the storage (the race forced: another worker's creation commits between this
one's look and its own creation)."""

from __future__ import annotations

import psycopg
import pytest
from postgres import PostgresServer
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ProgrammingError

from pipeline.tune.storage import _creation_race, open_storage
from pipeline.tune.study import close_stale_run

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # the heartbeat's


def test_the_losers_errors_of_a_creation_race_are_retried() -> None:
    duplicate = psycopg.errors.DuplicateObject('type "studydirection" already exists')
    assert _creation_race(ProgrammingError("CREATE TYPE studydirection", {}, duplicate))
    assert not _creation_race(ProgrammingError("SELECT", {}, psycopg.errors.UndefinedTable("no such table")))


@pytest.mark.e2e  # a real server
def test_workers_creating_the_tables_at_once_all_get_the_storage(postgres: PostgresServer) -> None:
    """Another worker's creation commits just after this one looked for Optuna's enum type and just
    before it creates it: the type "already exists", and this worker retries, then has the storage."""
    url = postgres.create_database("created_at_once")
    with psycopg.connect(url) as other:  # another worker, half-way through creating the tables
        other.execute("CREATE TYPE studydirection AS ENUM ('NOT_SET', 'MINIMIZE', 'MAXIMIZE')")

        def other_commits_now(conn: object, cursor: object, statement: str, *args: object) -> None:
            if statement.startswith("CREATE TYPE studydirection") and not other.closed:
                other.commit()
                other.close()

        event.listen(Engine, "before_cursor_execute", other_commits_now)
        try:
            storage = open_storage(url, close_stale_run)
        finally:
            event.remove(Engine, "before_cursor_execute", other_commits_now)
    assert other.closed  # the interleaving happened
    assert storage.get_all_studies() == []
    assert postgres.sql("SELECT count(*) FROM pg_tables WHERE tablename = 'studies'", "created_at_once") == "1"
