"""The command lines of `mnist-predict`, `mnist-tune` and `mnist-recipe`: one parser for all of them."""

from __future__ import annotations

import argparse
from typing import NoReturn

from pipeline.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a wrong command line is a user mistake like any other: one `error:` line
    with the usage on the same line, no usage dump."""

    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().removeprefix("usage: ").split())  # one line, however wide
        raise UsageError(f"{message}; usage: {usage}")


def positive(text: str) -> int:
    """A whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def seed(text: str) -> int:
    """A whole number from 0 to 2^32-1."""
    if not text.isdigit() or int(text) >= 2**32:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 2^32-1, got {text!r}")
    return int(text)
