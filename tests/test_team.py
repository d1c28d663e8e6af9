"""A team's day, for real, as docs/team.md tells it (tests/teamday.py reads the commands from the page).

One real PostgreSQL server (tests/postgres.py) with the page's role and three databases; the page's
`mlflow server` on MLflow's database with served artifacts and MLflow's authentication (its users in
`mlflow_auth`; everyone logs in as the page's user, granted as the page says); Optuna's studies in the
other database.
Alice and Bob are two clones of the repository standing for two machines (a bare git repository for the
team's git server, a shared folder for the DVC remote), Carol a newcomer. Alice trains and pushes; Bob
pulls, trains an experiment and pushes it; Alice pulls the experiment and opens its MLflow run; Carol
gets the model byte for byte. Then four `mnist-tune` workers (two per machine) share one study while
PostgreSQL is restarted under them and one of them is killed with SIGKILL mid-trial: the study's
numbering, its runs and everything finished before the restart are checked, and that no output shows
the password. Trainings are tiny (2 epochs of a small network); the day's figures are in
docs/performance.md.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from helpers import wait_for
from postgres import PASSWORD, PostgresServer, literal
from teamday import (
    GRACE,
    MAX_DOWN,
    PAGE,
    STUDY,
    WORKER_TRIALS,
    Team,
    TeamDoc,
    Worker,
    client,
    finished_so_far,
    git_identity,
    locked_md5,
    md5,
    optuna_trials,
    parent_status,
    start_worker,
    started,
    training,
)
from test_server import Process
from test_tune import study_runs
from workspace import QUICK, clone, free_port, sh, venv_env

pytestmark = pytest.mark.e2e

EXPERIMENT = "lr-005"
ADMIN_PASSWORD, USER_PASSWORD = "admin-Pw-4711", "alice-Pw-0815"  # the tracking server's admin, and its user
SECRETS = (PASSWORD, quote(PASSWORD, safe=""), ADMIN_PASSWORD, USER_PASSWORD)
SHOWN_OPTUNA = "postgresql://team:***@db.internal:5432/optuna"  # the page's URL as workers print it


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[Team]:
    """The page's database (its SQL), its tracking server and its two URLs."""
    root = tmp_path_factory.mktemp("team")
    port = free_port()
    places = {
        "db.internal:5432": f"127.0.0.1:{postgres.port}",
        "change-me": quote(PASSWORD, safe=""),
        "http://mlflow.team.example:5000": f"http://127.0.0.1:{port}",
        "/srv/mlflow-artifacts": str(root / "mlflow-artifacts"),
        "/mnt/team/mnist-dvc": str(root / "mnist-dvc"),
        "git.team.example:ml/mnist.git": str(root / "mnist.git"),
        "/srv/mlflow/auth.ini": str(root / "auth.ini"),
        "change-admin": ADMIN_PASSWORD,
        "alice-secret": USER_PASSWORD,
    }
    doc = TeamDoc(places, {"5000": str(port)})
    for statement in doc.sql(literal(PASSWORD)):
        postgres.sql(statement)
    (root / "auth.ini").write_text(doc.ini())
    env = venv_env()
    server_env = dict(env)
    team = Team(root, doc, postgres, f"http://127.0.0.1:{port}", server_env, root / "mlflow-server.log")
    team.run("export MLFLOW_AUTH_CONFIG_PATH=/srv/mlflow/auth.ini", root)
    team.run("export MLFLOW_AUTH_ADMIN_PASSWORD=change-admin", root)
    team.run("export MLFLOW_FLASK_SERVER_SECRET_KEY=change-this-key", root)
    command = doc(
        "mlflow server --app-name basic-auth --host 127.0.0.1 --port 5000 --workers 2 "
        "--backend-store-uri postgresql://team:change-me@db.internal:5432/mlflow "
        "--artifacts-destination /srv/mlflow-artifacts --serve-artifacts"
    )[0]
    began = time.monotonic()
    server = Process(command, root / "mlflow-server.log", server_env)
    try:
        server.wait_until_up(f"http://127.0.0.1:{port}/health", timeout=240)
        team.env = env  # the clients' environment: no admin password
        team.seconds["tracking server up (tables created)"] = round(time.monotonic() - began, 1)
        grant_alice(team)
        team.run("export MLFLOW_TRACKING_URI=http://mlflow.team.example:5000", root)
        team.run("export OPTUNA_STORAGE=postgresql://team:change-me@db.internal:5432/optuna", root)
        team.run("export MLFLOW_TRACKING_USERNAME=alice", root)
        team.run("export MLFLOW_TRACKING_PASSWORD=alice-secret", root)
        with pytest.MonkeyPatch.context() as patch:  # this process asks the server too, as its admin
            patch.setenv("NO_PROXY", "127.0.0.1,localhost")
            patch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            patch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
            yield team
    finally:
        server.stop()


def grant_alice(team: Team) -> None:
    """The page's admin commands: the experiment, the user (whom everyone in this test logs in as), and
    her EDIT permission on the experiment and the registered model."""
    root = team.root
    experiment = json.loads(
        team.run(
            "curl --fail-with-body -u admin:change-admin -H 'Content-Type: application/json' -d "
            """'{"name": "mnist-batchnorm"}' http://mlflow.team.example:5000/api/2.0/mlflow/experiments/create""",
            root,
        )
    )["experiment_id"]
    user = team.run(
        "curl --fail-with-body -u admin:change-admin -H 'Content-Type: application/json' -d "
        """'{"username": "alice", "password": "alice-secret"}' """
        "http://mlflow.team.example:5000/api/2.0/mlflow/users/create",
        root,
    )
    assert json.loads(user)["user"]["username"] == "alice"
    for resource in (
        '"experiment", "resource_id": "<experiment_id>"',
        '"registered_model", "resource_id": "mnist-bn-mlp"',
    ):
        granted = team.run(
            "curl --fail-with-body -u admin:change-admin -H 'Content-Type: application/json' -d "
            f"""'{{"username": "alice", "resource_type": {resource}, "permission": "EDIT"}}' """
            "http://mlflow.team.example:5000/api/3.0/mlflow/users/permissions/grant",
            root,
            experiment_id=experiment,
        )
        assert json.loads(granted) == {}


@pytest.fixture(scope="module")
def alice(team: Team) -> Path:
    """Alice's machine: the team's repository (pushed to the bare one that stands for the git server),
    the DVC remote added, the pipeline trained against the tracking server, everything pushed."""
    repo = clone(team.machine("alice") / "mnist", **QUICK)
    sh("git", "init", "-q", "--bare", team.root / "mnist.git", cwd=team.root)
    sh("git", "remote", "add", "origin", team.root / "mnist.git", cwd=repo)
    sh("git", "push", "-q", "-u", "origin", "HEAD", cwd=repo)
    team.run("dvc remote add -d storage /mnt/team/mnist-dvc", repo)
    team.run('git add .dvc/config && git commit -m "Add the team\'s DVC remote"', repo)
    with team.timed("Alice: dvc repro"):
        team.run("dvc repro", repo)
    with team.timed("Alice: dvc push, git push"):
        team.run("dvc push", repo)
        team.run('git commit -am "Train the tutorial\'s network" && git push', repo)
    return repo


@pytest.fixture(scope="module")
def bob(team: Team, alice: Path) -> Path:
    """Bob's machine: a clone of the team's repository, its data and model pulled, an experiment
    trained against the tracking server and pushed."""
    machine = team.machine("bob")
    team.run("git clone git.team.example:ml/mnist.git", machine)
    repo = machine / "mnist"
    git_identity(repo)
    with team.timed("Bob: dvc pull"):
        team.run("dvc pull", repo)
    with team.timed("Bob: dvc exp run"):
        team.run("dvc exp run -n lr-005 -S train.learning_rate=0.05", repo)
    with team.timed("Bob: dvc exp push"):
        team.run("dvc exp push origin lr-005", repo)
    return repo


def test_the_tracking_server_keeps_its_runs_in_postgresql(team: Team, alice: Path, bob: Path) -> None:
    mlflow = client(team)
    experiment = mlflow.get_experiment_by_name("mnist-batchnorm")
    runs = mlflow.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    trained = {json.loads((repo / "runs/train.json").read_text())["mlflow_run_id"] for repo in (alice, bob)}
    assert trained <= {run.info.run_id for run in runs}
    assert len(mlflow.search_model_versions("name = 'mnist-bn-mlp'")) == 2
    # in PostgreSQL: its tables hold them
    assert int(team.postgres.sql("SELECT count(*) FROM runs WHERE status = 'FINISHED'", "mlflow")) >= 2
    # the artifacts went through the server into its folder, nothing into the clones
    assert next((team.root / "mlflow-artifacts").rglob("MLmodel"), None) is not None
    for repo in (alice, bob):
        assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()


@pytest.fixture(scope="module")
def carol(team: Team, alice: Path, bob: Path) -> Newcomer:
    """A newcomer's machine: a clone of the team's repository, its data and model pulled."""
    machine = team.machine("carol")
    team.run("git clone git.team.example:ml/mnist.git", machine)
    repo = machine / "mnist"
    git_identity(repo)
    team.run("dvc pull", repo)
    pulled = (repo / "models/model.keras").read_bytes(), locked_md5(repo, "models/model.keras")
    # Bob's experiment: its git ref from the git server, its model from the DVC remote (Bob pushed it)
    team.run("dvc exp pull origin lr-005", repo)
    team.run("dvc exp apply lr-005", repo)
    return Newcomer(repo, *pulled)


@dataclass
class Newcomer:
    repo: Path
    pulled: bytes  # models/model.keras after `dvc pull`
    locked_md5: str  # its MD5 in dvc.lock then


def test_a_newcomer_pulls_the_model_and_the_experiment_byte_for_byte(alice: Path, bob: Path, carol: Newcomer) -> None:
    assert hashlib.md5(carol.pulled, usedforsecurity=False).hexdigest() == carol.locked_md5
    assert carol.locked_md5 == locked_md5(alice, "models/model.keras")
    assert carol.pulled == (alice / "models/model.keras").read_bytes()
    # after `dvc exp apply lr-005`: Bob's model, which Carol's machine never had but through the remote
    model = carol.repo / "models/model.keras"
    assert model.read_bytes() == (bob / "models/model.keras").read_bytes()
    assert md5(model) == locked_md5(bob, "models/model.keras") != locked_md5(alice, "models/model.keras")


@pytest.fixture(scope="module")
def shared_experiment(team: Team, alice: Path, bob: Path) -> tuple[str, str, str]:
    """On Alice's machine: Bob's experiment pulled, `dvc exp show`'s table, and `mlflow runs describe`
    of the run that trained it (named in Bob's runs/train.json, which `dvc exp apply` brings)."""
    team.run("dvc exp pull origin lr-005", alice)
    table = team.run("dvc exp show --only-changed", alice)
    run_id = json.loads((bob / "runs/train.json").read_text())["mlflow_run_id"]
    described = team.run("mlflow runs describe --run-id <mlflow_run_id>", alice, mlflow_run_id=run_id)
    return table, run_id, described


def test_an_experiment_travels_between_machines_with_its_run(
    shared_experiment: tuple[str, str, str], carol: Newcomer
) -> None:
    table, run_id, text = shared_experiment
    row = next((line for line in table.splitlines() if EXPERIMENT in line), "")
    assert " 0.05 " in row, table  # the learning rate it changed, beside its results
    # `dvc exp apply` brought Bob's runs/train.json: it names the run that trained the model
    assert json.loads((carol.repo / "runs/train.json").read_text())["mlflow_run_id"] == run_id
    described = json.loads(text)
    assert described["info"]["status"] == "FINISHED"
    assert described["data"]["tags"]["dvc_experiment"] == EXPERIMENT
    assert described["info"]["run_name"] == f"{EXPERIMENT} train.learning_rate=0.05"
    assert yaml.safe_load(described["data"]["params"]["train.learning_rate"]) == 0.05


# --- the study: four workers, a kill, a restart --------------------------------------------------------


@dataclass
class Day:
    workers: list[Worker]
    victim: Worker
    killed_trial: int
    before: dict[str, object]  # what was finished when PostgreSQL went down
    down_seconds: float
    parent_seen: list[tuple[float, float, str]]  # the parent run's status, read between two time.time()s
    seconds: float


@pytest.fixture(scope="module")
def day(team: Team, alice: Path, bob: Path) -> Iterator[Day]:
    """Four workers, two per machine. Once all four are in a trial, Bob's second is stopped mid-trial
    and killed (SIGKILL); PostgreSQL is stopped and kept down until a worker has noticed (MAX_DOWN at
    most), then started again; after the grace period a fourth worker starts on Bob's machine again.
    Then until every worker has ended."""
    began = time.monotonic()
    workers = [start_worker(team, name, repo) for name, repo in (("alice-1", alice), ("alice-2", alice))]
    workers += [start_worker(team, name, bob) for name in ("bob-1", "bob-2")]
    victim = workers[-1]
    try:

        def all_started() -> bool:
            for worker in workers:
                if worker.popen.poll() is not None:
                    pytest.fail(f"{worker.name} exited {worker.popen.returncode}: {worker.stderr()}")
            return all(started(team, w) for w in workers)

        wait_for(all_started, "all four workers in their first trial", 300, every=0.5)
        while True:  # stopped, it cannot finish the trial between the look and the kill
            victim.popen.send_signal(signal.SIGSTOP)
            number = training(team, victim)
            states = {t.number: t.state.name for t in optuna_trials(team)}
            if number is not None and states[int(number)] == "RUNNING":
                break
            victim.popen.send_signal(signal.SIGCONT)
            time.sleep(0.2)
        victim.popen.kill()
        victim.popen.wait(timeout=60)
        killed_at = time.monotonic()
        # PostgreSQL stops while every live worker trains, not while one writes a new trial: a connection
        # cut during that commit leaves Optuna unsure whether it landed, and its retry may leave a trial
        # that no worker trains, failed only a grace period later (docs/team.md), which this day's
        # count of trials per worker would not expect
        live = workers[:3]

        def all_in_a_trial() -> bool:  # each one's trial run is RUNNING: past Optuna's creation of it
            _, children = study_runs(team.env, STUDY)
            running = {run.data.tags.get("pid") for run in children if run.info.status == "RUNNING"}
            return all(w.popen.poll() is not None or str(w.popen.pid) in running for w in live)

        wait_for(all_in_a_trial, "every live worker in a trial", 120, every=0.1)
        before = finished_so_far(team)
        team.postgres.stop()
        down = time.monotonic()
        try:
            deadline = down + MAX_DOWN
            while time.monotonic() < deadline and not any("went away" in w.stderr() for w in workers[:3]):
                time.sleep(0.2)
        finally:
            team.postgres.start()
        down_seconds = time.monotonic() - down
        # the heartbeat check of a live worker fails the killed trial (at its next trial once the grace
        # period has passed) before Bob's machine runs a worker again, whose start would end the dead
        # process's run KILLED first
        wait_for(
            lambda: {t.number: t.state.name for t in optuna_trials(team)}[int(number)] == "FAIL",
            f"a live worker failing trial {number} of the killed one",
            GRACE + 120,
            every=0.5,
        )
        time.sleep(max(0.0, killed_at + GRACE + 2 - time.monotonic()))
        workers.append(start_worker(team, "bob-3", bob))
        parent_seen = []
        while any(w.popen.poll() is None for w in workers):
            before_look = time.time()
            status = parent_status(team)
            parent_seen.append((before_look, time.time(), status))
            assert time.monotonic() - began < 900, "the study did not end in 15 minutes"
            time.sleep(1)
        yield Day(workers, victim, int(number), before, down_seconds, parent_seen, time.monotonic() - began)
    finally:
        for worker in workers:
            if worker.popen.poll() is None:
                worker.popen.kill()
        if not team.postgres.running():
            team.postgres.start()


def test_every_worker_but_the_killed_one_ends_cleanly(day: Day) -> None:
    for worker in day.workers:
        if worker is day.victim:
            assert worker.popen.returncode == -signal.SIGKILL
            continue
        assert worker.popen.returncode == 0, f"{worker.name}: {worker.stderr()}"
        assert "Traceback" not in worker.stderr(), worker.stderr()
        assert f"best trial of study {STUDY}" in worker.out.read_text()


def test_trials_are_numbered_without_gaps_and_none_is_left_running(team: Team, day: Day) -> None:
    trials = optuna_trials(team)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    live = [w for w in day.workers if w is not day.victim]
    _, children = study_runs(team.env, STUDY)
    by_victim = [c for c in children if c.data.tags["pid"] == str(day.victim.popen.pid)]
    assert len(trials) == WORKER_TRIALS * len(live) + len(by_victim)  # a trial an outage failed counts too
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED", "FAIL"}
    assert sum(t.state.name == "COMPLETE" for t in trials) >= len(trials) // 2


def test_one_parent_run_and_a_closed_child_run_per_trial(team: Team, day: Day) -> None:
    parents, children = study_runs(team.env, STUDY)
    assert len(parents) == 1 and parents[0].info.run_name == STUDY
    assert parents[0].info.status == "FINISHED"
    trials = {t.number: t for t in optuna_trials(team)}
    assert [c.info.run_name for c in children] == [f"{STUDY}/trial-{n}" for n in sorted(trials)]
    closed = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    for child in children:
        trial = trials[int(child.data.tags["optuna.trial_number"])]
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == closed[trial.state.name], (child.info.run_name, child.data.tags)


def test_the_parent_run_ends_only_when_the_last_worker_ends(team: Team, day: Day) -> None:
    """Never FINISHED while a trial is being trained (the killed worker's aside, which only the heartbeat
    ends), RUNNING while one worker trains after another has ended; FINISHED at the end, after the last
    trial."""
    trials = [t for t in optuna_trials(team) if t.number != day.killed_trial]

    def in_flight(start: float, end: float) -> list[int]:  # trials trained all through [start, end]
        return [
            t.number
            for t in trials
            if t.datetime_start
            and t.datetime_start.timestamp() < start
            and (t.datetime_complete is None or t.datetime_complete.timestamp() > end)
        ]

    ended = [w.ended for w in day.workers if w is not day.victim and w.ended]
    for start, end, status in day.parent_seen:
        if status != "RUNNING":
            assert not in_flight(start, end), f"the parent run was {status} while trials {in_flight(start, end)} ran"
    assert any(
        status == "RUNNING" and in_flight(start, end) and any(e < start for e in ended)
        for start, end, status in day.parent_seen
    ), "no look at the parent run while one worker trained and another had ended"
    parents, _ = study_runs(team.env, STUDY)
    assert parents[0].info.status == "FINISHED"
    last_trial = max(t.datetime_complete.timestamp() for t in trials if t.datetime_complete)
    assert parents[0].info.end_time / 1000 >= last_trial


def test_the_killed_workers_trial_is_failed_by_the_heartbeat(team: Team, day: Day) -> None:
    trial = next(t for t in optuna_trials(team) if t.number == day.killed_trial)
    assert trial.state.name == "FAIL"
    _, children = study_runs(team.env, STUDY)
    run = next(c for c in children if c.data.tags["optuna.trial_number"] == str(day.killed_trial))
    assert run.info.status == "FAILED"
    assert "stopped sending heartbeats" in run.data.tags["optuna.fail_reason"]


def outage_lines(worker: Worker) -> list[str]:
    return [line for line in worker.stderr().splitlines() if " went away (" in line]


def test_the_workers_carry_on_through_a_restart_of_postgresql(team: Team, day: Day) -> None:
    lines = {w.name: outage_lines(w) for w in day.workers if w is not day.victim}
    assert any(lines.values()), "no worker noticed that PostgreSQL went away"
    assert all(len(found) <= 1 for found in lines.values()), lines  # one line per outage
    assert day.down_seconds < MAX_DOWN + 5
    documented = next(line for line in PAGE.read_text().splitlines() if " went away (" in line and "warning:" in line)
    stores = "|".join(
        re.escape(store)
        for store in (f"the Optuna storage {team.doc.here(SHOWN_OPTUNA)}", f"the MLflow store {team.mlflow_url}")
    )
    shape = re.compile(
        rf"warning: (?:{stores}) went away \(.+\) (?:during trial \d+, which fails|between trials); "
        r"this worker waits up to 600 s for it to come back, then goes on\."
    )
    assert shape.fullmatch(team.doc.here(documented.strip())), documented
    for found in lines.values():
        assert all(shape.fullmatch(line) for line in found), found
    # nothing finished before the restart was lost
    after = finished_so_far(team)
    assert after["versions"] == day.before["versions"] == ["1", "2"]
    trials, runs = after["trials"], after["runs"]
    assert isinstance(trials, dict) and isinstance(runs, dict)
    assert {n: trials[n] for n in day.before["trials"]} == day.before["trials"]  # type: ignore[attr-defined]
    assert {r: runs[r] for r in day.before["runs"]} == day.before["runs"]  # type: ignore[attr-defined]


def test_no_output_and_no_run_shows_the_password(team: Team, day: Day) -> None:
    texts = [*team.outputs, team.server_log.read_text(errors="replace")]
    texts += [path.read_text(errors="replace") for w in day.workers for path in (w.out, w.err)]
    mlflow = client(team)
    experiment = mlflow.get_experiment_by_name("mnist-batchnorm")
    for run in mlflow.search_runs([experiment.experiment_id], max_results=1000):
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    texts += [json.dumps(t.user_attrs, default=str) for t in optuna_trials(team)]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def test_the_page_ran_command_for_command(
    team: Team, carol: Newcomer, shared_experiment: tuple[str, str, str], day: Day
) -> None:
    """Every command of docs/team.md ran in this module (the tests above ran the rest)."""
    assert team.doc.not_run() == []
    trials = optuna_trials(team)
    figures = {
        **team.seconds,
        "study: wall seconds": round(day.seconds, 1),
        "workers": [w.name for w in day.workers],
        "trials": {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")},
        "killed (SIGKILL) mid-trial": f"{day.victim.name}, trial {day.killed_trial}",
        "PostgreSQL down, seconds": round(day.down_seconds, 1),
        "workers that printed the outage line": sorted(w.name for w in day.workers if outage_lines(w)),
    }
    print(f"\nteam day: {json.dumps(figures)}")
