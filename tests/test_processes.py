"""Which process owns something, and whether it still exists, also after its pid is reused."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline import processes


def test_this_process_is_alive_and_a_reaped_one_is_gone() -> None:
    assert processes.owner_gone(processes.owner()) is False
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    token = f"{child.pid}-{processes.start(child.pid) or 0}"
    child.wait()
    assert processes.owner_gone(token) is True


def test_a_reused_pid_names_another_process() -> None:
    pid = os.getpid()
    assert processes.gone(pid, processes.start(pid)) is False
    assert processes.gone(pid, "1") is True  # this pid, but another start time: the owner has ended


def test_what_is_not_an_owner_token_is_said_so() -> None:
    for token in ("notes", "12x-3", "-5", "", "12-ab"):
        assert processes.owner_gone(token) is None, token
