"""Serving export: a TensorFlow SavedModel that needs neither Keras nor this package.

    python scripts/fit.py --export exported/            # after training
    python scripts/export.py logs/<run>/model.keras exported/   # a saved model
    export_savedmodel(model, "exported/")               # from Python

Two signatures, each taking ``images`` of shape ``(N, 28, 28, 1)`` -- any other shape
is refused by TensorFlow's signature check, never reshaped into other rows:
- ``serving_default``: float32 images in [0, 1];
- ``serve_uint8``: uint8 images 0-255, as MNIST stores them.
Each returns ``probabilities`` (N, 10) float32 and ``digits`` (N,) int64.

``export_tflite`` writes the same model as a TensorFlow Lite file with one input
``images`` (batch 1 by default, resizable) and one output ``probabilities``, optionally
quantized (``dynamic`` range, or full ``int8`` calibrated on training digits).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from mnist_cnn import data
from mnist_cnn.config import check_name
from mnist_cnn.errors import StorageError, UsageError
from mnist_cnn.rundir import write_atomic

SERVING_SHAPE = (None, 28, 28, 1)



def tflite_bytes(model: keras.Model, quantize: str = "none", representative=None) -> bytes:
    """``model`` as a TensorFlow Lite flatbuffer with one signature: ``images`` float32
    (batch, 28, 28, 1) -> ``probabilities``. ``representative``: float32 images
    (N, 28, 28, 1) that calibrate ``int8`` quantization (training digits)."""

    # Converted from a one-signature SavedModel: the converter freezes its variables
    # (from a Keras 3 model's concrete function it kept them as unreadable resources).
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        lambda images: {"probabilities": model(images, training=False)},
        input_signature=[tf.TensorSpec(SERVING_SHAPE, tf.float32, name="images")],
    )
    with tempfile.TemporaryDirectory() as folder:
        archive.write_out(folder, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder, signature_keys=["serving_default"])
        return _convert(converter, quantize, representative)


def _convert(converter, quantize: str, representative) -> bytes:
    if quantize in ("dynamic", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "int8":
        if representative is None:
            raise UsageError("--quantize int8 needs representative training digits")
        converter.representative_dataset = lambda: ([image[None]] for image in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


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
        # A signature's input shape is not enforced when it is called: a (8, 784) batch
        # reached Conv2D and aborted the whole process (a TensorFlow check failure).
        # Check first, so a bad batch is an InvalidArgumentError and the server lives on.
        images = tf.ensure_shape(images, SERVING_SHAPE)
        probabilities = model(images, training=False)
        return {"probabilities": probabilities, "digits": tf.argmax(probabilities, axis=-1)}

    # keras.export.ExportArchive is what model.export() uses underneath; it lets one
    # SavedModel carry both input types.
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        lambda images: predict(images),
        input_signature=[tf.TensorSpec(SERVING_SHAPE, tf.float32, name="images")],
    )
    archive.add_endpoint(
        "serve_uint8",
        lambda images: predict(tf.cast(tf.ensure_shape(images, SERVING_SHAPE), tf.float32) / 255.0),
        input_signature=[tf.TensorSpec(SERVING_SHAPE, tf.uint8, name="images")],
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


def export_tflite(model: keras.Model, path: str | os.PathLike, quantize: str = "none") -> Path:
    """Write ``model`` as a new TensorFlow Lite file; ``int8`` is calibrated on 200 of
    the sample's training digits."""
    path = Path(path)
    if path.exists():
        raise UsageError(f"{path}: already exists; choose a new file for the TensorFlow Lite model")
    check_name("--tflite", path.name)
    representative = None
    if quantize == "int8":
        (images, _), _ = data.sample_arrays()
        representative = data.to_float(images[:200])
    return write_atomic(path, tflite_bytes(model, quantize, representative))


