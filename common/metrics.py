"""Per-class metrics and the confusion matrix of a classification evaluation.

Everything follows from the confusion matrix (rows: true label, columns: predicted label):
precision = tp / predicted, recall = tp / support, F1 = 2 tp / (support + predicted), each 0
where its denominator is (scikit-learn's `zero_division=0`; tests compare against it).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """counts[i, j]: examples of label i predicted as label j."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * num_labels + y_pred, minlength=num_labels * num_labels)
    return flat.reshape(num_labels, num_labels)


def per_class(confusion: np.ndarray, names: Sequence[str]) -> dict[str, dict]:
    """label -> precision, recall, f1, support."""
    tp = np.diag(confusion).astype(float)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    precision, recall, f1 = ratio(tp, predicted), ratio(tp, support), ratio(2 * tp, (support + predicted).astype(float))
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }


def class_report(result: dict, names: Sequence[str]) -> dict:
    """The figures of a classification evaluation (common.train.evaluate) a person reads: overall,
    per class, and the confusion matrix with its label names."""
    confusion = result["confusion"]
    return {
        "examples": result["examples"],
        "loss": result["loss"],
        "accuracy": result["accuracy"],
        "macro_f1": result["macro_f1"],
        "per_class": per_class(confusion, names),
        "confusion": {"labels": list(names), "counts": confusion.tolist()},
    }


def write_confusion_csv(path: Path, confusion: np.ndarray, names: Sequence[str]) -> None:
    """One row per true label, one column per predicted label, with the names as headers."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *names])
        for name, row in zip(names, confusion, strict=True):
            writer.writerow([name, *map(int, row)])


def plot_confusion(path: Path, confusion: np.ndarray, names: Sequence[str], title: str) -> None:
    """Row-normalised confusion matrix (each true label's share of predictions), counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(names)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    size = max(4.5, 0.45 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        str(int(confusion[i, j])),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
