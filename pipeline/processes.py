"""Which process owns something: a pid plus its start time names one process, even after the pid is reused.

A process killed outright (kill -9, the OOM killer, power loss) cannot clean up after itself: its MLflow
run stays RUNNING and its staged output files stay on disk. What it leaves carries its `owner()` token,
so a later process can tell leftovers of a dead process from the work of one still running (`gone`).
Both only see processes of this machine.
"""

from __future__ import annotations

import os
from pathlib import Path


def start(pid: int) -> str | None:
    """The start time of a live process (field 22 of /proc/<pid>/stat, clock ticks since boot): with the
    pid it names one process, even after the pid is reused. None if no such process, or no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return None if fields[0] == "Z" else fields[19]  # fields[0] is field 3, the state; Z: dead, not reaped


def gone(pid: int, started: str | None) -> bool:
    """Whether process `pid` (started at `started`, if known) has ended, or its pid now names another."""
    if Path("/proc/self/stat").exists():
        now = start(pid)
        return now is None or (started is not None and now != started)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, another user's
        return False
    return False


def owner() -> str:
    """This process as a token for file names: `<pid>-<start>`, or `<pid>` where there is no /proc."""
    pid = os.getpid()
    started = start(pid)
    return f"{pid}-{started}" if started else str(pid)


def owner_gone(token: str) -> bool | None:
    """Whether the process an `owner()` token names has ended; None if `token` is not such a token."""
    pid, _, started = token.partition("-")
    if not pid.isdigit() or (started and not started.isdigit()):
        return None
    return gone(int(pid), started or None)
