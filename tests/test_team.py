"""A team's day, for real, as docs/team.md tells it (tests/team_doc.py reads the commands from the page).

One real PostgreSQL server (tests/postgres.py) with the page's role and two databases; the page's
`mlflow server` on MLflow's database with served artifacts; Optuna's studies in the other database.
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
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import optuna
import pytest
import yaml
from postgres import PASSWORD, PostgresServer, literal
from team_doc import TeamDoc
from test_server import Process
from workspace import QUICK, clone, free_port, sh, venv_env

pytestmark = pytest.mark.e2e

STUDY = "lr-wd"
EXPERIMENT = "lr-005"
HEARTBEAT = 5  # seconds: a killed worker's trial is stale after 4 beats (20 s) instead of 2 minutes
GRACE = 4 * HEARTBEAT
WORKER_TRIALS = 3
# the page's worker command, plus what keeps the day short on 2 cores (the last --trials wins)
TINY = ["--trials", str(WORKER_TRIALS), "--heartbeat", str(HEARTBEAT), "--set", "train.epochs=2"]
TINY += ["--set", "model.hidden_units=[32]"]
SECRETS = (PASSWORD, quote(PASSWORD, safe=""))


@dataclass
class Team:
    """The team's servers and folders, the page as a script, and every output seen (for the password)."""

    root: Path
    doc: TeamDoc
    postgres: PostgresServer
    mlflow_url: str
    env: dict[str, str]  # after the page's `export` lines
    server_log: Path
    outputs: list[str] = field(default_factory=list)

    def run(self, line: str, cwd: Path, timeout: float = 600, **fill: str) -> str:
        """Run a command of the page in `cwd`; its stdout."""
        printed = ""
        for argv in self.doc(line, **fill):
            if argv[0] == "export":
                name, _, value = argv[1].partition("=")
                self.env[name] = value
                continue
            done = sh(*argv, cwd=cwd, env=self.env, timeout=timeout)
            self.outputs += [done.stdout, done.stderr]
            printed += done.stdout
        return printed

    def machine(self, name: str) -> Path:
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        return folder


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
    }
    doc = TeamDoc(places, {"5000": str(port)})
    for statement in doc.sql(literal(PASSWORD)):
        postgres.sql(statement)
    env = venv_env()
    command = doc(
        "mlflow server --host 127.0.0.1 --port 5000 --workers 2 "
        "--backend-store-uri postgresql://team:change-me@db.internal:5432/mlflow "
        "--artifacts-destination /srv/mlflow-artifacts --serve-artifacts"
    )[0]
    server = Process(command, root / "mlflow-server.log", env)
    try:
        server.wait_until_up(f"http://127.0.0.1:{port}/health", timeout=240)
        team = Team(root, doc, postgres, f"http://127.0.0.1:{port}", env, root / "mlflow-server.log")
        team.run("export MLFLOW_TRACKING_URI=http://mlflow.team.example:5000", root)
        team.run("export OPTUNA_STORAGE=postgresql://team:change-me@db.internal:5432/optuna", root)
        with pytest.MonkeyPatch.context() as patch:  # this process asks the server too
            patch.setenv("NO_PROXY", "127.0.0.1,localhost")
            yield team
    finally:
        server.stop()


def client(team: Team):  # noqa: ANN201 (MLflow's client, imported late)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=team.mlflow_url, registry_uri=team.mlflow_url)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def locked_md5(repo: Path, output: str) -> str:
    """The MD5 that dvc.lock records for an output of the train stage."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(out["md5"] for out in lock["stages"]["train"]["outs"] if out["path"] == output)


def git_identity(repo: Path) -> None:
    """Who commits on that machine (`dvc exp run` commits its experiments)."""
    sh("git", "config", "user.name", repo.parent.name, cwd=repo)
    sh("git", "config", "user.email", f"{repo.parent.name}@localhost", cwd=repo)


@pytest.fixture(scope="module")
def alice(team: Team) -> Path:
    """Alice's machine: the team's repository (pushed to the bare one that stands for the git server),
    the DVC remote added, the pipeline trained against the tracking server, everything pushed."""
    repo = clone(team.machine("alice") / "mnist", **QUICK)
    sh("git", "init", "-q", "--bare", team.root / "mnist.git", cwd=team.root)
    sh("git", "remote", "add", "origin", team.root / "mnist.git", cwd=repo)
    sh("git", "push", "-q", "-u", "origin", "HEAD", cwd=repo)
    team.run("dvc remote add -d storage /mnt/team/mnist-dvc", repo)
    team.run("git add .dvc/config && git commit -m \"Add the team's DVC remote\"", repo)
    team.run("dvc repro", repo)
    team.run("dvc push", repo)
    team.run("git commit -am \"Train the tutorial's network\" && git push", repo)
    return repo


@pytest.fixture(scope="module")
def bob(team: Team, alice: Path) -> Path:
    """Bob's machine: a clone of the team's repository, its data and model pulled, an experiment
    trained against the tracking server and pushed."""
    machine = team.machine("bob")
    team.run("git clone git.team.example:ml/mnist.git", machine)
    repo = machine / "mnist"
    git_identity(repo)
    team.run("dvc pull", repo)
    team.run("dvc exp run -n lr-005 -S train.learning_rate=0.05", repo)
    team.run("dvc exp push origin lr-005", repo)
    return repo


def test_the_tracking_server_keeps_its_runs_in_postgresql(team: Team, alice: Path, bob: Path) -> None:
    mlflow = client(team)
    experiment = mlflow.get_experiment_by_name("mnist-batchnorm")
    runs = mlflow.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    trained = {json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"] for repo in (alice, bob)}
    assert trained <= {run.info.run_id for run in runs}
    assert len(mlflow.search_model_versions("name = 'mnist-bn-mlp'")) == 2
    # in PostgreSQL: its tables hold them
    assert int(team.postgres.sql("SELECT count(*) FROM runs WHERE status = 'FINISHED'", "mlflow")) >= 2
    # the artifacts went through the server into its folder, nothing into the clones
    assert next((team.root / "mlflow-artifacts").rglob("MLmodel"), None) is not None
    for repo in (alice, bob):
        assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()


def test_a_newcomer_pulls_the_model_and_the_experiment_byte_for_byte(team: Team, alice: Path, bob: Path) -> None:
    machine = team.machine("carol")
    team.run("git clone git.team.example:ml/mnist.git", machine)
    repo = machine / "mnist"
    git_identity(repo)
    team.run("dvc pull", repo)
    model = repo / "models/model.keras"
    assert md5(model) == locked_md5(repo, "models/model.keras") == locked_md5(alice, "models/model.keras")
    assert model.read_bytes() == (alice / "models/model.keras").read_bytes()
    # Bob's experiment: its git ref from the git server, its model from the DVC remote (Bob pushed it)
    team.run("dvc exp pull origin lr-005", repo)
    team.run("dvc exp apply lr-005", repo)
    assert model.read_bytes() == (bob / "models/model.keras").read_bytes()
    assert md5(model) == locked_md5(bob, "models/model.keras") != locked_md5(alice, "models/model.keras")


def test_an_experiment_travels_between_machines_with_its_run(team: Team, alice: Path, bob: Path) -> None:
    team.run("dvc exp pull origin lr-005", alice)
    table = team.run("dvc exp show --drop '.*' --keep 'Experiment|.*mlflow_run_id|val_accuracy'", alice)
    run_id = json.loads((bob / "metrics/train.json").read_text())["mlflow_run_id"]
    row = next((line for line in table.splitlines() if EXPERIMENT in line), "")
    assert run_id in row, table
    described = json.loads(team.run("mlflow runs describe --run-id <mlflow_run_id>", alice, mlflow_run_id=run_id))
    assert described["info"]["status"] == "FINISHED"
    assert described["data"]["tags"]["dvc_experiment"] == EXPERIMENT
    assert yaml.safe_load(described["data"]["params"]["train.learning_rate"]) == 0.05
