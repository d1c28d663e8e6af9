"""The MLflow UI as the README opens it: a real training into a real SQLite store, the README's own
`mlflow ui` command, its link opened in headless Chromium at a laptop's size, and what the first
screen shows once MLflow's page has drawn (Playwright waits on the DOM; nothing sleeps)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from browser import VIEWPORT, live_page, on_first_screen, readme_mlflow_ui, wait_drawn
from workspace import free_port

CURVES = ("train_accuracy", "train_loss", "val_accuracy", "val_loss")  # per epoch (`epoch/<name>`): steps 1..EPOCHS
CARD = "[data-testid=experiment-view-compare-runs-card]"  # one chart of a run's Model metrics tab

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ui(workspace: Path, env: dict[str, str]) -> tuple[str, str]:
    """The README's `mlflow ui` on the clone's store: (its base URL, the README's link)."""
    with readme_mlflow_ui(workspace, env, free_port()) as served:
        yield served


def the_run(workspace: Path) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-batchnorm")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def test_readme_link_opens_the_runs_in_the_model_training_view_with_their_accuracy(
    workspace: Path, ui: tuple[str, str]
) -> None:
    run = the_run(workspace)
    with live_page() as page:
        page.goto(ui[1])
        wait_drawn(page, ".ag-row .ag-cell[col-id='metrics.`val_accuracy`']")
        # the model-training sidebar (the experiment's runs and models, the model registry), not GenAI's
        body = page.locator("body").inner_text()
        assert "Model registry" in body and "Judges" not in body and "Prompts" not in body, body
        for key in ("val_accuracy", "test_accuracy"):
            header, cell = (f"{row}[col-id='metrics.`{key}`']" for row in (".ag-header-cell", ".ag-row .ag-cell"))
            assert on_first_screen(page, header), f"{key}'s column is not on the first {VIEWPORT} screen"
            assert on_first_screen(page, cell), f"{key}'s value is not on the first {VIEWPORT} screen"
            shown = page.locator(cell).first.inner_text().rstrip("…")
            assert float(shown) == pytest.approx(run.data.metrics[key], abs=1e-4)
        assert run.info.run_name in page.locator(".ag-row").first.inner_text()  # the name: what changed


def chart_cards(page: object) -> list[tuple[str, str]]:
    """The charts a run's Model metrics tab drew (MLflow draws only those near the screen), in page
    order: (title, "line" or "bar"), from plotly's SVG layers."""
    cards = page.evaluate(  # type: ignore[attr-defined]
        f"""() => [...document.querySelectorAll('{CARD}')].filter(c => c.querySelector('.js-plotly-plot'))
            .map(c => [c.innerText.split('\\n')[0].trim(), c.querySelector('.barlayer .trace') ? 'bar'
                       : c.querySelector('.scatterlayer .trace') ? 'line' : '?'])"""
    )
    return [(title.removeprefix("epoch/"), kind) for title, kind in cards]


def test_a_runs_charts_draw_each_epoch_as_a_line(workspace: Path, ui: tuple[str, str]) -> None:
    run = the_run(workspace)
    with live_page() as page:
        page.goto(f"{ui[0]}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics")
        page.get_by_placeholder("Search metric charts").fill("epoch/")
        wait_drawn(page, f"{CARD} .js-plotly-plot")
        page.wait_for_function(f"() => [...document.querySelectorAll('{CARD}')].length === {len(CURVES)}")
        assert sorted(chart_cards(page)) == [(name, "line") for name in CURVES]


def test_a_runs_page_shows_the_per_epoch_curves_first(workspace: Path, ui: tuple[str, str]) -> None:
    run = the_run(workspace)
    with live_page() as page:
        page.goto(f"{ui[0]}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics")
        wait_drawn(page, f"{CARD} .js-plotly-plot")
        page.wait_for_function(f"() => document.querySelectorAll('{CARD} .js-plotly-plot svg').length >= 3")
        first_row = chart_cards(page)[:3]
        assert all(title in CURVES and kind == "line" for title, kind in first_row), first_row
