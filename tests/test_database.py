"""pipeline/database.py against a real PostgreSQL server (tests/postgres.py): which errors mean that the
server went away (and which do not), that pooled connections outlive a restart, that a password never
shows; and, in processes where the driver cannot be imported, the one `error:` line that names the
team extra, for OPTUNA_STORAGE and for MLFLOW_TRACKING_URI alike.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import sqlalchemy
from PIL import Image
from postgres import PASSWORD, ROLE, PostgresServer
from workspace import REPO, venv_env

from pipeline import database
from pipeline.errors import TrackingError
from pipeline.secrets import redacted

SECRET_URL = "postgresql://team:pa%3Ass@db.internal:5432/optuna"


def test_urls_and_messages_never_show_the_password() -> None:
    assert redacted(SECRET_URL) == "postgresql://team:***@db.internal:5432/optuna"
    assert redacted("https://me:token@mlflow.example") == "https://me:***@mlflow.example"
    # a lone user name is hidden too: in https://TOKEN@host it is the credential itself
    assert redacted("postgresql://team@db/optuna") == "postgresql://***@db/optuna"
    assert redacted("sqlite:////srv/optuna.db") == "sqlite:////srv/optuna.db"
    text = f"could not connect with password pa:ss to {SECRET_URL}"
    assert redacted(text, SECRET_URL) == (
        "could not connect with password *** to postgresql://team:***@db.internal:5432/optuna"
    )


def test_a_missing_driver_names_the_team_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails, as where it is not installed
    with pytest.raises(TrackingError) as error:
        database.check_driver(SECRET_URL, "OPTUNA_STORAGE")
    assert str(error.value) == (
        "OPTUNA_STORAGE postgresql://team:***@db.internal:5432/optuna needs the postgresql driver psycopg, which "
        "cannot be imported (import of psycopg halted; None in sys.modules); install the project's team extra: "
        'pip install -c requirements.lock -e ".[team]".'
    )
    database.check_driver("sqlite:///x.db", "OPTUNA_STORAGE")  # other URLs are not its business
    database.check_driver("http://127.0.0.1:5000", "MLFLOW_TRACKING_URI")


@pytest.mark.e2e  # a real server, or processes of their own
def test_errors_of_a_server_that_went_away(postgres: PostgresServer) -> None:
    url = postgres.create_database("gone")
    engine = sqlalchemy.create_engine(url)
    connection = engine.connect()
    postgres.restart()  # the server closes every connection: "terminating connection due to administrator command"
    with pytest.raises(sqlalchemy.exc.DBAPIError) as closed:
        connection.execute(sqlalchemy.text("select 1"))
    assert database.connection_lost(closed.value) == "terminating connection due to administrator command"
    postgres.stop()
    try:
        with pytest.raises(sqlalchemy.exc.OperationalError) as refused:
            engine.connect()
        assert "Connection refused" in (database.connection_lost(refused.value) or "")
        assert "Connection refused" in (database.unusable(url) or "")
    finally:
        postgres.start()
    assert database.unusable(url) is None
    # what waiting does not heal is not an outage
    wrong = f"postgresql://{ROLE}:wrong@127.0.0.1:{postgres.port}/gone"
    with pytest.raises(sqlalchemy.exc.OperationalError) as refused_login:
        sqlalchemy.create_engine(wrong).connect()
    assert database.connection_lost(refused_login.value) is None
    assert "password authentication failed" in (database.unusable(wrong) or "")
    with pytest.raises(sqlalchemy.exc.ProgrammingError) as bad_query, engine.connect() as fresh:
        fresh.execute(sqlalchemy.text("select * from no_such_table"))
    assert database.connection_lost(bad_query.value) is None
    assert database.connection_lost(ValueError("connection refused")) is None


@pytest.mark.e2e  # a real server, or processes of their own
def test_pooled_connections_outlive_a_restart_with_the_engine_options(postgres: PostgresServer) -> None:
    url = postgres.create_database("pooled")
    kept, plain = (sqlalchemy.create_engine(url, **options) for options in (database.engine_options(url), {}))
    for engine in (kept, plain):
        with engine.connect() as connection:  # one connection, back into the pool
            connection.execute(sqlalchemy.text("select 1"))
    postgres.restart()
    with kept.connect() as connection:  # pre-ping: the dead pooled connection is replaced
        assert connection.execute(sqlalchemy.text("select 1")).scalar() == 1
    with pytest.raises(sqlalchemy.exc.OperationalError), plain.connect() as connection:
        connection.execute(sqlalchemy.text("select 1"))  # without it the first query after a restart fails


# --- the commands, in processes where the driver is not installed ---------------------------------

# The installed console script, started in a process where `import psycopg` fails as it does where the
# package is not installed
WITHOUT_DRIVER = """
import importlib.abc, sys
from importlib.metadata import entry_points

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "psycopg":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
name = sys.argv[1]
sys.argv = sys.argv[1:]
entry_points(group="console_scripts")[name].load()()
"""
# docs/team.md's example URL: the driver is checked before anything connects
DOC_URL = "postgresql://team:change-me@db.internal:5432/optuna"


def without_driver(folder: Path, command: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_DRIVER, command, *args],
        cwd=folder,
        env=venv_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def documented_error() -> str:
    """The error line that docs/team.md shows for a missing driver."""
    text = (REPO / "docs/team.md").read_text()
    return next(line for line in text.splitlines() if line.startswith("error: OPTUNA_STORAGE"))


def assert_the_documented_line(done: subprocess.CompletedProcess[str], expected: str) -> None:
    assert done.returncode == 1, done.stderr
    assert (done.stdout, done.stderr) == ("", expected + "\n")
    assert "change-me" not in done.stderr


@pytest.mark.e2e  # a real server, or processes of their own
def test_mnist_tune_without_the_driver_is_the_documented_line(tmp_path: Path) -> None:
    done = without_driver(tmp_path, "mnist-tune", "--study", "s", "--trials", "1", OPTUNA_STORAGE=DOC_URL)
    assert_the_documented_line(done, documented_error())
    done = without_driver(tmp_path, "mnist-tune", "--study", "s", "--trials", "1", "--storage", DOC_URL)
    assert_the_documented_line(done, documented_error().replace("error: OPTUNA_STORAGE", "error: --storage"))


def a_digit(folder: Path) -> Path:
    """A PNG of a one, which mnist-predict reads before it asks the store for the model."""
    image = np.zeros((28, 28), np.uint8)
    image[8:20, 12:16] = 255
    Image.fromarray(image).save(folder / "digit.png")
    return folder / "digit.png"


@pytest.mark.e2e  # a real server, or processes of their own
def test_mlflow_tracking_uri_without_the_driver_is_one_line(tmp_path: Path) -> None:
    uri = DOC_URL.replace("/optuna", "/mlflow")
    done = without_driver(tmp_path, "mnist-predict", str(a_digit(tmp_path)), MLFLOW_TRACKING_URI=uri)
    expected = documented_error().replace("OPTUNA_STORAGE", "MLFLOW_TRACKING_URI").replace("/optuna", "/mlflow")
    assert_the_documented_line(done, expected)


# nothing listens on port 1; the password is the tests' own, to prove it never shows
UNREACHABLE = f"postgresql://{ROLE}:{quote(PASSWORD, safe='')}@127.0.0.1:1/db"


@pytest.mark.e2e  # a real server, or processes of their own
def test_an_unreachable_mlflow_database_is_one_line(tmp_path: Path) -> None:
    """With the driver: a database that refuses connections is one line in seconds, not MLflow's
    minutes of retries and a traceback."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mnist-predict"), str(a_digit(tmp_path))],
        cwd=tmp_path,
        env=venv_env(MLFLOW_TRACKING_URI=UNREACHABLE),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: the MLflow database postgresql://{ROLE}:***@127.0.0.1:1/db cannot be used (")
    assert "Connection refused" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert PASSWORD not in done.stderr and quote(PASSWORD, safe="") not in done.stderr


@pytest.mark.e2e  # a real server, and a process of its own
def test_mlflow_tracking_uri_may_name_the_database_itself(postgres: PostgresServer, tmp_path: Path) -> None:
    """MLflow opens its store in PostgreSQL directly (it creates its tables there); what it then says
    (no model registered yet) is one line that does not show the password."""
    url = postgres.create_database("direct")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mnist-predict"), str(a_digit(tmp_path))],
        cwd=tmp_path,
        env=venv_env(MLFLOW_TRACKING_URI=url),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    shown = f"postgresql://{ROLE}:***@127.0.0.1:{postgres.port}/direct"
    expected = f"error: cannot load the model models:/mnist-bn-mlp@champion from {shown} ("
    assert done.stderr.startswith(expected), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert PASSWORD not in done.stderr and quote(PASSWORD, safe="") not in done.stderr
    assert "alembic_version" in postgres.sql("SELECT tablename FROM pg_tables", "direct")
