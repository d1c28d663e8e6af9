"""A contributor's habits, run for real: the pre-commit hooks on a copy of the repository (offline: every
hook is local and runs a pinned tool), the CI workflow through a workflow linter (zizmor), and the
workflow's pull-request summary step on two real commits of a copy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workspace import REPO, clone, free_port, sh, venv_env

CONFIG = ".pre-commit-config.yaml"
WORKFLOW = ".github/workflows/ci.yml"
DVC_STAGES = ("pre-commit", "pre-push", "post-checkout")


def local_hooks(root: Path) -> dict[str, dict]:
    """The hooks of `root`'s pre-commit config, by id; every repository of it must be `local`."""
    config = yaml.safe_load((root / CONFIG).read_text())
    assert [repo["repo"] for repo in config["repos"]] == ["local"], "a hook that needs a download"
    return {hook["id"]: hook for hook in config["repos"][0]["hooks"]}


def offline_env(**extra: str) -> dict[str, str]:
    """The venv's tools first on PATH, and every proxy a dead port: a hook that downloads fails."""
    dead = f"http://127.0.0.1:{free_port()}"
    proxies = dict.fromkeys(("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"), dead)
    return venv_env(**proxies, NO_PROXY="", PIP_NO_INDEX="1", **extra)


def test_hooks_run_the_pinned_tools_and_dvcs_own_hooks(tmp_path: Path) -> None:
    hooks = local_hooks(REPO)
    lock = (REPO / "requirements.lock").read_text().splitlines()
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in lock if "==" in line}
    assert {"ruff", "mypy", "zizmor"} <= hooks.keys()
    for hook in hooks.values():
        assert hook["language"] == "system"
        assert hook["entry"].split()[0] in pinned, hook
    # DVC's own hooks as `dvc install --use-pre-commit-tool` configures them: same ids and stages, and
    # the command of DVC's hook manifest (`dvc git-hook <stage>`)
    sh("git", "init", "-q", cwd=tmp_path)
    sh("dvc", "init", "-q", cwd=tmp_path, env=venv_env())
    sh("dvc", "install", "--use-pre-commit-tool", cwd=tmp_path, env=venv_env())
    dvcs = yaml.safe_load((tmp_path / CONFIG).read_text())["repos"][0]["hooks"]
    assert [hook["id"] for hook in dvcs] == [f"dvc-{stage}" for stage in DVC_STAGES]
    for theirs, stage in zip(dvcs, DVC_STAGES, strict=True):
        ours = hooks[theirs["id"]]
        assert (ours["stages"], ours.get("always_run", False)) == (theirs["stages"], theirs.get("always_run", False))
        assert ours["entry"] == f"dvc git-hook {stage}"


def run_hooks(workspace: Path, home: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pre_commit", "run", "--all-files", "--color", "never"]
    env = offline_env(PRE_COMMIT_HOME=str(home))
    return subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=600)


def status(output: str, name: str) -> str:
    """`Passed`, `Failed` or `Skipped` of the hook whose name starts with `name`."""
    line = next(line for line in output.splitlines() if line.startswith(name))
    return line.rsplit(".", 1)[1].split()[0]


@pytest.mark.e2e
def test_pre_commit_passes_offline_and_fails_on_a_lint_error(tmp_path: Path) -> None:
    workspace = clone(tmp_path / "repo")
    names = {hook_id: hook["name"] for hook_id, hook in local_hooks(workspace).items()}
    done = run_hooks(workspace, tmp_path / "home")
    assert done.returncode == 0, done.stdout + done.stderr
    for hook_id in ("ruff", "mypy", "zizmor", "dvc-pre-commit"):
        assert status(done.stdout, names[hook_id]) == "Passed", done.stdout
    # the same run, with an unused import and a workflow job that says nowhere to run
    (workspace / "pipeline/unused.py").write_text('"""A module with an unused import."""\n\nimport os\n')
    workflow = workspace / WORKFLOW
    workflow.write_text(workflow.read_text().replace("runs-on:", "run-on:"))
    sh("git", "add", "-A", cwd=workspace)
    done = run_hooks(workspace, tmp_path / "home")
    assert done.returncode == 1, done.stdout + done.stderr
    assert status(done.stdout, names["ruff"]) == "Failed" and "F401" in done.stdout, done.stdout
    assert status(done.stdout, names["zizmor"]) == "Failed", done.stdout
    assert status(done.stdout, names["mypy"]) == "Passed", done.stdout


def zizmor(workflow: Path) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "zizmor"), "--offline", "--no-progress", str(workflow)]
    return subprocess.run(command, env=offline_env(), capture_output=True, text=True, timeout=120)


def test_workflow_passes_the_linter_that_catches_its_mistakes(tmp_path: Path) -> None:
    done = zizmor(REPO / WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No findings" in done.stdout
    text = (REPO / WORKFLOW).read_text()
    mistakes = {
        "no-runner": text.replace("runs-on:", "run-on:"),  # not a workflow: fails the schema
        "injection": text.replace('"$BASE_SHA" HEAD', "${{ github.event.pull_request.title }} HEAD"),
        "unpinned": text.replace("actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1", "actions/checkout@v7"),
    }
    for name, broken in mistakes.items():
        assert broken != text, name
        (tmp_path / f"{name}.yml").write_text(broken)
        done = zizmor(tmp_path / f"{name}.yml")
        assert done.returncode != 0, (name, done.stdout, done.stderr)
    assert "template-injection" in zizmor(tmp_path / "injection.yml").stdout


def summary_step() -> dict:
    workflow = yaml.safe_load((REPO / WORKFLOW).read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    assert steps[0]["with"]["fetch-depth"] == 0, "the base of a pull request needs the full history"
    assert [step for step in steps if step.get("run") == "bash .ci/run"]
    (step,) = [step for step in steps if "GITHUB_STEP_SUMMARY" in step.get("run", "")]
    assert step["if"] == "github.event_name == 'pull_request'"
    assert step["env"] == {"BASE_SHA": "${{ github.event.pull_request.base.sha }}"}
    return step


def test_summary_step_puts_the_metrics_diff_against_the_base_in_the_summary(tmp_path: Path) -> None:
    step = summary_step()
    workspace = clone(tmp_path / "repo")
    (workspace / ".venv").symlink_to(sys.prefix)  # where .ci/run's Quickstart command installed dvc
    base = sh("git", "rev-parse", "HEAD", cwd=workspace).stdout.strip()
    path = workspace / "metrics/test.json"
    metrics = json.loads(path.read_text())
    old = metrics["accuracy"]
    metrics["accuracy"] = round(old + 0.0125, 4)
    path.write_text(json.dumps(metrics, indent=2))
    sh("git", "commit", "-qam", "a pull request that changes the test accuracy", cwd=workspace)

    def run_step(base: str) -> str:
        summary = tmp_path / "summary.md"
        summary.write_text("")
        # the way GitHub runs a `run:` step on Linux
        command = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]]
        env = offline_env(BASE_SHA=base, GITHUB_STEP_SUMMARY=str(summary))
        sh(*command, cwd=workspace, env=env, timeout=300)
        return summary.read_text()

    text = run_step(base)
    assert f"against its base ({base[:7]})" in text
    (row,) = [line for line in text.splitlines() if "metrics/test.json" in line and "| accuracy " in line]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells == ["metrics/test.json", "accuracy", str(old), str(metrics["accuracy"]), "0.0125"], text
    assert "macro_f1" not in text, "a metric that did not change is not listed"
    head = sh("git", "rev-parse", "HEAD", cwd=workspace).stdout.strip()
    assert "No metric changed." in run_step(head)
