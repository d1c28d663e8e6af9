"""Quiet output: the libraries' known noise is hidden, everything else reaches the terminal as it comes."""

from __future__ import annotations

import io
import subprocess
import sys

from workspace import REPO

from pipeline import quiet

NOISE = "2026-12-01 14:00:00.000000: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:31] Could not find cuda drivers"


def test_known_noise_is_left_out_and_the_rest_passes() -> None:
    sink = io.BytesIO()
    quiet.pass_through(io.BytesIO(f"{NOISE}\nreal warning\n{NOISE}\nno newline at the end".encode()), sink)
    assert sink.getvalue() == b"real warning\nno newline at the end"


def run(code: str) -> subprocess.CompletedProcess[str]:
    prelude = "import os, sys\nfrom pipeline import quiet\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_what_c_code_writes_to_fd_2_is_filtered_in_order() -> None:
    done = run(
        "with quiet.filtered_stderr():\n"
        f"    os.write(2, b'{NOISE}\\n'); os.write(2, b'kept 1\\n'); print('kept 2', file=sys.stderr)\n"
        "print('after', file=sys.stderr)\n"
    )
    assert done.returncode == 0
    assert done.stderr == "kept 1\nkept 2\nafter\n"


def test_a_fatal_message_before_an_abort_reaches_the_terminal() -> None:
    """A C++ fatal check writes its reason to fd 2 and aborts the process: no Python cleanup runs."""
    done = run("with quiet.filtered_stderr():\n    os.write(2, b'F0000 check failed: out of memory\\n'); os.abort()\n")
    assert done.returncode < 0  # killed by SIGABRT
    assert "F0000 check failed: out of memory" in done.stderr
