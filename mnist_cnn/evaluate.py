"""What a model gets right and wrong, the package's one way to score a split.

``score`` makes one pass of a model over a split (``Scores``: its probabilities, and from
them loss, accuracy, the confusion matrix). Training scores the test split with it and
draws each epoch's pictures from it; ``evaluate`` (``mnist-cnn-evaluate MODEL.keras``)
adds per-class precision/recall/F1 and the most confident mistakes, as text or JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from mnist_cnn import data, idx


@dataclass
class Report:
    source: str
    images: int
    loss: float
    accuracy: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    confusion: list[list[int]]  # rows: true digit, columns: predicted digit
    mistakes: list[dict]  # the most confident wrong predictions, most confident first


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int = 10) -> np.ndarray:
    """Counts: rows the true class, columns the predicted one."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


@dataclass
class Scores:
    """One pass of a model over a split: its inputs, labels and predicted probabilities."""

    images: np.ndarray  # as the model saw them
    labels: np.ndarray  # int64
    probs: np.ndarray  # (N, classes)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def accuracy(self) -> float:
        return float((self.predicted == self.labels).mean())

    @property
    def loss(self) -> float:
        return float(keras.losses.SparseCategoricalCrossentropy()(self.labels, self.probs))

    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.labels, self.predicted, self.probs.shape[1])


def score(model: keras.Model, batches) -> Scores:
    """``model``'s probabilities for every ``(images, labels)`` batch of ``batches`` (a
    split's ``tf.data`` pipeline, or any iterable of array pairs), in inference mode."""
    parts = [(np.asarray(x), np.asarray(y)) for x, y in batches]
    if not parts:
        raise ValueError("no batches to score")
    probs = [keras.ops.convert_to_numpy(model(x, training=False)) for x, _ in parts]
    images, labels = (np.concatenate(part) for part in zip(*parts, strict=True))
    return Scores(images, labels.astype(np.int64), np.concatenate(probs).astype(np.float32))


def per_class_scores(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class (0 where undefined)."""
    hits = np.diag(matrix).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(hits / matrix.sum(axis=0))
        recall = np.nan_to_num(hits / matrix.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return precision, recall, f1


def test_arrays(source: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The test split of a --data source; an IDX folder needs only its t10k files."""
    if Path(source).is_dir():
        x, y = idx.read_split(source, "test")
        return x, y, source
    _, (x, y), info = data.load_arrays(source)
    return x, y, info.source


def evaluate(model: keras.Model, images: np.ndarray, labels: np.ndarray, source: str = "", top: int = 10) -> Report:
    """Score ``model`` on uint8 ``images`` (N, 28, 28) with integer ``labels``."""
    scores = score(model, data.pipeline(images, labels, batch_size=data.EVAL_BATCH))
    labels, probs, predicted = scores.labels, scores.probs, scores.predicted
    matrix = scores.confusion()
    precision, recall, f1 = per_class_scores(matrix)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:top]
    return Report(
        source=source,
        images=len(labels),
        loss=scores.loss,
        accuracy=scores.accuracy,
        precision=precision.tolist(),
        recall=recall.tolist(),
        f1=f1.tolist(),
        confusion=matrix.tolist(),
        mistakes=[
            {"index": int(i), "true": int(labels[i]), "predicted": int(predicted[i]),
             "probability": float(probs[i, predicted[i]])}
            for i in wrong
        ],
    )


def format_report(report: Report) -> str:
    lines = [
        f"data: {report.source}, test split ({report.images:,} images)",
        f"test loss: {report.loss:.4f}",
        "test accuracy: %f" % report.accuracy,
        "",
        "digit  precision  recall      f1  support",
    ]
    for digit, (p, r, f) in enumerate(zip(report.precision, report.recall, report.f1, strict=True)):
        lines.append(f"{digit:>5}  {p:9.4f}  {r:6.4f}  {f:6.4f}  {sum(report.confusion[digit]):7d}")
    lines += ["", "confusion matrix (rows: true digit, columns: predicted):"]
    lines.append("       " + "".join(f"{d:>6}" for d in range(len(report.confusion))))
    for digit, row in enumerate(report.confusion):
        lines.append(f"{digit:>6} " + "".join(f"{n:>6}" for n in row))
    lines += ["", f"{len(report.mistakes)} most confident mistakes:"]
    for m in report.mistakes:
        lines.append(f"  #{m['index']:<6} true {m['true']}  predicted {m['predicted']}  p={m['probability']:.4f}")
    return "\n".join(lines)


