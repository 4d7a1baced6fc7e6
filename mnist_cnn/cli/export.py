"""``mnist-cnn-export`` / ``scripts/export.py``: a saved CNN as a serving SavedModel (and TensorFlow Lite)."""

from __future__ import annotations

import argparse

from mnist_cnn.cli.common import Parser, command_name, loading_tensorflow, main_with
from mnist_cnn.config import QUANTIZE

MAX_VERSION = 2**63 - 1  # TensorFlow Serving's versions are int64 (export.MAX_VERSION, without TensorFlow)


def version_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_VERSION:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_VERSION}, got {text[:40]!r}")
    return int(text)


def parser() -> Parser:
    p = Parser(prog=command_name("export.py"),
               description="Export a saved CNN as a serving SavedModel (and TensorFlow Lite).")
    p.add_argument("model", metavar="MODEL.keras")
    p.add_argument("directory", metavar="DIR",
                   help="TensorFlow Serving's base folder: the SavedModel goes into DIR/<version>/")
    p.add_argument("--version", type=version_number, metavar="N",
                   help="the version folder to write (default: one past the highest in DIR, 1 in a new one)")
    p.add_argument("--tflite", metavar="FILE", help="also write a TensorFlow Lite model to this new file")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="TensorFlow Lite weights: none (float32), dynamic (int8 weights), or int8 (weights and "
                   "activations, calibrated on training digits) (default: none)")
    return p


def main(argv=None) -> int:
    def body(args):
        with loading_tensorflow():  # after parsing: TensorFlow loads here
            from mnist_cnn import export, keras_file

        export.check_export_dir(args.directory, args.version)  # everything checked before anything is written
        if args.tflite is not None:
            export.check_tflite_file(args.tflite)
        cnn = keras_file.load_cnn(args.model)
        print(f"SavedModel for serving: {export.export_savedmodel(cnn, args.directory, args.version)}")
        for command in export.serving_commands(args.directory):
            print(f"serve it with: {command}")
        if args.tflite is not None:
            path = export.export_tflite(cnn, args.tflite, args.quantize)
            print(f"TensorFlow Lite ({args.quantize}): {path} ({path.stat().st_size / 1e6:.1f} MB)")

    return main_with(parser(), argv, body)
