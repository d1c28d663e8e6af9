"""Quiet output: the libraries' known noise is hidden, everything else reaches the terminal as it comes."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

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


# --- the AVX-512 false alarm of XLA:CPU's cache loader -------------------------------------------

# What XLA:CPU (TensorFlow 2.21) prints on an AVX-512 machine (an AMD EPYC) when it loads a cache entry
# compiled on that same machine: one line per "missing" feature, each with both feature lists.
AVX512_HOST = (
    "prfchw,avx,aes,sahf,pclmul,crc32,xsaves,sse4.1,avx512ifma,xsave,sse4.2,invpcid,64bit,xsavec,"
    "avx512vpopcntdq,cmov,avx512vp2intersect,avx512cd,movbe,avxvnni,adx,avx2,vpclmulqdq,avx512vl,clflushopt,"
    "bmi,sse,gfni,xsaveopt,rdrnd,avx512f,avx512bf16,avx512vnni,cx8,avx512bw,sse3,fsgsbase,clzero,lzcnt,sha,"
    "ssse3,cx16,bmi2,fma,popcnt,f16c,avx512bitalg,clwb,mmx,sse2,rdseed,avx512vbmi2,rdpid,avx512vbmi,shstk,"
    "vaes,fxsr,avx512dq,sse4a"
)
AVX2_HOST = ",".join(feature for feature in AVX512_HOST.split(",") if not feature.startswith("avx512"))
COMPILED = (
    "+64bit,+adx,+aes,+avx,+avx2,+avx512bf16,+avx512bitalg,+avx512bw,+avx512cd,+avx512dq,+avx512f,"
    "+avx512ifma,+avx512vbmi,+avx512vbmi2,+avx512vl,+avx512vnni,+avx512vp2intersect,+avx512vpopcntdq,"
    "+avxvnni,+bmi,+bmi2,+clflushopt,+clwb,+clzero,+cmov,+crc32,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+gfni,"
    "+invpcid,+lzcnt,+mmx,+movbe,+pclmul,+popcnt,+prfchw,+rdpid,+rdrnd,+rdseed,+sahf,+sha,+shstk,+sse,+sse2,"
    "+sse3,+sse4.1,+sse4.2,+sse4a,+ssse3,+vaes,+vpclmulqdq,+xsave,+xsavec,+xsaveopt,+xsaves,"
    "+prefer-no-scatter,+prefer-no-gather,-amx-avx512,-amx-bf16,-amx-tile,-avx512fp16,-xop"
)


def aot_mismatch(feature: str, host: str = AVX512_HOST, spaces: str = "  ") -> str:
    """The cpu_aot_loader.cc line for one feature (TensorFlow 2.21 prints two spaces after "not")."""
    return (
        "E0000 00:00:1796134386.600341   18224 cpu_aot_loader.cc:220] Loading XLA:CPU AOT result. Target "
        f"machine feature {feature} is not{spaces}supported on the host machine. Machine type used for XLA:CPU "
        "compilation doesn't match the machine type for execution. Compile machine features: "
        f"[{COMPILED}] vs host machine features: [{host}]. This could lead to execution errors such as SIGILL."
    )


def through_filter(lines: list[str]) -> list[str]:
    """What the filter passes on of `lines`, as C++ code writes them."""
    sink = io.BytesIO()
    quiet.pass_through(io.BytesIO("".join(f"{line}\n" for line in lines).encode()), sink)
    return sink.getvalue().decode().splitlines()


def test_the_avx512_false_alarm_is_hidden() -> None:
    alarm = [aot_mismatch("+prefer-no-scatter"), aot_mismatch("+prefer-no-gather")]
    assert through_filter(alarm * 2) == []  # twice: as a rerun of the train stage printed it
    assert through_filter([aot_mismatch("+prefer-no-gather", spaces=" ")]) == []


def test_a_real_feature_mismatch_stays_loud() -> None:
    """An entry compiled with AVX-512, loaded on a CPU without it: every missing feature is shown, also
    among the false alarms."""
    real = [aot_mismatch(feature, host=AVX2_HOST) for feature in ("+avx512f", "+avx512bw")]
    alarm = [aot_mismatch("+prefer-no-scatter", host=AVX2_HOST)]
    assert through_filter([*alarm, *real]) == real
    assert through_filter([aot_mismatch("+amx-tile")]) == [aot_mismatch("+amx-tile")]


def test_progress_is_one_quiet_line_per_step_in_logs_and_a_bar_on_a_terminal() -> None:
    code = (
        "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "with quiet.progress(2, 'train', 'epoch') as step:\n"
        "    step('epoch 1/2: loss 1.0', 'loss 1.0', False)\n"
        "    step('trial 2: FAIL (diverged)', 'best so far 0.9', True)\n"
    )
    logged = run(code)  # stderr is a pipe, as in CI: lines, no bar
    assert logged.stderr.splitlines() == ["epoch 1/2: loss 1.0", "trial 2: FAIL (diverged)"]

    terminal, stderr = pty.openpty()  # stderr a terminal: a bar, and only the loud line printed above it
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns wide
    command = [sys.executable, "-c", "from pipeline import quiet\n" + code]
    with subprocess.Popen(command, cwd=REPO, stderr=stderr) as bar:
        os.close(stderr)
        shown = b""
        with contextlib.suppress(OSError):  # the terminal closes with the process
            while chunk := os.read(terminal, 1 << 16):
                shown += chunk
    os.close(terminal)
    text = shown.decode()
    assert bar.returncode == 0 and "train: 100%" in text and "2/2" in text, text
    assert "trial 2: FAIL (diverged)" in text and "epoch 1/2" not in text, text
