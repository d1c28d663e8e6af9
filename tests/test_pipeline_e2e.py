"""End to end: the real `dvc repro` in a fresh copy of the repository, on a reduced configuration.

Checks what a user sees: the outputs and metrics, the MLflow run with every parameter, per-epoch
curves, test metrics, plots and the registered model; a second `dvc repro` that re-runs nothing;
a change of `train.epochs` that re-runs only `train` and `evaluate`; and the pages of `dvc plots show`
and `dvc plots diff`, opened in a headless browser with no network, drawing every plot.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from browser import Mark, plot_marks, plot_texts, rendered_dom
from workspace import QUICK_EPOCHS as EPOCHS, set_params, sh

pytestmark = pytest.mark.e2e


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_outputs_and_metrics(workspace: Path) -> None:
    for name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert (workspace / "data/raw" / name).is_file()
    for name in ("train", "validation", "test"):
        assert (workspace / f"data/prepared/{name}.npz").is_file()
    assert (workspace / "models/model.keras").is_file()
    train = read_json(workspace / "metrics/train.json")
    test = read_json(workspace / "metrics/test.json")
    # the results people compare, nothing else (the run holds the rest)
    assert sorted(train) == ["val_accuracy", "val_loss"] and sorted(test) == ["accuracy", "log_loss"]
    assert train["val_accuracy"] > 0.85  # 3 epochs of a small net; chance is 0.1
    assert test["accuracy"] > 0.85
    assert len(read_json(workspace / "runs/train.json")["mlflow_run_id"]) == 32
    history = (workspace / "plots/history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,train_accuracy,val_loss,val_accuracy"
    assert len(history) == EPOCHS + 1
    assert len((workspace / "plots/confusion.csv").read_text().splitlines()) == 10_001
    for png in ("learning_curves", "confusion", "misclassified"):
        assert (workspace / f"plots/{png}.png").read_bytes().startswith(b"\x89PNG")


def test_offline_copy_served_the_data(workspace: Path) -> None:
    log = (workspace.parent / "repro.log").read_text()
    assert "train-images-idx3-ubyte: served by data/offline/ (47040016 bytes, sha256 verified)" in log


def test_mlflow_run_holds_everything(workspace: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    store = workspace / "mlflow.db"
    assert store.is_file(), "the default store must be mlflow.db at the repository root"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}", registry_uri=f"sqlite:///{store}")
    run_id = read_json(workspace / "runs/train.json")["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "mnist-batchnorm"
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    expected = {f"{s}.{k}": v for s, values in params.items() for k, v in values.items()}
    assert {key: yaml.safe_load(value) for key, value in run.data.params.items()} == expected
    for metric in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [m.step for m in client.get_metric_history(run_id, f"epoch/{metric}")] == list(range(1, EPOCHS + 1))
    final = read_json(workspace / "metrics/train.json")  # the figures runs are compared by, once each
    assert {key: run.data.metrics[key] for key in final} == pytest.approx(final)
    test = read_json(workspace / "metrics/test.json")
    assert run.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    assert run.data.metrics["test_log_loss"] == pytest.approx(test["log_loss"])
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "evaluation")
    }
    # at the root, where MLflow's page comparing runs finds the files they have in common
    assert {"confusion.png", "learning_curves.png", "misclassified.png", "history.csv"} <= artifacts
    assert "evaluation/classification_report.json" in artifacts
    assert run.data.tags["git_commit"] == sh("git", "rev-parse", "HEAD", cwd=workspace).stdout.strip()
    # the committed params.yaml, unchanged: named after the commit alone
    assert run.info.run_name == sh("git", "rev-parse", "--short", "HEAD", cwd=workspace).stdout.strip()
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    versions = client.search_model_versions(f"name = 'mnist-bn-mlp' and run_id = '{run_id}'")
    assert len(versions) == 1
    assert float(versions[0].tags["test_accuracy"]) == pytest.approx(test["accuracy"], abs=1e-6)
    assert client.get_model_version_by_alias("mnist-bn-mlp", "champion").version == versions[0].version
    # the registered model serves probabilities with the logged signature
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    mlflow.set_registry_uri(f"sqlite:///{store}")  # both: an earlier test in this process may have set another
    served = mlflow.pyfunc.load_model(f"models:/mnist-bn-mlp/{versions[0].version}")
    assert served.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 784)
    # the champion's logged model: the figures that chose and report it, on their datasets; no system metric
    logged = client.get_logged_model(versions[0].source.removeprefix("models:/"))
    figures = {m.key: (m.value, m.dataset_name) for m in logged.metrics}
    assert figures["val_accuracy"] == (
        pytest.approx(read_json(workspace / "metrics/train.json")["val_accuracy"]),
        "mnist-validation",
    )
    assert figures["test_accuracy"] == (pytest.approx(test["accuracy"]), "mnist-test")
    assert not [key for key in figures if key.startswith("system/") or key == "train_seconds"], figures
    assert logged.name == "mnist-bn-mlp" and "[0, 1]" in logged.tags["mlflow.note.content"]
    assert run_id in versions[0].description


def test_second_repro_runs_nothing(workspace: Path, env: dict[str, str]) -> None:
    lock = (workspace / "dvc.lock").read_text()
    again = sh("dvc", "repro", cwd=workspace, env=env)
    assert "Running stage" not in again.stdout
    assert (workspace / "dvc.lock").read_text() == lock


def test_changing_epochs_reruns_only_train_and_evaluate(workspace: Path, env: dict[str, str]) -> None:
    set_params(workspace, train__epochs=EPOCHS - 1)
    rerun = sh("dvc", "repro", cwd=workspace, env=env).stdout
    ran = [line.split("'")[1] for line in rerun.splitlines() if line.startswith("Running stage")]
    assert ran == ["train", "evaluate"]
    assert epochs_in(workspace) == EPOCHS - 1  # plots/history.csv, one row per epoch


def test_dvc_plots_show_renders_every_plot(workspace: Path, env: dict[str, str]) -> None:
    out = workspace / "plots_html"
    sh("dvc", "plots", "show", "-o", str(out), cwd=workspace, env=env)
    html = (out / "index.html").read_text()
    for title in ("Loss", "Accuracy", "Confusion matrix (test set)"):
        assert title in html
    for png in ("learning_curves", "confusion", "misclassified"):
        assert f"plots/{png}.png" in html  # the PNGs are embedded as images


CURVES = {"Loss": ("train_loss", "val_loss"), "Accuracy": ("train_accuracy", "val_accuracy")}
CONFUSION = "Confusion_matrix__test_set_"  # the plot's id in DVC's page
TEST_ROWS = 10_000


def curves(marks: list[Mark]) -> dict[tuple[str, str], int]:
    """(revision, field) -> the points of its drawn line, from vega's line marks."""
    lines = {}
    for mark in marks:
        if mark.kind == "line" and (found := re.search(r"rev: (\S+); field: (\S+)", mark.label)):
            lines[found[1], found[2]] = mark.path.count("L") + 1  # "M x,y L x,y L ...": one point each
    return lines


def confusion_totals(marks: list[Mark]) -> dict[str, int]:
    """The counts of the confusion matrix's cells added up, per layer of vega's rect marks."""
    totals: Counter[str] = Counter()
    for mark in marks:
        if mark.kind == "rect" and (found := re.search(r"\bcount: (\d+)", mark.label)):
            totals[mark.layer] += int(found[1])
    return dict(totals)


def confusion_cells(marks: list[Mark], kind: str) -> dict[tuple[int, int], tuple[int, str]]:
    """(actual, predicted) -> (count, SVG path) of each cell vega drew as `kind` (rect: the coloured
    cells of the first layer; text: the counts written in them)."""
    layer = next(mark.layer for mark in marks if mark.kind == kind)
    cells = {}
    for mark in marks:
        found = re.search(r"predicted digit: (\d); actual digit: (\d); (?:xy_)?count: (\d+)", mark.label)
        if mark.kind == kind and mark.layer == layer and found:
            cells[int(found[2]), int(found[1])] = (int(found[3]), mark.path)
    return cells


def epochs_in(workspace: Path, rev: str | None = None) -> int:
    """The epochs in plots/history.csv, in the workspace or at a git revision."""
    text = (
        sh("git", "show", f"{rev}:plots/history.csv", cwd=workspace).stdout
        if rev
        else (workspace / "plots/history.csv").read_text()
    )
    return len(text.splitlines()) - 1


def test_plots_show_draws_every_plot_offline(workspace: Path, env: dict[str, str], tmp_path: Path) -> None:
    """`dvc plots show` as a user runs it: the page in dvc_plots/, opened with no network, draws each curve
    through every epoch and a confusion matrix whose cells add up to the test set."""
    sh("dvc", "plots", "show", cwd=workspace, env=env)
    marks = plot_marks(rendered_dom(workspace / "dvc_plots/index.html", tmp_path / "browser"))
    epochs = epochs_in(workspace)
    for plot, fields in CURVES.items():
        assert curves(marks[plot]) == {("workspace", field): epochs for field in fields}, plot
    totals = confusion_totals(marks[CONFUSION])
    assert totals and set(totals.values()) == {TEST_ROWS}


def test_the_confusion_matrix_reads_as_the_png(workspace: Path, env: dict[str, str], tmp_path: Path) -> None:
    """`dvc plots show`'s confusion matrix as the PNG draws it (plots.confusion_matrix): actual digit down
    (rows, 0 at the top), predicted across (columns, 0 at the left), each cell the count of plots/confusion.csv;
    every cell that holds any count has it written in it, so the errors read without hovering."""
    sh("dvc", "plots", "show", cwd=workspace, env=env)
    marks = plot_marks(rendered_dom(workspace / "dvc_plots/index.html", tmp_path / "browser"))[CONFUSION]
    rows = [line.split(",") for line in (workspace / "plots/confusion.csv").read_text().splitlines()[1:]]
    expected = Counter((int(actual), int(predicted)) for actual, predicted in rows)
    cells = confusion_cells(marks, "rect")
    assert {cell: count for cell, (count, _) in cells.items() if count} == dict(expected)
    assert len(cells) == 100  # empty cells drawn too
    for (actual, predicted), (_, path) in cells.items():
        x, y, width, height = (
            float(v) for v in re.fullmatch(r"M([\d.]+),([\d.]+)h([\d.]+)v([\d.]+)h-[\d.]+Z", path).groups()
        )
        assert (x, y) == (predicted * width, actual * height), (actual, predicted, path)
    written = {cell: count for cell, (count, _) in confusion_cells(marks, "text").items()}
    assert written == dict(expected)  # the errors off the diagonal too, and no 0s
    assert any(actual != predicted for actual, predicted in written)


def test_plots_diff_draws_both_revisions_offline(workspace: Path, env: dict[str, str], tmp_path: Path) -> None:
    """`dvc plots diff` (the workspace against the commit, whose curves are the committed 25-epoch run's)
    draws both revisions' curves and both confusion matrices."""
    sh("dvc", "plots", "diff", "HEAD", "-o", "diff_plots", cwd=workspace, env=env)
    marks = plot_marks(rendered_dom(workspace / "diff_plots/index.html", tmp_path / "browser"))
    epochs = {"workspace": epochs_in(workspace), "HEAD": epochs_in(workspace, "HEAD")}
    for plot, fields in CURVES.items():
        assert curves(marks[plot]) == {(rev, field): n for rev, n in epochs.items() for field in fields}, plot
    totals = confusion_totals(marks[CONFUSION])
    assert totals and set(totals.values()) == {2 * TEST_ROWS}


def test_the_cdn_page_draws_nothing_here(workspace: Path, env: dict[str, str], tmp_path: Path) -> None:
    """The control: DVC's own page, which loads vega from a CDN, draws none of the plots in the same
    browser. So the browser had no network, and the checks above can fail."""
    from dvc_render.html import PAGE_HTML

    (tmp_path / "cdn.html").write_text(PAGE_HTML)
    sh("dvc", "plots", "show", "-o", "cdn_plots", "--html-template", tmp_path / "cdn.html", cwd=workspace, env=env)
    page = (workspace / "cdn_plots/index.html").read_text()
    assert "https://cdn.jsdelivr.net/npm/vega@" in page
    marks = plot_marks(rendered_dom(workspace / "cdn_plots/index.html", tmp_path / "browser"))
    assert {plot: marks[plot] for plot in (*CURVES, CONFUSION)} == {plot: [] for plot in (*CURVES, CONFUSION)}


def test_a_page_written_elsewhere_says_where_to_write_it(workspace: Path, env: dict[str, str], tmp_path: Path) -> None:
    """Written where the relative path to the scripts does not reach, each plot's place says so."""
    sh("dvc", "plots", "show", "-o", tmp_path / "elsewhere", cwd=workspace, env=env)
    texts = plot_texts(rendered_dom(tmp_path / "elsewhere/index.html", tmp_path / "browser"))
    for plot in (*CURVES, CONFUSION):
        assert any("write the page to a folder at the repository root" in text for text in texts[plot]), plot
