"""No password or token in a message or a log line: URLs of every scheme, query credentials, secret
environment variables, and every log record of the process."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from pipeline import secrets
from pipeline.secrets import redacted


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://alice:s3cret@127.0.0.1:9", "http://alice:***@127.0.0.1:9"),
        ("https://alice:s3cret@mlflow.example/api/2.0/x?y=1", "https://alice:***@mlflow.example/api/2.0/x?y=1"),
        ("https://ghp_T0KEN@mlflow.example", "https://***@mlflow.example"),  # a token as the user name
        (
            "postgresql+psycopg2://bob:pw@db.internal:5432/optuna",
            "postgresql+psycopg2://bob:***@db.internal:5432/optuna",
        ),
        ("http://alice:a/b+c@d=@host:9/x", "http://alice:***@host:9/x"),  # base64 holds "/" and "@"
        ("https://host/x?token=abc&n=1&X-Amz-Signature=f00", "https://host/x?token=***&n=1&X-Amz-Signature=***"),
        ("sqlite:////home/me@corp/repo/mlflow.db?timeout=60", "sqlite:////home/me@corp/repo/mlflow.db?timeout=60"),
        ("file:///srv/a@b/mlruns", "file:///srv/a@b/mlruns"),
        ("no url here, user@example.org", "no url here, user@example.org"),
        (
            "API request to http://alice:s3cret@127.0.0.1:9/api/2.0/mlflow/runs/get failed with exception x",
            "API request to http://alice:***@127.0.0.1:9/api/2.0/mlflow/runs/get failed with exception x",
        ),
        ("two: 'http://a:p1@h1' and (https://b:p2@h2)", "two: 'http://a:***@h1' and (https://b:***@h2)"),
    ],
)
def test_passwords_in_urls_are_hidden(text: str, shown: str) -> None:
    assert redacted(text) == shown


def test_values_of_secret_variables_are_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123456")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # a name, not a secret
    assert redacted("Bearer tok-123456 for alice, hunter2") == "Bearer *** for alice, ***"


@pytest.fixture
def redacting() -> Iterator[None]:
    plain = logging.getLogRecordFactory()
    secrets.redact_logging()
    yield
    logging.setLogRecordFactory(plain)


def test_every_log_record_is_redacted_whichever_logger(redacting: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    logging.getLogger("mlflow.utils.rest_utils").warning("retrying %s", "http://alice:s3cret@h:9/api")
    try:
        raise ConnectionError("HTTPConnectionPool for http://alice:s3cret@h:9")
    except ConnectionError:
        logging.getLogger("urllib3").exception("failed")
    text = caplog.text
    assert "s3cret" not in text
    assert "retrying http://alice:***@h:9/api" in text and "http://alice:***@h:9" in text


def test_a_malformed_log_call_is_left_to_logging(redacting: None) -> None:
    record = logging.getLogRecordFactory()("x", logging.INFO, __file__, 1, "%d", ("not a number",), None)
    assert record.msg == "%d"
