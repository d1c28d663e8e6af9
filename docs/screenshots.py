"""Regenerate the README's pictures of the MLflow UI (docs/images/mlflow_*.png) from a fresh run.

In a temporary copy of the repository (its tracked files, as a fresh clone has them) it runs the
Quickstart's `dvc repro` and one DVC experiment (`dvc exp run -S train.learning_rate=0.05`), starts
the README's own `mlflow ui` command on a free port, opens the README's link in headless Chromium
(1440x900, nothing reachable but 127.0.0.1; tests/browser.py) and, once MLflow has drawn each page,
writes:
  mlflow_runs.png      the runs list as the README's link opens it: validation and test accuracy
  mlflow_overview.png  the Quickstart run's Overview: its figures, tags, parameters
  mlflow_curves.png    its Model metrics tab as it opens: the per-epoch curves (`epoch/`) first
  mlflow_compare.png   MLflow's page comparing the two runs: the plots they both hold, side by side
and the Quickstart run's own plots (learning_curves.png, confusion.png, misclassified.png). It prints
how long `dvc repro` took and each run's training time, for the README's figures.

Usage (needs the test extra, for Playwright, and Debian's chromium):
    python docs/screenshots.py [--out docs/images] [--work DIR]
--work keeps the copy in DIR (a new folder), or reuses the one an earlier call left there: only the
pictures are taken again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from browser import live_page, readme_mlflow_ui, wait_drawn  # noqa: E402
from workspace import clone, free_port, sh, venv_env  # noqa: E402

CARD = "[data-testid=experiment-view-compare-runs-card]"
PLOTS = ("learning_curves.png", "confusion.png", "misclassified.png")
ML_VIEW = "workflowType=machine_learning"  # links inside the UI drop it: each page is opened with it


def close_assistant(page: object) -> None:
    """MLflow opens its assistant panel on a browser's first visit; the pictures show the page without it."""
    close = page.locator("button[aria-label='Close']").last  # type: ignore[attr-defined]
    if close.count():
        close.click()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "images")
    parser.add_argument("--work", type=Path, help="keep the copy here; reuse it if an earlier call made it")
    args = parser.parse_args()
    env = venv_env()
    with tempfile.TemporaryDirectory(prefix="screenshots-") as folder:
        repo = (args.work or Path(folder)).resolve() / "repo"
        if not (repo / "mlflow.db").exists():
            repo.mkdir(parents=True)
            clone(repo)
            start = time.monotonic()
            sh("dvc", "repro", cwd=repo, env=env, timeout=3600)
            print(f"dvc repro on a fresh copy: {time.monotonic() - start:.1f} s")
            sh("dvc", "exp", "run", "-S", "train.learning_rate=0.05", cwd=repo, env=env, timeout=3600)
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("mnist-batchnorm")
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
        for run in runs:
            print(f"run {run.info.run_name}: training {run.data.metrics['train_seconds']:.1f} s")
        first, latest = runs[0].info.run_id, runs[-1].info.run_id
        for plot in PLOTS:  # the Quickstart run's own plots, as its MLflow run holds them
            shutil.copyfile(client.download_artifacts(first, plot, folder), args.out / plot)
        with readme_mlflow_ui(repo, env, free_port()) as (base, link), live_page() as page:
            page.goto(link)
            wait_drawn(page, ".ag-row .ag-cell[col-id='metrics.`test_accuracy`']")
            close_assistant(page)
            page.screenshot(path=args.out / "mlflow_runs.png")
            run_page = f"{base}/#/experiments/{experiment.experiment_id}/runs/{first}"
            page.goto(f"{run_page}?{ML_VIEW}")
            wait_drawn(page, "text=About this run")
            page.screenshot(path=args.out / "mlflow_overview.png")
            page.goto(f"{run_page}/model-metrics?{ML_VIEW}")
            drawn = f"document.querySelectorAll('{CARD} .js-plotly-plot .scatterlayer .trace').length >= 3"
            page.wait_for_function(f"() => {drawn}")
            page.screenshot(path=args.out / "mlflow_curves.png")
            compared = f'runs=["{first}","{latest}"]&experiments=["{experiment.experiment_id}"]'
            page.goto(f"{base}/#/compare-runs?{compared}&{ML_VIEW}")
            close_assistant(page)
            # in the runs' common artifacts (a list in a scrolled pane: clicked where it is)
            page.get_by_text("learning_curves.png", exact=True).first.dispatch_event("click")
            previews = "[...document.querySelectorAll(\"img[alt='learning_curves.png']\")]"
            page.wait_for_function(f"() => {previews}.filter(i => i.complete && i.naturalWidth > 0).length >= 2")
            heading = page.get_by_text("Artifacts", exact=True).first
            heading.evaluate("e => e.scrollIntoView()")
            top = heading.bounding_box()["y"] - 8
            bottom = page.evaluate(f"() => Math.max(...{previews}.map(i => i.getBoundingClientRect().bottom))")
            clip = {"x": 0, "y": top, "width": 1440, "height": bottom - top + 16}
            page.screenshot(path=args.out / "mlflow_compare.png", clip=clip)
    print(f"wrote {', '.join(sorted(p.name for p in args.out.glob('*.png')))} in {args.out}")


if __name__ == "__main__":
    main()
