"""Shared fixtures: real local HTTPS servers trusted by `requests`, a real SQLite MLflow store per test,
a real PostgreSQL server (tests/postgres.py); and quick XLA compilation for the trainings the tests run
in their own process. The repository root is `workspace.REPO`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from https_server import Certificate, HTTPSServer, make_certificate
from postgres import PostgresServer, start_server, unavailable
from workspace import FAST_COMPILE, QUICK_EPOCHS, reproduced, venv_env

# set before TensorFlow is imported; see workspace.FAST_COMPILE
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real SQLite store with MLflow's tables and nothing else, made once: creating the tables (all
    of MLflow's schema migrations) takes seconds."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(empty_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real SQLite store of its own for each test (a copy of the empty one), as MLFLOW_TRACKING_URI."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(empty_store, path)
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """One self-signed certificate for 127.0.0.1 per session (key generation is the slow part)."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def https_server(tls_certificate: Certificate, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], HTTPSServer]]:
    """Start any number of local HTTPS servers; `requests` trusts them and never goes through a proxy."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_certificate.cert_file))
    for variable in _PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers: list[HTTPSServer] = []

    def start() -> HTTPSServer:
        server = HTTPSServer(tls_certificate).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server per session (stopped and deleted at the end); tests create their own
    databases in it (`postgres.create_database(name)`) and may restart it (`postgres.restart()`)."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is None:
        unavailable('the PostgreSQL driver is not installed: pip install -c requirements.lock -e ".[team]"')
    server = start_server()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    """The environment the real commands run in: this venv's (`workspace.venv_env`)."""
    return venv_env()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """A fresh clone after one full `dvc repro` of a quick configuration (QUICK_EPOCHS of a [64, 32]
    network), once per module that asks (test_server and test_tune make their own)."""
    root = tmp_path_factory.mktemp("clone") / "repo"
    return reproduced(root, env=env, train__epochs=QUICK_EPOCHS, model__hidden_units=[64, 32])
