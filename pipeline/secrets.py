"""What never reaches a message, a log line or a run's records: passwords and tokens.

They travel in URLs (`MLFLOW_TRACKING_URI=https://alice:s3cret@mlflow.example`, `OPTUNA_STORAGE=
postgresql://bob:pw@db/optuna`, `?token=...`) and in environment variables (`MLFLOW_TRACKING_TOKEN`).
`redacted` hides them in any text, URLs of every scheme alike (`https://alice:***@mlflow.example`); the
tracking boundary names every store through it (`tracking.redacted`), `errors.report` passes every
`error:` line through it, and `redact_logging` every log record, MLflow's and urllib3's included.
This module imports nothing of the package, so that the data stages can use it without depending on
the tracking code.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import unquote

HIDDEN = "***"
# scheme://userinfo@ : the userinfo runs to the last "@" before the query, so that a password holding
# "/" or "@" (a base64 token) is hidden whole; an authority-less URL (sqlite:///path, file:///path) has none.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s?#'\"][^\s?#'\"]*)@")
# query parameters whose value is a credential: ?token=..., &password=..., &X-Amz-Signature=...
_SECRET_PARAMETER = re.compile(
    r"(?P<name>[?&;][^=&#\s]*(?:pass|pwd|secret|token|key|signature|sig|credential|auth)[^=&#\s]*=)[^&#\s'\"]+",
    re.IGNORECASE,
)
# environment variables whose values are secrets wherever they appear
_SECRET_VARIABLE = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY")
_SHORTEST_SECRET = 4  # shorter values ("1", "true") would hide ordinary words


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    # `user:password@` keeps the user; a lone `token@` is hidden whole, it may be the credential itself
    return f"{match['scheme']}{user}:{HIDDEN}@" if colon else f"{match['scheme']}{HIDDEN}@"


def redacted(text: str, *urls: str) -> str:
    """`text` with the password of every URL in it, its credential query parameters and the values of
    secret environment variables (`MLFLOW_TRACKING_PASSWORD`, `..._TOKEN`, ...) replaced by `***`; and the
    password of each of `urls`, as written or percent-decoded, wherever it stands alone (a database
    driver's message quotes it bare, without its URL)."""
    text = _SECRET_PARAMETER.sub(rf"\g<name>{HIDDEN}", _USERINFO.sub(_userinfo, text))
    for name, value in os.environ.items():
        if len(value) >= _SHORTEST_SECRET and _SECRET_VARIABLE.search(name.upper()) and value in text:
            text = text.replace(value, HIDDEN)
    for url in urls:
        if (match := _USERINFO.search(url)) and (password := match["userinfo"].partition(":")[2]):
            text = text.replace(password, HIDDEN).replace(unquote(password), HIDDEN)
    return text


_plain_factory = logging.getLogRecordFactory()


def _redacting_factory(*args: object, **kwargs: object) -> logging.LogRecord:
    record = _plain_factory(*args, **kwargs)
    try:
        message = record.getMessage()
    except Exception:  # a library's malformed log call: logging itself reports it when the record is shown
        return record
    if (safe := redacted(message)) != message:
        record.msg, record.args = safe, ()
    if record.exc_info and not record.exc_text:  # a traceback's text: formatted here, redacted, then kept
        record.exc_text = redacted(logging.Formatter().formatException(record.exc_info))
    return record


def redact_logging() -> None:
    """Every log record of the process, whichever library or handler, redacted as it is made."""
    logging.setLogRecordFactory(_redacting_factory)
