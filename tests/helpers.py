"""Small pieces the tests share: waiting for a condition, and a pid that no process has."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    what: str,
    seconds: float = 30,
    *,
    process: subprocess.Popen[str] | None = None,
    every: float = 0.02,
) -> T:
    """Poll `condition` every `every` seconds until it returns something true, and return that. Fails
    the test after `seconds`, or as soon as `process` (the one that should bring it about) has exited."""
    deadline = time.monotonic() + seconds
    while not (result := condition()):
        assert process is None or process.poll() is None, f"exited before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(every)
    return result


def dead_pid() -> int:
    """The pid of a process that has run and been reaped: nothing has it now (pids are not reused at once)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
