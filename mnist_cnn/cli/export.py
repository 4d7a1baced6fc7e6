"""``mnist-cnn-export`` / ``scripts/export.py``: a saved CNN as a serving SavedModel (and TensorFlow Lite)."""

from __future__ import annotations

from mnist_cnn.cli.common import Parser, command_name, main_with
from mnist_cnn.config import QUANTIZE


def parser() -> Parser:
    p = Parser(prog=command_name("export.py"),
               description="Export a saved CNN as a serving SavedModel (and TensorFlow Lite).")
    p.add_argument("model", metavar="MODEL.keras")
    p.add_argument("directory", metavar="DIR", help="a new folder for the SavedModel")
    p.add_argument("--tflite", metavar="FILE", help="also write a TensorFlow Lite model to this new file")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="TensorFlow Lite weights: none (float32), dynamic (int8 weights), or int8 (weights and "
                   "activations, calibrated on training digits) (default: none)")
    return p


def main(argv=None) -> int:
    def body(args):
        from mnist_cnn import export, keras_file  # after parsing: TensorFlow loads here

        export.check_export_dir(args.directory)
        cnn = keras_file.load_cnn(args.model)
        print(f"SavedModel for serving: {export.export_savedmodel(cnn, args.directory)}")
        if args.tflite:
            path = export.export_tflite(cnn, args.tflite, args.quantize)
            print(f"TensorFlow Lite ({args.quantize}): {path} ({path.stat().st_size / 1e6:.1f} MB)")

    return main_with(parser(), argv, body)
