"""Serving export: a TensorFlow SavedModel that needs neither Keras nor this package.

    mnist-cnn-fit --export exported/                    # after training: exported/1/
    mnist-cnn-export logs/<run>/model.keras exported/   # a saved model: exported/2/, ...
    export_savedmodel(model, "exported/")               # from Python

``exported/`` is a TensorFlow Serving base folder: each export is a new numbered version
folder in it (one past the highest, or ``version=N``), never an overwrite, renamed into
place whole; ``tensorflow_model_server --model_base_path=$(realpath exported)`` serves the
newest, as ``mnist-cnn-serve exported/`` does.

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

import contextlib
import errno
import io
import os
import shlex
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import keras
import tensorflow as tf

from mnist_cnn import data, warmup
from mnist_cnn.config import check_name
from mnist_cnn.errors import StorageError, UsageError
from mnist_cnn.files import write_atomic
from mnist_cnn.model import INPUT_SHAPE

SERVING_SHAPE = INPUT_SHAPE  # (None, 28, 28, 1)


def serving_archive(model: keras.Model, tflite: bool = False) -> keras.export.ExportArchive:
    """The signatures a served model answers: ``serving_default`` (float32 ``images`` in [0, 1]
    -> ``probabilities``, ``digits``) and ``serve_uint8`` (uint8 pixels 0-255, same outputs).
    ``tflite``: ``serving_default`` alone with ``probabilities`` alone, what the TFLite file carries.

    ``keras.export.ExportArchive`` is what ``model.export()`` uses underneath; it lets one
    SavedModel carry both input types."""

    def predict(images):
        # A signature's input shape is not enforced when it is called: a (8, 784) batch
        # reached Conv2D and aborted the whole process (a TensorFlow check failure).
        # Check first, so a bad batch is an InvalidArgumentError and the server lives on.
        probabilities = model(tf.ensure_shape(images, SERVING_SHAPE), training=False)
        if tflite:
            return {"probabilities": probabilities}
        return {"probabilities": probabilities, "digits": tf.argmax(probabilities, axis=-1)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", predict,
                         input_signature=[tf.TensorSpec(SERVING_SHAPE, tf.float32, name="images")])
    if not tflite:
        archive.add_endpoint("serve_uint8", lambda images: predict(tf.cast(images, tf.float32) / 255.0),
                             input_signature=[tf.TensorSpec(SERVING_SHAPE, tf.uint8, name="images")])
    return archive


def tflite_bytes(model: keras.Model, quantize: str = "none", representative=None) -> bytes:
    """``model`` as a TensorFlow Lite flatbuffer with one signature: ``images`` float32
    (batch, 28, 28, 1) -> ``probabilities``. ``representative``: float32 images
    (N, 28, 28, 1) that calibrate ``int8`` quantization (training digits)."""

    # Converted from a one-signature SavedModel: the converter freezes its variables
    # (from a Keras 3 model's concrete function it kept them as unreadable resources).
    with tempfile.TemporaryDirectory() as folder:
        _write_quietly(serving_archive(model, tflite=True), folder)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder, signature_keys=["serving_default"])
        return _convert(converter, quantize, representative)


def _write_quietly(archive: keras.export.ExportArchive, folder: str) -> None:
    """``archive.write_out`` without its printout: Keras 3.6 prints "Saved artifact at …" (naming
    our staging folder) even with ``verbose=False``; later versions honour it."""
    with contextlib.redirect_stdout(io.StringIO()):
        archive.write_out(folder, verbose=False)


def _convert(converter, quantize: str, representative) -> bytes:
    if quantize in ("dynamic", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "int8":
        if representative is None:
            raise UsageError("--quantize int8 needs representative training digits")
        converter.representative_dataset = lambda: ([image[None]] for image in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


STALE_STAGING_SECONDS = 86400  # a staging folder this old was left by a killed export


MAX_VERSION = 2**63 - 1  # TensorFlow Serving's versions are int64


def version_folders(base: str | os.PathLike, missing_ok: bool = True) -> dict[int, Path]:
    """TensorFlow Serving's version folders of a base folder: {version: folder}, for every entry
    named by a whole number 1..2^63-1 (no leading zero) that is a folder or a symbolic link (listed,
    never followed: the server refuses a link with a log line, and an export does not take its
    number). Hidden staging folders and anything else are not versions. A missing ``base`` has none
    (unless not ``missing_ok``); another failure to list it is an ``OSError``."""
    try:
        entries = list(os.scandir(base))
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise
    return {int(e.name): Path(e.path) for e in entries
            if e.name.isdigit() and e.name[0] != "0" and len(e.name) <= 19 and int(e.name) <= MAX_VERSION
            and (e.is_symlink() or e.is_dir(follow_symlinks=False))}


def serving_commands(base: str | os.PathLike, name: str = "mnist") -> list[str]:
    """The command lines that serve the newest version in ``base``: this package's own
    server (installed with it), and TensorFlow Serving's (installed separately)."""
    path = Path(base).absolute()
    return [shlex.join(["mnist-cnn-serve", str(path)]),
            f"tensorflow_model_server --rest_api_port=8501 --model_name={name} "
            f"--model_base_path={shlex.quote(str(path))}"]


def _check_room(base: Path) -> None:
    if max(version_folders(base), default=0) >= MAX_VERSION:
        raise UsageError(f"{base}: version {MAX_VERSION} exists, the highest TensorFlow Serving reads; "
                         f"export into a new folder or choose a free --version")


def check_export_dir(base: str | os.PathLike, version: int | None = None) -> Path:
    """The export's base folder: a folder or a new name (checked, like a new version
    ``version`` in it, before any training or writing) in a place we can write."""
    base = Path(base)
    if not str(base):
        raise UsageError("--export needs a folder name")
    if base.exists() and not base.is_dir():
        raise UsageError(f"{base}: not a folder; the export goes into a base folder of numbered versions")
    check_name("--export", base.name)
    if version is not None and not 1 <= version <= MAX_VERSION:
        raise UsageError(f"--version must be a whole number from 1 to {MAX_VERSION} (TensorFlow Serving's int64), "
                         f"got {version}")
    if version is None:
        _check_room(base)
    if version is not None and (base / str(version)).exists():
        raise UsageError(f"{base / str(version)}: version {version} exists; choose another --version or none "
                         f"(one past the highest)")
    probe_in = base.absolute()
    while not probe_in.exists():
        probe_in = probe_in.parent
    try:
        tempfile.TemporaryDirectory(dir=probe_in, prefix=".mnist_cnn-probe-").cleanup()
    except OSError as e:
        raise UsageError(f"{base}: cannot create it ({probe_in}: {e.strerror or e})") from None
    return base


def _clear_stale_staging(base: Path) -> None:
    """Remove staging folders of exports killed long ago (a live export's is never that old)."""
    for stale in base.glob(".export-*.partial"):
        if time.time() - stale.stat().st_mtime > STALE_STAGING_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)


def _publish(staging: Path, base: Path, version: int | None) -> Path:
    """Rename the finished staging folder to its version: ``version``, or one past the
    highest (retried past a version another export published meanwhile)."""
    while True:
        if version is None:
            _check_room(base)
        target = base / str(version if version is not None else max(version_folders(base), default=0) + 1)
        try:
            os.rename(staging, target)  # fails on a non-empty target: a version is never overwritten
            return target
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            if version is not None:
                raise UsageError(f"{target}: version {version} exists; choose another --version") from None
            # another export published this number meanwhile: try the next


def export_savedmodel(model: keras.Model, base: str | os.PathLike, version: int | None = None,
                      model_name: str = "mnist") -> Path:
    """Write ``model`` as a SavedModel into a new version folder of ``base`` (atomically), with
    TensorFlow Serving's warm-up requests (``assets.extra/tf_serving_warmup_requests``, for the
    model ``model_name``); returns that folder."""
    base = check_export_dir(base, version)

    archive = serving_archive(model)
    staging = base / f".export-{uuid.uuid4().hex}.partial"  # hidden: TensorFlow Serving ignores it
    try:
        base.mkdir(parents=True, exist_ok=True)
        _clear_stale_staging(base)
        _write_quietly(archive, str(staging))
        warmup.write(staging, model_name, warmup.requests())  # TensorFlow Serving's, replayed by both servers
        _usual_permissions(staging)
        return _publish(staging, base, version)
    except (OSError, tf.errors.OpError) as e:  # TensorFlow's SaveV2 fails as ResourceExhaustedError on a full disk
        raise StorageError(f"cannot write the SavedModel in {base}: {_reason(e, staging)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _reason(e: Exception, staging: Path) -> str:
    """One line: the OS's words where there are some, else TensorFlow's first line without our staging path."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = getattr(e, "message", None) or str(e)
    for marker in ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied"):
        if marker in text:
            return marker
    return " ".join(text.replace(str(staging), "").split())[:200]


def _usual_permissions(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask (TensorFlow writes some 0700/0600),
    so that a serving process running as another user can read the export."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def check_tflite_file(path: str | os.PathLike) -> Path:
    """The TensorFlow Lite file to write: a new name in an existing folder we can write."""
    if not str(path):
        raise UsageError("--tflite needs a file name")
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise UsageError(f"{path}: already exists; choose a new file for the TensorFlow Lite model")
    check_name("--tflite", path.name)
    folder = path.absolute().parent
    if not folder.is_dir():
        raise UsageError(f"{path}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: cannot write in {folder}")
    return path


def export_tflite(model: keras.Model, path: str | os.PathLike, quantize: str = "none") -> Path:
    """Write ``model`` as a new TensorFlow Lite file; ``int8`` is calibrated on 200 of
    the sample's training digits."""
    path = check_tflite_file(path)
    representative = None
    if quantize == "int8":
        (images, _), _ = data.sample_arrays()
        representative = data.to_float(images[:200])
    return write_atomic(path, tflite_bytes(model, quantize, representative))


