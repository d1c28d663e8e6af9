"""The `champion` alias under concurrency: trainings that finish together promote at the same moment, and
the champion must still end as the version with the best validation accuracy (the earliest of equals).

Each interleaving is forced, not hoped for: a promoter runs in a thread of its own and is held at a
chosen point (just before its first alias write, after it has read the versions and the alias) while
the other one runs, then released. The same schedules run on the real SQLite store and on a real
`mlflow server` process. `benchmarks/champion_race.py` replays the unforced race between two processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pytest
import sqlalchemy
from mlflow import MlflowClient
from workspace import venv_env

from pipeline import tracking
from pipeline.tracking import registry

WAIT = 60.0  # seconds a held step may wait for the other promoter before the test fails


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` process (SQLite backend, served artifacts) for this module's server cases."""
    from test_server import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("registry-server"), venv_env()) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.e2e)])
def registry_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store with the experiment and an empty registered model: a fresh SQLite file, or the server's
    (its registered model deleted and made anew for each test)."""
    if request.param == "sqlite":
        uri = request.getfixturevalue("store")
    else:
        uri = request.getfixturevalue("server_url")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.connect()
    client = MlflowClient()
    if request.param == "server" and client.search_registered_models(f"name = '{registry.REGISTERED_MODEL}'"):
        client.delete_registered_model(registry.REGISTERED_MODEL)
    client.create_registered_model(registry.REGISTERED_MODEL)
    return str(uri)


def register(accuracies: list[float]) -> list[tuple[str, str]]:
    """A finished run and a model version of it per accuracy, as trainings leave them before promoting."""
    client = MlflowClient()
    experiment_id = tracking.connect()
    made = []
    for _ in accuracies:
        run_id = tracking.create_run(experiment_id, "training", tags={})
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        version = client.create_model_version(registry.REGISTERED_MODEL, source=source, run_id=run_id)
        made.append((run_id, str(version.version)))
    return made


def champion() -> str:
    return str(MlflowClient().get_model_version_by_alias(registry.REGISTERED_MODEL, registry.CHAMPION).version)


@dataclass
class Hold:
    """A point where a thread stops until released: `reached` when it gets there."""

    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def stop_here(self) -> None:
        self.reached.set()
        assert self.released.wait(WAIT), "the held promoter was never released"

    def release(self) -> None:
        self.released.set()


class HeldAliasWrites:
    """Holds the promoters of chosen threads at their first alias write, after their read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, names: list[str]) -> None:
        self.holds = {name: Hold() for name in names}
        original = MlflowClient.set_registered_model_alias

        def write(client: MlflowClient, *args: Any, **kwargs: Any) -> None:
            hold = self.holds.get(threading.current_thread().name)
            if hold is not None and not hold.reached.is_set():
                hold.stop_here()
            original(client, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, "set_registered_model_alias", write)

    def __getitem__(self, name: str) -> Hold:
        return self.holds[name]


class Promoter(threading.Thread):
    """`promote_if_better` of one training in a thread named after it; its answer or error kept."""

    def __init__(self, name: str, run_id: str, accuracy: float) -> None:
        super().__init__(name=name, daemon=True)
        self.run_id, self.accuracy = run_id, accuracy
        self.answer: bool | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.answer = registry.promote_if_better(self.run_id, self.accuracy)
        except BaseException as error:  # re-raised in the test's thread by `finish`
            self.error = error

    def finish(self) -> bool:
        self.join(WAIT)
        assert not self.is_alive(), f"promoter {self.name} did not finish"
        if self.error is not None:
            raise self.error
        assert self.answer is not None
        return self.answer


def expected_champion(accuracies: list[float], versions: list[str]) -> str:
    """The best accuracy, the earliest version of equals: what a one-at-a-time promotion gives."""
    return max(zip(accuracies, versions, strict=True), key=lambda pair: (pair[0], -int(pair[1])))[1]


ACCURACIES = [(0.95, 0.90), (0.90, 0.95), (0.95, 0.95)]
ACCURACY_IDS = ["first-better", "second-better", "tie"]


def held_while_other_completes(holds: HeldAliasWrites, a: Promoter, b: Promoter) -> None:
    """`a` reads, is held before writing while `b` runs to the end, then `a` writes what it read."""
    holds[b.name].release()  # `b` passes its hold without stopping
    a.start()
    assert holds[a.name].reached.wait(WAIT)
    b.start()
    b.join(WAIT)
    holds[a.name].release()


def both_held_released_in_start_order(holds: HeldAliasWrites, a: Promoter, b: Promoter) -> None:
    """Both read before either writes (`b` after `a`'s tag); `a` writes first."""
    both_held(holds, a, b, [a, b])


def both_held_released_in_reverse(holds: HeldAliasWrites, a: Promoter, b: Promoter) -> None:
    """Both read before either writes; `b` writes first, `a` last with what it read before `b`'s tag."""
    both_held(holds, a, b, [b, a])


def both_held(holds: HeldAliasWrites, a: Promoter, b: Promoter, order: list[Promoter]) -> None:
    a.start()
    assert holds[a.name].reached.wait(WAIT)
    b.start()
    assert holds[b.name].reached.wait(WAIT)
    for promoter in order:
        holds[promoter.name].release()
        promoter.join(WAIT)


SCHEDULES: list[Callable[[HeldAliasWrites, Promoter, Promoter], None]] = [
    held_while_other_completes,
    both_held_released_in_start_order,
    both_held_released_in_reverse,
]


# The inner loop runs the schedule (the worse version read before the better one was tagged, and
# written last) and a tie; the full run every schedule, order and outcome, on both stores.
INNER_LOOP = {
    ("first-better", "second", "held_while_other_completes"),
    ("tie", "first", "both_held_released_in_reverse"),
}
CASES = [
    pytest.param(
        accuracies,
        held_first,
        schedule,
        id=f"{outcome}-{held_first}-held-{schedule.__name__}",
        marks=() if (outcome, held_first, schedule.__name__) in INNER_LOOP else pytest.mark.e2e,
    )
    for accuracies, outcome in zip(ACCURACIES, ACCURACY_IDS, strict=True)
    for held_first in ("first", "second")
    for schedule in SCHEDULES
]


@pytest.mark.parametrize(("accuracies", "held_first", "schedule"), CASES)
def test_champion_is_the_best_version_in_every_interleaving(
    registry_store: str,
    monkeypatch: pytest.MonkeyPatch,
    schedule: Callable[[HeldAliasWrites, Promoter, Promoter], None],
    held_first: str,
    accuracies: tuple[float, float],
) -> None:
    """Two versions promoted at once (the second registered after the first); whichever starts first
    reads before the other has tagged its version. The alias ends on the best, and each promoter says
    whether its own version is the champion."""
    (run_1, version_1), (run_2, version_2) = register(list(accuracies))
    promoters = {"first": Promoter("first", run_1, accuracies[0]), "second": Promoter("second", run_2, accuracies[1])}
    a = promoters[held_first]
    b = promoters["second" if held_first == "first" else "first"]
    holds = HeldAliasWrites(monkeypatch, [a.name, b.name])
    schedule(holds, a, b)
    answers = {name: promoter.finish() for name, promoter in promoters.items()}
    best = expected_champion(list(accuracies), [version_1, version_2])
    assert champion() == best
    assert answers == {"first": best == version_1, "second": best == version_2}


@pytest.mark.e2e  # a demonstration: the full run
def test_the_old_read_compare_set_loses_this_interleaving(registry_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The schedule of the issue, against the rule promote_if_better replaced (compare with the champion's
    tag, then move the alias): the held 0.90 version ends as champion. It is what the tests above guard."""

    def read_compare_set(run_id: str, val_accuracy: float) -> bool:
        client = MlflowClient()
        version = str(registry._version_of(run_id).version)
        client.set_model_version_tag(registry.REGISTERED_MODEL, version, "val_accuracy", f"{val_accuracy:.6f}")
        aliases = client.get_registered_model(registry.REGISTERED_MODEL).aliases
        best = -1.0
        if registry.CHAMPION in aliases:
            held = client.get_model_version(registry.REGISTERED_MODEL, str(aliases[registry.CHAMPION]))
            best = float(held.tags.get("val_accuracy", "-1"))
        if val_accuracy <= best:
            return False
        client.set_registered_model_alias(registry.REGISTERED_MODEL, registry.CHAMPION, version)
        return True

    monkeypatch.setattr(registry, "promote_if_better", read_compare_set)
    (run_1, _), (run_2, version_2) = register([0.95, 0.90])
    worse, better = Promoter("worse", run_2, 0.90), Promoter("better", run_1, 0.95)
    holds = HeldAliasWrites(monkeypatch, ["worse", "better"])
    held_while_other_completes(holds, worse, better)
    assert (worse.finish(), better.finish()) == (True, True)
    assert champion() == version_2  # the worse one: why the rule changed


@pytest.mark.e2e
def test_two_first_promoters_creating_the_alias_at_once(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No champion yet: B has found no alias row and is about to insert one when A inserts and commits
    its own; the store refuses B's row (a unique key). B reads again and ends on the best. Forced in
    the store's own SQL, so SQLite only (a server runs the same statements)."""
    tracking.connect()
    MlflowClient().create_registered_model(registry.REGISTERED_MODEL)
    (run_1, version_1), (run_2, _) = register([0.95, 0.90])
    hold = Hold()

    def before_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        inserting = statement.startswith("INSERT INTO registered_model_aliases")
        if threading.current_thread().name == "B" and inserting and not hold.reached.is_set():
            hold.stop_here()

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", before_execute)
    try:
        b, a = Promoter("B", run_2, 0.90), Promoter("A", run_1, 0.95)
        b.start()
        assert hold.reached.wait(WAIT)
        a.start()
        assert a.finish() is True
        hold.release()
        assert b.finish() is False
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", before_execute)
    assert champion() == version_1


@pytest.mark.e2e
def test_versions_without_a_readable_accuracy_never_take_the_alias(registry_store: str, tmp_path: Path) -> None:
    """A version registered by hand (no tag) or tagged by hand with text is no candidate, and blocks none."""
    (_, untagged), (_, by_hand), (run_id, tagged) = register([0.0, 0.0, 0.5])
    MlflowClient().set_model_version_tag(registry.REGISTERED_MODEL, by_hand, "val_accuracy", "best")
    assert registry.promote_if_better(run_id, 0.5) is True
    assert champion() == tagged
    assert {untagged, by_hand}.isdisjoint({champion()})
    assert mlflow.MlflowClient().get_model_version(registry.REGISTERED_MODEL, untagged).tags == {}


@pytest.mark.parametrize("written", ["nan", "inf", "NaN"])
def test_a_tag_that_is_not_a_finite_number_never_takes_the_alias(store: str, written: str) -> None:
    """A `val_accuracy` tag edited to `nan` (compares false both ways) or `inf` (beats every accuracy), on a
    version before and one after the real one, is no candidate: the finite best wins."""
    tracking.connect()
    MlflowClient().create_registered_model(registry.REGISTERED_MODEL)
    (_, before), (run_id, tagged), (_, after) = register([0.0, 0.5, 0.0])
    for version in (before, after):
        MlflowClient().set_model_version_tag(registry.REGISTERED_MODEL, version, "val_accuracy", written)
    assert registry.promote_if_better(run_id, 0.5) is True
    assert champion() == tagged
