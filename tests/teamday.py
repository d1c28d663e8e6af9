"""The machinery of tests/test_team.py: docs/team.md as its script (the commands of the page's ```bash
blocks and the statements of its ```sql block, looked up as the test runs them, so that the page and the
test cannot drift apart; the page's example host names, ports, folders and password replaced by the
test's own), the team's servers and machines, and the `mnist-tune` workers with what they print."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from postgres import PostgresServer
from test_tune import study_runs
from workspace import REPO, sh

STUDY = "lr-wd"
HEARTBEAT = 10  # seconds: a killed worker's trial is stale after 4 beats (40 s) instead of 2 minutes
GRACE = 4 * HEARTBEAT
# PostgreSQL stays down until a worker notices, but never so long that a live trial's last heartbeat
# (up to one interval before the stop) could look stale to another worker when it is back
MAX_DOWN = GRACE - HEARTBEAT - 5
WORKER_TRIALS = 6  # enough that live workers still start trials once the killed one's is stale
# the page's worker command, plus what keeps the day short on 2 cores (the last --trials wins)
TINY = ["--trials", str(WORKER_TRIALS), "--heartbeat", str(HEARTBEAT), "--set", "train.epochs=2"]
TINY += ["--set", "model.hidden_units=[32]"]

PAGE = REPO / "docs/team.md"
# Commands of the page that the test does not run, and why
NOT_RUN = {
    shlex.join(["pip", "install", "-c", "requirements.lock", "-e", ".[team]"]): "the tests' environment has it",
}
_BLOCK = re.compile(r"^```(bash|sql|ini)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def normalized(line: str) -> str:
    """A command as its words, without comments: how the page and the test compare commands."""
    return shlex.join(shlex.split(line, comments=True))


def blocks(kind: str) -> list[str]:
    return [body for found_kind, body in _BLOCK.findall(PAGE.read_text()) if found_kind == kind]


class TeamDoc:
    """The page's commands, with `places` (page value -> the test's, replaced inside any word) and
    `words` (page word -> the test's, replaced where a word is exactly that)."""

    def __init__(self, places: dict[str, str], words: dict[str, str]) -> None:
        self.places = dict(sorted(places.items(), key=lambda item: -len(item[0])))  # longest first
        self.words = words
        self.commands: list[str] = []
        for body in blocks("bash"):
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip():
                    self.commands.append(normalized(line))
        self.ran: set[str] = set()

    def __call__(self, line: str, **fill: str) -> list[list[str]]:
        """The command `line` of the page (it must be there, word for word), as argument lists to run
        one after the other (split at `&&`), with the test's places and `fill` for `<placeholders>`."""
        key = normalized(line)
        assert key in self.commands, f"docs/team.md has no command `{line}`: the test runs what the page says"
        self.ran.add(key)
        parts: list[list[str]] = [[]]
        for word in shlex.split(key):
            if word == "&&":
                parts.append([])
            else:
                parts[-1].append(self.here(word, fill))
        return parts

    def here(self, word: str, fill: dict[str, str] | None = None) -> str:
        if word in self.words:
            return self.words[word]
        for page, test in {**self.places, **{f"<{key}>": value for key, value in (fill or {}).items()}}.items():
            word = word.replace(page, test)
        return word

    def sql(self, password: str) -> list[str]:
        """The statements of the page's SQL block, with the test's password for the page's."""
        statements = " ".join(blocks("sql")).split(";")
        return [" ".join(s.split()).replace("'change-me'", password) for s in statements if s.strip()]

    def ini(self) -> str:
        """The page's settings file (MLflow's authentication), with the test's places: its percent-encoded
        password's `%` written `%%`, as the page says."""
        return self.here(blocks("ini")[0]).replace("%", "%%")

    def not_run(self) -> list[str]:
        """The page's commands that no test ran (and that NOT_RUN does not excuse)."""
        return [command for command in self.commands if command not in self.ran and command not in NOT_RUN]


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
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each part of the day

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        began = time.monotonic()
        yield
        self.seconds[part] = round(time.monotonic() - began, 1)

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


def client(team: Team) -> Any:
    """MLflow's client of the team's server."""
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


@dataclass
class Worker:
    """A `mnist-tune` process of the page's command, its output in files."""

    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path
    ended: float | None = None  # time.time() when it exited

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def start_worker(team: Team, name: str, repo: Path) -> Worker:
    command = team.doc("mnist-tune --study lr-wd --trials 10")[0] + TINY
    out, err = team.root / f"{name}.out", team.root / f"{name}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        popen = subprocess.Popen(command, cwd=repo, env=team.env, stdout=stdout, stderr=stderr)
    worker = Worker(name, popen, out, err)

    def wait() -> None:
        popen.wait()
        worker.ended = time.time()

    threading.Thread(target=wait, daemon=True).start()
    return worker


@functools.cache
def _storage(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})  # one pool, across restarts


def optuna_trials(team: Team) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, as the database has them now."""
    storage = _storage(team.env["OPTUNA_STORAGE"])
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)


def started(team: Team, worker: Worker) -> bool:
    """Whether `worker` has started a trial (its MLflow child run exists)."""
    _, children = study_runs(team.env, STUDY)
    return any(run.data.tags.get("pid") == str(worker.popen.pid) for run in children)


def training(team: Team, worker: Worker) -> str | None:
    """The number of the trial that `worker` is training (RUNNING, an epoch logged), if any."""
    _, children = study_runs(team.env, STUDY)
    for run in children:
        tags = run.data.tags
        if (
            tags.get("pid") == str(worker.popen.pid)
            and run.info.status == "RUNNING"
            and "epoch/val_accuracy" in run.data.metrics
        ):
            return tags["optuna.trial_number"]
    return None


def finished_so_far(team: Team) -> dict[str, object]:
    mlflow = client(team)
    experiment = mlflow.get_experiment_by_name("mnist-batchnorm")
    runs = mlflow.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", max_results=1000)
    return {
        "trials": {t.number: t.value for t in optuna_trials(team) if t.state.name == "COMPLETE"},
        "runs": {run.info.run_id: run.data.metrics for run in runs},
        "versions": sorted(v.version for v in mlflow.search_model_versions("name = 'mnist-bn-mlp'")),
    }


def parent_status(team: Team) -> str:
    parents, _ = study_runs(team.env, STUDY)
    return parents[0].info.status if len(parents) == 1 else f"{len(parents)} parents"
