"""TensorFlow Serving's warm-up file: ``assets.extra/tf_serving_warmup_requests`` in a SavedModel.

TensorFlow Serving replays it before a version serves (https://www.tensorflow.org/tfx/serving/saved_model_warmup):
a TFRecord file of serialized ``PredictionLog`` protos, at most 1,000 records. ``mnist-cnn-export``
writes one (``write``: a request of one image and one of eight for each signature, so that the
first real requests meet traced, warm functions), and ``mnist-cnn-serve`` replays it (``read``).

The protos are written and read here on the wire format (protobuf's field numbers from
``tensorflow_serving/apis``: PredictionLog.predict_log = 6, PredictLog.request = 1,
PredictRequest.model_spec = 1 and inputs = 2 (a map: entries of key = 1 and value = 2),
ModelSpec.name = 1 and signature_name = 3), with TensorFlow's own ``TensorProto``, so that
exporting needs no ``tensorflow-serving-api``; a test parses the file with it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2

from mnist_cnn.errors import ModelFileError

FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_RECORDS = 1000  # TensorFlow Serving's own bound
MAX_BYTES = 64 << 20


# -- the wire format (just what a PredictionLog of a PredictRequest needs) -----------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _fields(data: bytes) -> list[tuple[int, bytes]]:
    """(field number, payload) of a message's length-delimited fields; others are skipped."""
    fields, pos = [], 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        if kind == 0:
            _, pos = _read_varint(data, pos)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == 2:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("a field runs past the end of its message")
            fields.append((number, data[pos:pos + size]))
            pos += size
        else:
            raise ValueError(f"wire type {kind}")
    return fields


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("a truncated varint")
        byte = data[pos]
        n |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return n, pos


def prediction_log(model_name: str, signature: str, images: np.ndarray) -> bytes:
    """A serialized ``PredictionLog`` whose ``predict_log.request`` asks ``signature`` for ``images``."""
    spec = _field(1, model_name.encode()) + _field(3, signature.encode())
    entry = _field(1, b"images") + _field(2, tf.make_tensor_proto(images).SerializeToString())
    request = _field(1, spec) + _field(2, entry)
    return _field(6, _field(1, request))


def parse_prediction_log(record: bytes) -> tuple[str, dict[str, np.ndarray]]:
    """(signature name, inputs) of a serialized ``PredictionLog`` of a predict request."""
    logs = [payload for number, payload in _fields(record) if number == 6]
    if len(logs) != 1:
        raise ValueError("not a PredictionLog of a predict request")
    requests = [payload for number, payload in _fields(logs[0]) if number == 1]
    if len(requests) != 1:
        raise ValueError("a PredictLog without its request")
    signature, inputs = "", {}
    for number, payload in _fields(requests[0]):
        if number == 1:
            signature = next((p.decode() for n, p in _fields(payload) if n == 3), "")
        elif number == 2:
            entry = dict(_fields(payload))
            inputs[entry.get(1, b"").decode()] = tf.make_ndarray(tensor_pb2.TensorProto.FromString(entry.get(2, b"")))
    return signature or "serving_default", inputs


# -- the file -------------------------------------------------------------------------------


def requests() -> list[tuple[str, np.ndarray]]:
    """What an export replays: one blank image and eight, through each signature (float32 and uint8):
    the shapes a server meets first, traced before a client waits on them."""
    return [(signature, np.zeros((n, 28, 28, 1), dtype)) for n in (1, 8)
            for signature, dtype in (("serving_default", np.float32), ("serve_uint8", np.uint8))]


def write(folder: str | os.PathLike, model_name: str, warm: list[tuple[str, np.ndarray]]) -> Path:
    """``folder``/assets.extra/tf_serving_warmup_requests holding ``warm``: (signature, images) pairs."""
    path = Path(folder) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, images in warm[:MAX_RECORDS]:
            writer.write(prediction_log(model_name, signature, images))
    return path


def read(folder: str | os.PathLike) -> list[tuple[str, dict[str, np.ndarray]]] | None:
    """The warm-up requests of a SavedModel ``folder`` as (signature, inputs), or None when it has
    none; a file that is not a regular file under ``MAX_BYTES`` of at most ``MAX_RECORDS`` valid
    records is a ``ModelFileError`` (one line)."""
    path = Path(folder) / FILE
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    if not path.is_file() or path.is_symlink() or info.st_size > MAX_BYTES:
        raise ModelFileError(f"{path}: not a regular file of at most {MAX_BYTES:,} bytes")
    found = []
    try:
        for record in tf.data.TFRecordDataset(str(path)).take(MAX_RECORDS + 1):
            found.append(parse_prediction_log(record.numpy()))
    except (ValueError, TypeError, UnicodeDecodeError, tf.errors.OpError) as e:
        raise ModelFileError(f"{path}: not TensorFlow Serving's warm-up records ({str(e).splitlines()[0][:100]})"
                             ) from None
    if len(found) > MAX_RECORDS:
        raise ModelFileError(f"{path}: more than {MAX_RECORDS} warm-up records (TensorFlow Serving's bound)")
    return found
