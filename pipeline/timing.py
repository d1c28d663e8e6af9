"""Where a stage's time goes: named phases, reported when the environment asks for them.

`with timing.phase("load data"):` adds the block's wall time to that phase. When `PIPELINE_TIMINGS`
names a file, each stage appends one JSON line to it at exit: the stage, its process's whole wall time
(interpreter start-up included), its phases and its peak resident memory. benchmarks/loop_speed.py
reads these lines; anyone can: `PIPELINE_TIMINGS=timings.jsonl dvc repro`.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

_phases: dict[str, float] = {}


def process_seconds() -> float:
    """Wall seconds since this process started: on Linux, where start times count from boot, by the boot
    clock (exact to the kernel's 10 ms ticks); elsewhere by the wall clock."""
    started = psutil.Process().create_time()
    if (clock := getattr(time, "CLOCK_BOOTTIME", None)) is None:
        return time.time() - started
    return time.clock_gettime(clock) - (started - psutil.boot_time())


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the block's wall time to the phase `name`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        record(name, time.perf_counter() - started)


def record(name: str, seconds: float) -> None:
    """Add a duration measured elsewhere (the training loop times its own epochs)."""
    _phases[name] = _phases.get(name, 0.0) + seconds


def report(stage: str) -> None:
    """Append this stage's figures to the file named by PIPELINE_TIMINGS, if it is set."""
    if not (target := os.environ.get("PIPELINE_TIMINGS")):
        return
    line = {
        "stage": stage,
        "process_seconds": round(process_seconds(), 3),
        "phases": {name: round(seconds, 3) for name, seconds in _phases.items()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    with Path(target).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")
