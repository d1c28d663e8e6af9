"""Plots: headless, deterministic (byte-identical PNGs for the same data), and showing what they claim."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from matplotlib.figure import Figure

from pipeline import plots

HISTORY = [
    {"epoch": e, "train_loss": 1 / e, "train_accuracy": 1 - 0.5 / e, "val_loss": 1.1 / e, "val_accuracy": 1 - 0.6 / e}
    for e in range(1, 6)
]


def render_twice(make: Callable[[], Figure]) -> tuple[bytes, bytes]:
    return plots.png(make()), plots.png(make())


def test_learning_curves_are_deterministic_pngs() -> None:
    first, second = render_twice(lambda: plots.learning_curves(HISTORY))
    assert first.startswith(b"\x89PNG")
    assert first == second


def test_confusion_matrix_labels_every_cell() -> None:
    matrix = np.arange(100).reshape(10, 10)
    figure = plots.confusion_matrix(matrix, "title")
    texts = {t.get_text() for t in figure.axes[0].texts}
    assert {"0", "55", "99"} <= texts
    first, second = render_twice(lambda: plots.confusion_matrix(matrix, "title"))
    assert first == second


def test_worst_mistakes_shows_the_most_confident_errors_first() -> None:
    labels = np.array([0, 1, 2, 3])
    probabilities = np.full((4, 10), 0.01)
    probabilities[0, 0] = 0.9  # right
    probabilities[1, 5] = 0.6  # wrong, less confident
    probabilities[2, 7] = 0.95  # wrong, most confident
    probabilities[3, 3] = 0.9  # right
    figure = plots.worst_mistakes(np.zeros((4, 784)), labels, probabilities)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["true 2\npred 7 (95%)", "true 1\npred 5 (60%)"]
    assert "2 of 4 test digits wrong" in figure.texts[0].get_text()
