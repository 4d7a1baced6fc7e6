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

import os
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from mnist_cnn.cli import Parser, main_with
from mnist_cnn.errors import StorageError, UsageError
from mnist_cnn.model import load_cnn
from mnist_cnn.rundir import check_name


def check_export_dir(directory: str | os.PathLike) -> Path:
    """The export target: a new folder (nothing is ever overwritten) whose name the
    filesystem can hold, in a place we can write -- checked before any training."""
    directory = Path(directory)
    if not str(directory):
        raise UsageError("--export needs a folder name")
    if directory.exists():
        raise UsageError(f"{directory}: already exists; choose a new folder for the SavedModel")
    check_name("--export", directory.name)
    parent = directory.absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:
        tempfile.TemporaryDirectory(dir=parent, prefix=".mnist_cnn-probe-").cleanup()
    except OSError as e:
        raise UsageError(f"{directory}: cannot create it ({parent}: {e.strerror or e})") from None
    return directory


def _staging(directory: Path) -> Path:
    """Where an export is built before it is renamed into place; one fixed name per
    target, so an export cut short by a kill is cleared by the next attempt."""
    return directory.with_name(f".{directory.name}.partial")


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
    staging = _staging(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        archive.write_out(str(staging), verbose=False)
        _usual_permissions(staging)
        os.rename(staging, directory)
    except OSError as e:
        raise StorageError(f"cannot write the SavedModel {directory}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _usual_permissions(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask (TensorFlow writes some 0700/0600),
    so that a serving process running as another user can read the export."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def main(argv=None) -> int:
    p = Parser(prog="export.py", description="Export a saved CNN as a serving SavedModel.")
    p.add_argument("model", metavar="MODEL.keras")
    p.add_argument("directory", metavar="DIR", help="a new folder for the SavedModel")
    def body(args):
        check_export_dir(args.directory)
        print(f"SavedModel for serving: {export_savedmodel(load_cnn(args.model), args.directory)}")

    return main_with(p, argv, body)
