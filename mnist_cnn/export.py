"""Serving export: a TensorFlow SavedModel that needs neither Keras nor this package.

    python scripts/fit.py --export exported/            # after training
    python scripts/export.py logs/<run>/model.keras exported/   # a saved model
    export_savedmodel(model, "exported/")               # from Python

Two signatures (both accept ``(N, 28, 28)`` or ``(N, 28, 28, 1)``):
- ``serving_default``: float32 images in [0, 1];
- ``serve_uint8``: uint8 images 0-255, as MNIST stores them.
Each returns ``probabilities`` (N, 10) float32 and ``digits`` (N,) int64.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from mnist_cnn.errors import InputError, UsageError
from mnist_cnn.model import load_cnn


def check_export_dir(directory: str | os.PathLike) -> Path:
    """The export target must not exist yet (nothing is ever overwritten)."""
    directory = Path(directory)
    if directory.exists():
        raise UsageError(f"{directory}: already exists; choose a new folder for the SavedModel")
    return directory


def export_savedmodel(model: keras.Model, directory: str | os.PathLike) -> Path:
    """Write ``model`` as a SavedModel into the new folder ``directory`` (atomically)."""
    directory = check_export_dir(directory)

    def predict(images):
        images = tf.reshape(images, (-1, 28, 28, 1))
        probabilities = model(images, training=False)
        return {"probabilities": probabilities, "digits": tf.argmax(probabilities, axis=-1)}

    # keras.export.ExportArchive is what model.export() uses underneath; it lets one
    # SavedModel carry both input types.
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        lambda images: predict(images),
        input_signature=[tf.TensorSpec(None, tf.float32, name="images")],
    )
    archive.add_endpoint(
        "serve_uint8",
        lambda images: predict(tf.cast(images, tf.float32) / 255.0),
        input_signature=[tf.TensorSpec(None, tf.uint8, name="images")],
    )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        archive.write_out(str(staging), verbose=False)
        os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="export.py", description="Export a saved CNN as a serving SavedModel.")
    p.add_argument("model", metavar="MODEL.keras")
    p.add_argument("directory", metavar="DIR", help="a new folder for the SavedModel")
    args = p.parse_args(argv)
    try:
        check_export_dir(args.directory)
        print(f"SavedModel for serving: {export_savedmodel(load_cnn(args.model), args.directory)}")
    except InputError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    return 0
