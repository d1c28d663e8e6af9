"""The pictures people judge a run by: learning curves, the confusion matrix, the worst mistakes.

Rendered headless (Agg) and deterministically (no timestamp in the PNG), so an unchanged run
produces byte-identical files and DVC sees nothing to update.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from pipeline.config import SIDE


def png(figure: Figure) -> bytes:
    """`figure` as PNG bytes, without the metadata that would change with each run or version; closes it."""
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def learning_curves(history: Sequence[dict[str, float]]) -> Figure:
    """Each per-epoch figure (`train_<name>` and `val_<name>`: loss, accuracy, ...), train beside validation."""
    epochs = [row["epoch"] for row in history]
    names = [key.removeprefix("train_") for key in history[0] if key.startswith("train_")]
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), layout="constrained", squeeze=False)
    for ax, metric in zip(axes[0], names, strict=True):
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], marker=".", label="train")
        ax.plot(epochs, [row[f"val_{metric}"] for row in history], marker=".", label="validation")
        ax.set(xlabel="epoch", ylabel=metric, title=metric.capitalize())
        ax.grid(alpha=0.3)
        ax.legend()
    return figure


def confusion_matrix(matrix: np.ndarray, title: str) -> Figure:
    """A labelled confusion matrix: counts in every cell, true digits down, predicted across."""
    from sklearn.metrics import ConfusionMatrixDisplay

    figure, ax = plt.subplots(figsize=(7, 6), layout="constrained")
    ConfusionMatrixDisplay(matrix, display_labels=list(range(len(matrix)))).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(title)
    return figure


def worst_mistakes(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, count: int = 24) -> Figure:
    """The misclassified test digits the model was most confident about, with true and predicted labels."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    chosen = wrong[np.argsort(-confidence, kind="stable")][:count]
    columns = 8
    rows = max(1, -(-len(chosen) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 1.5), layout="constrained", squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, chosen, strict=False):
        ax.imshow(images[index].reshape(SIDE, SIDE), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(
            f"true {labels[index]}\npred {predicted[index]} ({probabilities[index, predicted[index]]:.0%})", fontsize=8
        )
    figure.suptitle(f"Most confident mistakes ({len(wrong)} of {len(labels)} test digits wrong)")
    return figure
