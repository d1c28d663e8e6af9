"""Which process owns something: a pid plus its start time names one process, even after the pid is reused.

A process killed outright (kill -9, the OOM killer, power loss) cannot clean up after itself: its MLflow
run stays RUNNING and its staged output files stay on disk. What it leaves carries its `owner()` token,
so a later process can tell leftovers of a dead process from the work of one still running (`gone`).
Both only see processes of this machine.
"""

from __future__ import annotations

import os

import psutil


def start(pid: int) -> str | None:
    """When a live process started, in hundredths of a second since boot (psutil's start time less its
    boot time, so a change of the clock changes neither): with the pid it names one process, even after
    the pid is reused. None if there is no such process, or it has ended (a zombie)."""
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else _since_boot(process)
    except psutil.Error:  # no such process, or another user's that this one may not inspect
        return None


def _since_boot(process: psutil.Process) -> str:
    return str(round((process.create_time() - psutil.boot_time()) * 100))


def gone(pid: int, started: str | None) -> bool:
    """Whether process `pid` (started at `started`, if known) has ended, or its pid now names another."""
    try:
        process = psutil.Process(pid)
        return process.status() == psutil.STATUS_ZOMBIE or started not in (None, _since_boot(process))
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # exists, another user's
        return False


def owner() -> str:
    """This process as a token for file names: `<pid>-<start>`."""
    return f"{os.getpid()}-{start(os.getpid())}"


def owner_gone(token: str) -> bool | None:
    """Whether the process an `owner()` token names has ended; None if `token` is not such a token."""
    pid, _, started = token.partition("-")
    if not pid.isdigit() or (started and not started.isdigit()):
        return None
    return gone(int(pid), started or None)
