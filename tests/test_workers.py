"""The workers of a study and its MLflow parent run: RUNNING while any worker is live, FINISHED when the
last one leaves or dies, RUNNING again when a worker joins later.

Workers here are `tune.workers.Workers` in this process (each its own record) on a real SQLite Optuna
storage and a real SQLite MLflow store; interleavings are forced by holding one worker's thread at a
chosen step. A worker killed outright is a record whose process has really ended (this host) or whose
heartbeat count stands still (another host). The e2e tests at the end do the same with real
`mnist-tune` processes against an `mlflow server`, one held at its exit or killed with SIGKILL (the
command's helpers and fixtures are test_tune's).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_tune
from helpers import dead_pid
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from test_tune import QUICK_SET, STUDY, finish, held_at_exit, study_runs, tune, wait_for_file, wait_for_first_epoch

from pipeline import tracking
from pipeline.tune import workers
from pipeline.tune.workers import Workers

WAIT = 60.0
# the real command's fixtures, for this module's e2e tests: an `mlflow server` and a prepared clone
tune_env, workspace = test_tune.tune_env, test_tune.workspace


@pytest.fixture
def make_worker(store: str, tmp_path: Path) -> Callable[[], Workers]:
    """Workers of one study (its storage and its parent run, both fresh) as this process's threads."""
    storage = RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "s")
    parent = tracking.create_run(tracking.connect(), "s", tags={})
    return lambda: Workers(storage, study_id, parent)


def status(worker: Workers) -> str:
    return tracking.run_status(worker.parent_run_id)


@pytest.mark.parametrize("last", ["first", "second"])
def test_the_parent_run_ends_with_the_last_worker(make_worker: Callable[[], Workers], last: str) -> None:
    a, b = make_worker(), make_worker()
    a.join()
    b.join()
    first, second = (b, a) if last == "first" else (a, b)
    assert first.leave() == "RUNNING" and status(first) == "RUNNING"
    assert second.leave() == "FINISHED" and status(second) == "FINISHED"


def test_a_worker_joining_a_finished_study_reopens_it_while_it_works(make_worker: Callable[[], Workers]) -> None:
    a = make_worker()
    a.join()
    assert a.leave() == "FINISHED"
    later = make_worker()
    later.join()
    assert status(later) == "RUNNING"
    assert later.leave() == "FINISHED"


class Held:
    """Hold the calls of `function` made from the thread named `name`, once, until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any, function: str, name: str) -> None:
        self.reached, self.released = threading.Event(), threading.Event()
        original = getattr(module, function)

        def held(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread().name == name and not self.reached.is_set():
                self.reached.set()
                assert self.released.wait(WAIT)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, function, held)


def in_thread(name: str, step: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    answer: list[Any] = []
    thread = threading.Thread(target=lambda: answer.append(step()), name=name, daemon=True)
    thread.start()
    return thread, answer


def test_a_leaving_worker_acting_on_an_old_read_is_put_right(
    make_worker: Callable[[], Workers], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leaves, reads that nobody else is live and is held just before it writes FINISHED; B joins and
    finds the run RUNNING; A writes FINISHED, reads again, sees B and puts RUNNING back."""
    a, b = make_worker(), make_worker()
    a.join()
    hold = Held(monkeypatch, tracking, "end_run", "A")
    thread, answer = in_thread("A", a.leave)
    assert hold.reached.wait(WAIT)
    b.join()
    assert status(b) == "RUNNING"
    hold.released.set()
    thread.join(WAIT)
    assert answer == ["RUNNING"] and status(b) == "RUNNING"
    assert b.leave() == "FINISHED"


def test_a_worker_held_at_its_exit_while_the_other_finishes(
    make_worker: Callable[[], Workers], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A is held before it records that it leaves; B leaves meanwhile: the run stays RUNNING for A,
    which ends it when it leaves."""
    a, b = make_worker(), make_worker()
    a.join()
    b.join()
    hold = Held(monkeypatch, a, "_write", "A")
    thread, answer = in_thread("A", a.leave)
    assert hold.reached.wait(WAIT)
    assert b.leave() == "RUNNING"
    hold.released.set()
    thread.join(WAIT)
    assert answer == ["FINISHED"] and status(a) == "FINISHED"


def test_two_workers_leaving_at_once_end_it(
    make_worker: Callable[[], Workers], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both have recorded that they leave before either settles: both want FINISHED."""
    a, b = make_worker(), make_worker()
    a.join()
    b.join()
    hold = Held(monkeypatch, a, "settle", "A")
    thread, answer = in_thread("A", a.leave)
    assert hold.reached.wait(WAIT)
    assert b.leave() == "FINISHED"
    hold.released.set()
    thread.join(WAIT)
    assert answer == ["FINISHED"]


def record(worker: Workers, key: str, **fields: Any) -> None:
    """Another worker's record, as that worker wrote it last."""
    worker.storage.set_study_user_attr(worker.study_id, f"{workers.RECORD_PREFIX}{key}", {"ended": False, **fields})


def test_a_killed_worker_on_this_host_counts_as_dead_at_once(make_worker: Callable[[], Workers]) -> None:
    """SIGKILL leaves the record live; its process is gone, so the last live worker ends the run."""
    last = make_worker()
    last.join()
    record(last, "killed", host=socket.gethostname(), pid=str(dead_pid()), beats=7)
    assert last.leave() == "FINISHED"


def test_a_worker_elsewhere_counts_while_its_heartbeat_rises(
    make_worker: Callable[[], Workers], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "_POLL_SECONDS", 0.05)
    monkeypatch.setattr(workers, "GRACE_SECONDS", 5.0)
    last = make_worker()
    last.join()
    record(last, "elsewhere", host="another-machine", pid="1", beats=1)
    rising = threading.Timer(0.5, lambda: record(last, "elsewhere", host="another-machine", pid="1", beats=2))
    rising.start()
    assert last.leave() == "RUNNING"  # alive over there: it ends the run when it leaves
    rising.join()


def test_a_worker_elsewhere_is_dead_once_its_heartbeat_stood_still_for_the_grace_period(
    make_worker: Callable[[], Workers], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "_POLL_SECONDS", 0.05)
    monkeypatch.setattr(workers, "GRACE_SECONDS", 0.5)
    last = make_worker()
    last.join()
    record(last, "elsewhere", host="another-machine", pid="1", beats=3)
    assert last.leave() == "FINISHED"


def test_a_live_worker_puts_back_a_run_ended_under_it(
    make_worker: Callable[[], Workers], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever ended the run while this worker is live (one that misjudged it dead), its heartbeat
    re-opens it."""
    monkeypatch.setattr(workers, "BEAT_SECONDS", 0.05)
    worker = make_worker()
    worker.join()
    tracking.end_run(worker.parent_run_id, "FINISHED")
    reopened = threading.Event()
    for _ in range(200):
        if status(worker) == "RUNNING":
            reopened.set()
            break
        reopened.wait(0.05)
    assert reopened.is_set()
    assert worker.beats > 0
    assert worker.leave() == "FINISHED"


# --- real `mnist-tune` workers --------------------------------------------------------------------


@pytest.mark.e2e
def test_the_parent_run_ends_with_the_last_worker_not_the_first(
    workspace: Path, tune_env: dict[str, str], tmp_path: Path
) -> None:
    """Worker A has run its trial and is held at its exit; worker B runs its own trial and exits: the
    parent stays RUNNING for A, and ends FINISHED when A exits."""
    study, hold = f"{STUDY}-last", tmp_path / "hold"
    a = held_at_exit(workspace, tune_env, hold, "--study", study, "--trials", "1", *QUICK_SET)
    try:
        wait_for_file(hold.with_suffix(".reached"), a)
        finish(tune(workspace, tune_env, "--study", study, "--trials", "1", *QUICK_SET))
        parents, children = study_runs(tune_env, study)
        assert [p.info.status for p in parents] == ["RUNNING"]
        assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
        hold.with_suffix(".go").touch()
        finish(a)
    finally:
        if a.poll() is None:
            a.kill()
    parents, _ = study_runs(tune_env, study)
    assert [p.info.status for p in parents] == ["FINISHED"]


@pytest.mark.e2e
def test_a_worker_killed_with_sigkill_does_not_keep_the_parent_running(
    workspace: Path, tune_env: dict[str, str], tmp_path: Path
) -> None:
    """Worker A trains (200 epochs); worker B runs its trial and is held at its exit; A is killed with
    SIGKILL; B exits: it is the last live worker and ends the parent run."""
    study, hold = f"{STUDY}-sigkill", tmp_path / "hold"
    long = ["--set", "train.epochs=200", "--set", "model.hidden_units=[64,32]"]
    killed = tune(workspace, tune_env, "--study", study, "--trials", "1", *long)
    b = None
    try:
        wait_for_first_epoch(tune_env, study, killed)
        b = held_at_exit(workspace, tune_env, hold, "--study", study, "--trials", "1", *QUICK_SET)
        wait_for_file(hold.with_suffix(".reached"), b)
        killed.kill()
        killed.wait(timeout=60)
        hold.with_suffix(".go").touch()
        finish(b)
    finally:
        for process in (killed, b):
            if process is not None and process.poll() is None:
                process.kill()
    parents, children = study_runs(tune_env, study)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(c.info.status for c in children) == ["FINISHED", "RUNNING"]  # A's, until its heartbeat fails it
