"""The live workers of a study, registered in its Optuna storage, and the study's MLflow parent run that
follows them: RUNNING while any worker is live, FINISHED once the last one has left or died.

Each worker keeps a record (study user attribute `worker:<id>`: host, process, a heartbeat count, ended
or not), raises its count every BEAT_SECONDS from a thread and marks it ended when it leaves. A record
is dead once ended, once its process is gone (same host: at once, SIGKILL included), or once its count
stood still for GRACE_SECONDS of the reader's clock (another host). After each write of its own record
a worker settles the parent run: it writes the status the records call for until a read agrees. The
last write of a record is followed by its writer's reads, so once workers stop coming and going the run
is RUNNING exactly while one is live (tests/test_workers.py forces the interleavings).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline import tracking

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

log = logging.getLogger("pipeline.tune")

RECORD_PREFIX = "worker:"
BEAT_SECONDS = 5.0  # how often a worker's count rises (a write of a few bytes)
GRACE_SECONDS = 60.0  # a record elsewhere whose count stood still this long is a dead worker's
_POLL_SECONDS = 1.0


@dataclass
class Workers:
    """This worker's record among the study's, and the parent run they decide."""

    storage: BaseStorage
    study_id: int
    parent_run_id: str
    key: str = field(default_factory=lambda: f"{RECORD_PREFIX}{uuid.uuid4().hex}")
    beats: int = 0
    ended: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _seen: dict[str, tuple[Any, float]] = field(default_factory=dict)  # others' counts, and since when

    def _write(self) -> None:
        record = {**tracking.process_tags(), "beats": self.beats, "ended": self.ended}
        self.storage.set_study_user_attr(self.study_id, self.key, record)

    def join(self) -> None:
        """Register as live, make the parent run RUNNING, and keep the record's heartbeat."""
        self._write()
        self.settle()
        threading.Thread(target=self._beat, name=f"{self.key}-beat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_SECONDS):
            with self._lock, contextlib.suppress(Exception):  # a store that is away: the next beat tries
                if self._stop.is_set():
                    return
                self.beats += 1
                self._write()
                self.settle()

    def leave(self) -> str:
        """Mark the record ended, then settle the parent run; return the status it was left with."""
        self._stop.set()
        with self._lock:  # no beat can overwrite the ended record
            self.ended = True
            self._write()
        return self.settle()

    def live_others(self) -> list[str]:
        """The other workers that are live (asked once this one has left): records not ended whose
        process is not known dead. A record from another host is watched until its count rises (live)
        or stands still for the grace period (dead)."""
        here = tracking.process_tags()["host"]
        told = False
        while True:
            live, unsure = [], []
            for key, record in self.storage.get_study_user_attrs(self.study_id).items():
                if not key.startswith(RECORD_PREFIX) or key == self.key:
                    continue
                if record.get("ended") or tracking.process_ended(record):
                    continue
                beats, now = record.get("beats"), time.monotonic()
                seen, since = self._seen.setdefault(key, (beats, now))  # first seen: unsure
                if record.get("host") == here or beats != seen:  # alive here, or its count rose: live (for now)
                    self._seen[key] = (beats, now)
                    live.append(key)
                elif now - since < GRACE_SECONDS:
                    unsure.append(key)
            if not unsure:
                return live
            if not told:
                told = True
                log.info(
                    "waiting up to %.0f s for a sign of life from %d worker(s) on other machines, to know "
                    "whether the study's MLflow run ends with this one",
                    GRACE_SECONDS,
                    len(unsure),
                )
            time.sleep(_POLL_SECONDS)

    def settle(self) -> str:
        """Write the parent run's status that the records call for until a read agrees; return it."""
        while True:
            wanted = "RUNNING" if not self.ended or self.live_others() else "FINISHED"
            if tracking.run_status(self.parent_run_id) == wanted:
                return wanted
            if wanted == "RUNNING":
                tracking.reopen_run(self.parent_run_id)
            else:
                tracking.end_run(self.parent_run_id, "FINISHED")
