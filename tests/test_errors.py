"""One `error:` line whatever a message holds; file names written so that any of them reads back."""

from __future__ import annotations

import os
import subprocess
import sys

from hypothesis import given, strategies as st

from pipeline.errors import chain, escaped, first_line, unanswered


def decoded(text: str) -> str:
    """How a user reads an escaped name back in Python (documented in docs/serving.md)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def test_names_that_break_lines_or_fields_are_escaped() -> None:
    assert escaped("digit 7 é ü 数字.png") == "digit 7 é ü 数字.png"  # printable: as it is
    assert escaped("a\tb\nc\rd\x1be\\f\u2028g") == "a\\tb\\nc\\rd\\x1be\\\\f\\u2028g"
    assert escaped("a\\b\nc", backslash=False) == "a\\b\\nc"
    assert escaped(os.fsdecode(b"bad\xff.png")) == "bad\\udcff.png"  # a byte that is not UTF-8
    assert os.fsencode(decoded("bad\\udcff.png")) == b"bad\xff.png"


@given(st.text())
def test_every_text_is_one_printable_field_that_decodes_back(text: str) -> None:
    shown = escaped(text)
    assert shown.isprintable() and "\t" not in shown and "\n" not in shown
    assert len(shown.splitlines()) <= 1
    assert decoded(shown) == text


def test_an_error_about_a_name_with_a_newline_is_one_line() -> None:
    code = "from pipeline.errors import DataError, run_stage\n" + (
        "def fail():\n    raise DataError('a\\nb.png\\tis bad')\nrun_stage(fail)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == "error: a\\nb.png\\tis bad\n"


def test_chain_walks_causes_contexts_and_sqlalchemys_orig_once_each() -> None:
    """Real SQLAlchemy and sqlite3 errors: the driver's error behind SQLAlchemy's (`orig`), the error a
    handler raised from (`__cause__`) and the one it was handling (`__context__`); a cycle ends."""
    import sqlite3

    import sqlalchemy

    engine = sqlalchemy.create_engine("sqlite://")
    try:
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT * FROM missing"))
        except sqlalchemy.exc.OperationalError:
            try:
                raise KeyError("while handling")
            except KeyError as handled:
                raise RuntimeError("outer") from handled
    except RuntimeError as error:
        outer = error
    found = list(chain(outer))
    kinds = [type(e) for e in found]
    assert kinds[:2] == [RuntimeError, KeyError] and sqlalchemy.exc.OperationalError in kinds
    assert sqlite3.OperationalError in kinds and len(found) == len({id(e) for e in found})
    found[-1].__context__ = outer  # a cycle
    assert len(list(chain(outer))) == len(found)


def test_first_line_skips_sqlalchemys_preamble_and_hides_passwords() -> None:
    autoflush = "(raised as a result of Query-invoked autoflush; ...)\n(sqlite3.OperationalError) disk full\nmore"
    assert first_line(RuntimeError(autoflush)) == "(sqlite3.OperationalError) disk full"
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert "s3cret" not in first_line(RuntimeError("failed: http://alice:s3cret@host:5000/api"))


def test_why_an_http_request_got_no_answer_is_said_in_words() -> None:
    import requests
    from https_server import closed_port

    def reason(url: str) -> str:
        try:
            requests.get(url, timeout=5)
        except requests.RequestException as error:
            return unanswered(error)
        raise AssertionError(f"{url} answered")

    with closed_port() as port:
        assert reason(f"http://127.0.0.1:{port}/") == "connection refused"
    assert reason("http://no-such-host.invalid/") == "unknown host name"
    assert unanswered(ValueError("first line\nsecond")) == "first line"
