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
    """`report_from_confusion` of the labels and predictions of a classifier."""
    return report_from_confusion(confusion_matrix(labels, predictions, num_classes), class_names)


def report_from_confusion(matrix: np.ndarray, class_names: list[str] | None = None) -> dict:
    """Accuracy, count, confusion matrix and per-class accuracy of a (true, predicted) count
    matrix, ready for `json.dump` (a class without examples has accuracy None)."""
    matrix = np.rint(np.asarray(matrix)).astype(np.int64)
    num_classes = len(matrix)
    class_names = list(class_names or default_class_names(num_classes))
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
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
    labelled with counts, rows also labelled with the class's accuracy. Drawn with PIL:
    matplotlib's import and layout would add seconds to every training run."""
    from PIL import Image, ImageDraw, ImageFont

    matrix = np.asarray(matrix)
    n = len(matrix)
    class_names = list(class_names or default_class_names(n))
    totals = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    accuracies = per_class_accuracy(matrix)
    row_labels = [
        f"{name} ({'-' if np.isnan(acc) else f'{acc:.1%}'})"
        for name, acc in zip(class_names, accuracies)
    ]
    font = ImageFont.load_default(size=13)
    cell = max(14, min(44, 660 // max(n, 1)))
    left = int(max(font.getlength(label) for label in row_labels)) + 40
    column_space = int(max(font.getlength(name) for name in class_names)) + 30
    top, grid = 40, cell * n
    image = Image.new("RGB", (left + grid + 130, top + grid + column_space + 20), "white")
    draw = ImageDraw.Draw(image)
    for i in range(n):
        for j in range(n):
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell)
            draw.rectangle(box, fill=_blues(fractions[i, j]))
            if matrix[i, j] and n <= 30:  # Beyond that the numbers would not be legible.
                color = "white" if fractions[i, j] > 0.5 else "black"
                center = (box[0] + cell / 2, box[1] + cell / 2)
                draw.text(center, str(matrix[i, j]), fill=color, font=font, anchor="mm")
        draw.text((left - 6, top + (i + 0.5) * cell), row_labels[i], "black", font, "rm")
        _column_label(image, class_names[i], font, (left + (i + 0.5) * cell, top + grid + 4))
    draw.rectangle((left, top, left + grid, top + grid), outline="black")
    total = matrix.sum()
    accuracy = np.trace(matrix) / total if total else float("nan")
    heading = f"{title + ': ' if title else ''}accuracy {accuracy:.2%} on {total:,} examples"
    draw.text((left + grid / 2, top / 2), heading, "black", font, "mm")
    draw.text((left + grid / 2, image.height - 10), "predicted", "black", font, "md")
    draw.text((4, top / 2), "true (class accuracy)", "black", font, "lm")
    _colorbar(draw, font, (left + grid + 20, top, left + grid + 36, top + grid))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)


def _blues(fraction: float) -> tuple[int, int, int]:
    """matplotlib's "Blues" colour map, linearly between its ends."""
    low, high = (247, 251, 255), (8, 48, 107)
    return tuple(round(a + (b - a) * float(fraction)) for a, b in zip(low, high))


def _column_label(image, text: str, font, anchor_top_center: tuple[float, float]) -> None:
    """`text` rotated a quarter turn (so that long class names fit), hung below a column."""
    from PIL import Image, ImageDraw

    width = int(font.getlength(text)) + 4
    label = Image.new("RGB", (width, 18), "white")
    ImageDraw.Draw(label).text((2, 9), text, fill="black", font=font, anchor="lm")
    label = label.rotate(90, expand=True)
    x, y = anchor_top_center
    image.paste(label, (int(x - label.width / 2), int(y)))


def _colorbar(draw, font, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    for y in range(y0, y1):
        draw.line((x0, y, x1, y), fill=_blues(1 - (y - y0) / max(y1 - y0 - 1, 1)))
    draw.rectangle(box, outline="black")
    draw.text((x1 + 4, y0), "1", "black", font, "lt")
    draw.text((x1 + 4, y1), "0", "black", font, "ls")
    draw.text((x1 + 4, (y0 + y1) / 2), "fraction of\nthe true\nclass", "black", font, "lm")
