"""Per-class views of a classifier's predictions: the confusion matrix, per-class accuracy,
a JSON-ready report of both, and a PNG of the matrix."""

import os

import numpy as np


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: row = true label, column = predicted label."""
    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    for name, values in (("label", labels), ("prediction", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"a {name} is outside [0, {num_classes}): {values.min()}..{values.max()}"
            )
    flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(matrix: np.ndarray) -> list[float]:
    """The fraction of each class's examples predicted correctly (the recall of each class);
    NaN for a class with no examples."""
    matrix = np.asarray(matrix)
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [float(x) for x in np.diag(matrix) / totals]


def default_class_names(num_classes: int) -> list[str]:
    return [str(i) for i in range(num_classes)]


def classification_report(
    labels, predictions, num_classes: int, class_names: list[str] | None = None
) -> dict:
    """Accuracy, count, confusion matrix and per-class accuracy, ready for `json.dump`
    (a class without examples has accuracy None)."""
    class_names = list(class_names or default_class_names(num_classes))
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    matrix = confusion_matrix(labels, predictions, num_classes)
    count = int(matrix.sum())
    return {
        "accuracy": float(np.trace(matrix) / count) if count else None,
        "count": count,
        "class_names": class_names,
        "per_class_accuracy": {
            name: (None if np.isnan(acc) else acc)
            for name, acc in zip(class_names, per_class_accuracy(matrix))
        },
        "confusion_matrix": matrix.tolist(),
    }


def plot_confusion_matrix(
    matrix: np.ndarray, class_names: list[str] | None, path: str, title: str = ""
) -> None:
    """Writes the matrix as a PNG: cells shaded by the fraction of their row (true class),
    labelled with counts, rows also labelled with the class's accuracy."""
    matrix = np.asarray(matrix)
    n = len(matrix)
    class_names = list(class_names or default_class_names(n))
    totals = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    size = min(4 + 0.45 * n, 30)
    import matplotlib  # Here, not at import: a second of every run that draws no matrix.

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 30:  # Beyond that the numbers would not be legible.
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    color = "white" if fractions[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=8
                    )
    accuracies = per_class_accuracy(matrix)
    row_labels = [
        f"{name} ({'-' if np.isnan(acc) else f'{acc:.1%}'})"
        for name, acc in zip(class_names, accuracies)
    ]
    ax.set_xticks(range(n), class_names, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), row_labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (class accuracy)")
    total = matrix.sum()
    accuracy = np.trace(matrix) / total if total else float("nan")
    ax.set_title(f"{title + ': ' if title else ''}accuracy {accuracy:.2%} on {total:,} examples")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
