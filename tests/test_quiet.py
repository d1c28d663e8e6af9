"""quiet.filtered_stderr: the known noise written to file descriptor 2 is hidden, everything else kept."""

from __future__ import annotations

import os

import pytest

from pipeline import quiet

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


def through_filter(lines: list[str], capfd: pytest.CaptureFixture[str]) -> list[str]:
    """What reaches the terminal of `lines` written straight to fd 2 (as C++ code does) inside the filter."""
    capfd.readouterr()
    with quiet.filtered_stderr():
        os.write(2, "".join(f"{line}\n" for line in lines).encode())
    return capfd.readouterr().err.splitlines()


@pytest.fixture(autouse=True)
def not_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quiet, "VERBOSE", False)


def test_the_avx512_false_alarm_is_hidden(capfd: pytest.CaptureFixture[str]) -> None:
    alarm = [aot_mismatch("+prefer-no-scatter"), aot_mismatch("+prefer-no-gather")]
    assert through_filter(alarm * 2, capfd) == []  # twice: as a rerun of the train stage prints it
    assert through_filter([aot_mismatch("+prefer-no-gather", spaces=" ")], capfd) == []


def test_a_real_feature_mismatch_stays_loud(capfd: pytest.CaptureFixture[str]) -> None:
    """An entry compiled with AVX-512, loaded on a CPU without it: every missing feature is shown, also
    among the false alarms."""
    real = [aot_mismatch(feature, host=AVX2_HOST) for feature in ("+avx512f", "+avx512bw")]
    alarm = [aot_mismatch("+prefer-no-scatter", host=AVX2_HOST)]
    assert through_filter([*alarm, *real], capfd) == real
    assert through_filter([aot_mismatch("+amx-tile")], capfd) == [aot_mismatch("+amx-tile")]


def test_other_lines_are_kept_and_known_noise_hidden(capfd: pytest.CaptureFixture[str]) -> None:
    noise = "I0000 00:00:1796134386.1   18224 cpu_feature_guard.cc:227] This TensorFlow binary is optimized ..."
    warning = "W0000 00:00:1796134386.2   18224 some_op.cc:12] a real warning"
    assert through_filter([noise, warning, "Traceback (most recent call last):"], capfd) == [
        warning,
        "Traceback (most recent call last):",
    ]
