"""A trial's training in a fresh process, so that a worker runs any number of trials in flat memory.

TensorFlow keeps what each trial compiles (graphs, XLA programs) until its process ends, whatever the
trial frees; a process per trial gives all of it back. The worker sends the trial's params as one JSON
line (on stdin: not on the command line, where any user of the machine could read them) and reads one
JSON line per epoch, then the seconds trained or a PipelineError's name and message. The child has a
session of its own (Ctrl-C reaches only the worker, which ends it), and it stops as soon as the worker
goes away (its stdin closes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from pipeline import errors, io, quiet, runtime
from pipeline.config import Params, prepared_file, project_root
from pipeline.errors import PipelineError, ResourceError
from pipeline.fit import EpochResult, fit
from pipeline.model import check_fits_in_memory


def fit_apart(params: Params, on_epoch: Callable[[EpochResult], None]) -> tuple[list[EpochResult], float]:
    """Train `params`' network on the prepared splits in a child process: its history and seconds."""
    command = [sys.executable, "-m", "pipeline.tune.apart"]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    assert child.stdin and child.stdout
    try:
        child.stdin.write(params.model_dump_json().encode() + b"\n")
        child.stdin.flush()
        history: list[EpochResult] = []
        for line in child.stdout:
            message = json.loads(line)
            if "error" in message:
                kind = getattr(errors, message["error"], PipelineError)
                raise kind(message["message"])
            if "train_seconds" in message:
                return history, message["train_seconds"]
            history.append(EpochResult(message["epoch"], message["metrics"]))
            on_epoch(history[-1])
        if child.wait() == -signal.SIGKILL:  # what the kernel's out-of-memory killer sends
            raise ResourceError(
                "the trial's training process was killed (SIGKILL: the system's out-of-memory killer, most likely); "
                "use fewer or smaller hidden layers, or a smaller train.batch_size."
            )
        raise PipelineError(f"the trial's training process ended (exit status {child.returncode}); its error is above")
    finally:
        child.kill()
        child.wait()


def main() -> None:
    """The child: read the params, train, write the epochs and the outcome (stdout is the worker's pipe;
    anything a library prints goes to stderr)."""
    pipe = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    params = Params.model_validate_json(sys.stdin.readline())
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(1)), daemon=True).start()

    def send(**message: object) -> None:
        print(json.dumps(message), file=pipe, flush=True)

    quiet.configure_logging()
    try:
        runtime.import_tensorflow(project_root())
        train, validation = (io.load_split(prepared_file(split)) for split in ("train", "validation"))
        check_fits_in_memory(params.model, params.train.batch_size)
        with runtime.cache_errors_explained():
            fitted = fit(params.model, params.train, train, validation, lambda r: send(**vars(r)))
        send(train_seconds=fitted.train_seconds)
    except PipelineError as error:
        send(error=type(error).__name__, message=str(error))


if __name__ == "__main__":
    main()
