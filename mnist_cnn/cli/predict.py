"""``mnist-cnn-predict`` / ``scripts/predict.py``: the digit in each image file."""

from __future__ import annotations

import argparse
import sys

from mnist_cnn.cli.common import EXIT_BAD_INPUT, Parser, command_name, loading_tensorflow, main_with


def _top(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 10:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 10, got {text!r}")
    return value


def parser() -> Parser:
    p = Parser(prog=command_name("predict.py"), description="Predict the digit in each image file.")
    p.add_argument("model", metavar="MODEL.keras")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top", type=_top, default=1, help="show the N most likely digits (1-10)")
    return p


def main(argv=None) -> int:
    p = parser()

    def body(args):
        with loading_tensorflow():  # after parsing: TensorFlow loads here
            from mnist_cnn import keras_file, predict

        failed = False
        for path, outcome in predict.predict_files(keras_file.load_cnn(args.model), args.images, args.top):
            if isinstance(outcome, str):
                print(f"{p.prog}: error: {outcome}", file=sys.stderr)
                failed = True
            else:
                print(f"{path}: " + ", ".join(f"{digit} ({prob:.4f})" for digit, prob in outcome))
        return EXIT_BAD_INPUT if failed else 0

    return main_with(p, argv, body)
