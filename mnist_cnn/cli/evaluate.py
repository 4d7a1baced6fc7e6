"""``mnist-cnn-evaluate`` / ``scripts/evaluate.py``: a saved CNN scored on a test set."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from mnist_cnn.cli.common import Parser, command_name, loading_tensorflow, main_with


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number from 0, got {text!r}")
    return int(text)


def parser() -> Parser:
    p = Parser(prog=command_name("evaluate.py"), description="Evaluate a saved CNN on a test set.")
    p.add_argument("model", metavar="MODEL.keras")
    p.add_argument("--data", default="auto", metavar="{auto,tfds,sample,PATH}",
                   help="test set: the split of a source, or an IDX folder with t10k files")
    p.add_argument("--top", type=count, default=10, help="how many confident mistakes to list (default: 10)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv=None) -> int:
    def body(args):
        with loading_tensorflow():  # after parsing: TensorFlow loads here
            from mnist_cnn import evaluate, keras_file

        cnn = keras_file.load_cnn(args.model)
        images, labels, source = evaluate.test_arrays(args.data)
        report = evaluate.evaluate(cnn, images, labels, source, args.top)
        print(json.dumps(asdict(report), indent=2) if args.json else evaluate.format_report(report))

    return main_with(parser(), argv, body)
