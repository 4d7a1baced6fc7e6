"""What a trained model gets right and wrong: ``python scripts/evaluate.py MODEL.keras``.

Test loss and accuracy, per-class precision/recall/F1, the confusion matrix, and the
most confident mistakes -- as text, or as JSON with ``--json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np

from mnist_cnn import data, idx
from mnist_cnn.cli import Parser, command_name, main_with
from mnist_cnn.model import load_cnn


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
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


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
    probs = model.predict(data.pipeline(images, labels, batch_size=data.EVAL_BATCH).map(lambda x, y: x), verbose=0)
    labels = labels.astype(np.int64)
    predicted = probs.argmax(axis=1)
    loss = float(keras.losses.SparseCategoricalCrossentropy()(labels, probs))
    matrix = confusion_matrix(labels, predicted, probs.shape[1])
    precision, recall, f1 = per_class_scores(matrix)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:top]
    return Report(
        source=source,
        images=len(labels),
        loss=loss,
        accuracy=float((predicted == labels).mean()),
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


def main(argv=None) -> int:
    p = Parser(prog=command_name("evaluate.py"), description="Evaluate a saved CNN on a test set.")
    p.add_argument("model", metavar="MODEL.keras")
    p.add_argument("--data", default="auto", metavar="{auto,tfds,sample,PATH}",
                   help="test set: the split of a source, or an IDX folder with t10k files")
    p.add_argument("--top", type=int, default=10, help="how many confident mistakes to list")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    def body(args):
        model = load_cnn(args.model)
        images, labels, source = test_arrays(args.data)
        report = evaluate(model, images, labels, source, args.top)
        print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))

    return main_with(p, argv, body)
