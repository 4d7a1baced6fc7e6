"""TensorFlow Serving's API semantics, shared by the REST server (``serve``) and the gRPC one
(``grpc_serve``): what a predict request may hold and what it is answered, as TensorFlow
Serving answers it (https://www.tensorflow.org/tfx/serving/api_rest).

- ``images_of``: a ``:predict`` body's signature and images (row or columnar format),
  checked strictly: rectangular, numbers only, at most ``MAX_INSTANCES`` images of
  ``(28, 28, 1)``, values finite in float32 (whole numbers 0..255 for ``serve_uint8``);
- ``finite``: the model's outputs, which must be finite (a JSON answer never holds NaN);
- ``reply_of``: the row (``predictions``) or columnar (``outputs``) answer;
- ``page_image``: the draw-a-digit page's one image (a PNG or JPEG by its bytes, or JSON);
- ``unsupported_answer``: ``:classify`` / ``:regress`` on a predict-only signature.

Every client mistake is a ``RequestError`` with its HTTP status.
"""

from __future__ import annotations

import numpy as np
import orjson

from mnist_cnn.errors import InputError
from mnist_cnn.export import MAX_VERSION
from mnist_cnn.predict import ImageError, mnist_style
from mnist_cnn.serving.decode import JPEG, MAX_SIDE, PNG, decode_image
from mnist_cnn.serving.versions import IMAGE, SIGNATURES, Servable

MAX_BODY = 4 << 20  # bytes of a request (REST body, gRPC message): 256 float images as JSON are about 1.6 MB
MAX_INSTANCES = 256  # images in one :predict request
FLOAT32_MAX = float(np.finfo(np.float32).max)


class RequestError(InputError):
    """A request the server answers with a 4xx (or 503) status and ``{"error": ...}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# -- request bodies ---------------------------------------------------------------------


def numbers(value, what: str, max_depth: int, booleans: bool = True) -> np.ndarray:
    """A JSON array of numbers (at most ``max_depth`` deep) as float64, strictly:
    rectangular, numbers only (no strings, booleans or nulls), finite in float32.

    ``booleans``: whether the JSON it came from may hold ``true`` or ``false`` (the caller looked
    at the bytes). When it cannot, NumPy converts the array at C speed and refuses what is not a
    rectangular array of numbers itself (strings, nulls, objects, ragged rows, huge integers);
    anything it refuses is checked the slow way, for the exact one-line error. (NumPy would take a
    boolean among numbers as 0 or 1: hence the look at the bytes.)"""
    if not booleans and isinstance(value, list):
        try:
            array = np.array(value)
        except (ValueError, OverflowError, TypeError):
            array = None
        if array is not None and array.dtype.kind in "iuf" and 1 <= array.ndim <= max_depth and array.size:
            array = array.astype(np.float64, copy=False)
            if not np.isfinite(array).all() or np.abs(array).max() > FLOAT32_MAX:
                raise RequestError(f"{what} has a number out of range (float32 holds at most {FLOAT32_MAX:.4g})")
            return array
    shape, level = [], [value]
    while all(isinstance(v, list) for v in level):
        if len(shape) == max_depth:
            raise RequestError(f"{what} is nested deeper than {max_depth} levels")
        lengths = {len(v) for v in level}
        if len(lengths) > 1:
            raise RequestError(f"{what} must be a rectangular array of numbers")
        shape.append(lengths.pop())
        if shape[-1] == 0:
            raise RequestError(f"{what} must be a non-empty array")
        level = [x for v in level for x in v]
    if not shape:
        raise RequestError(f"{what} must be a non-empty array, got {type(value).__name__}")
    kinds = {type(v) for v in level} - {int, float}
    if kinds & {list, dict}:
        raise RequestError(f"{what} must be a rectangular array of numbers")
    if kinds:
        raise RequestError(f"{what} must hold numbers only, not {sorted(k.__name__ for k in kinds)}")
    try:
        array = np.array(level, dtype=np.float64).reshape(shape)
    except OverflowError:
        raise RequestError(f"{what} has a number out of range") from None
    if not np.isfinite(array).all() or np.abs(array).max() > FLOAT32_MAX:
        raise RequestError(f"{what} has a number out of range (float32 holds at most {FLOAT32_MAX:.4g})")
    return array


def parse_json(body: bytes):
    """A request body's JSON (orjson: ~4x json's speed on arrays of numbers; NaN and Infinity,
    which are not JSON, are refused)."""
    try:
        return orjson.loads(body or b"null")
    except (orjson.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        if "infinity" in reason or "64-bit" in reason:  # 1e400, or an integer of 400 digits
            raise RequestError(f"body has a number out of range (float32 holds at most {FLOAT32_MAX:.4g})") from None
        raise RequestError(f"body is not JSON ({reason[:100]})") from None


def may_hold_booleans(body: bytes) -> bool:
    return b"true" in body or b"false" in body


def version_number(text: str | None) -> int | None:
    """A version from a request's path (digits; None when it names none), as TensorFlow Serving
    reads it: an int64, or a 400."""
    if text is None:
        return None
    if len(text) > 19 or int(text) > MAX_VERSION:  # (int() of over 4,300 digits raises)
        raise RequestError(f"Failed to convert version: {text[:30]} to numeric.")
    return int(text)


def signature_of(payload, servable: Servable) -> str:
    signature = payload.get("signature_name", "serving_default")
    if not isinstance(signature, str):
        raise RequestError("'signature_name' key must be a string value")
    if signature not in servable.signature_defs:
        raise RequestError(f'Serving signature name: "{signature[:60]}" not found in signature def')
    return signature


def images_of(payload, servable: Servable, booleans: bool = True) -> tuple[str, np.ndarray, bool]:
    """A TensorFlow Serving predict request: (signature name, images, row format?). ``booleans``:
    whether its JSON may hold true or false (``numbers``)."""
    if not isinstance(payload, dict):
        raise RequestError('expected a JSON object with "instances" (row format) or "inputs" (columnar format)')
    signature = signature_of(payload, servable)
    if signature not in servable.functions:
        raise RequestError(f"signature {signature!r} is not one this server runs; use {sorted(servable.functions)}")
    if ("instances" in payload) == ("inputs" in payload):
        raise RequestError('expected exactly one of "instances" (row format) or "inputs" (columnar format)')
    row = "instances" in payload
    value = payload["instances"] if row else payload["inputs"]
    if row and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        if any(set(v) != {"images"} for v in value):
            raise RequestError('each instance must be {"images": ...}: the signature has one input, images')
        value = [v["images"] for v in value]
    elif not row and isinstance(value, dict):
        if set(value) != {"images"}:
            raise RequestError('inputs must be {"images": ...}: the signature has one input, images')
        value = value["images"]
    if isinstance(value, list) and len(value) > MAX_INSTANCES:
        raise RequestError(f"{len(value)} images in one request; at most {MAX_INSTANCES}")
    images = numbers(value, "images", max_depth=4, booleans=booleans)
    if images.shape[1:] != IMAGE:
        raise RequestError(f"images must have shape [N, 28, 28, 1], got {list(images.shape)}")
    if SIGNATURES[signature] is np.uint8:
        if (images != np.round(images)).any() or images.min() < 0 or images.max() > 255:
            raise RequestError(f"{signature} takes whole numbers 0..255")
        return signature, images.astype(np.uint8), row
    return signature, images.astype(np.float32), row


def finite(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs, which must be finite: a JSON answer never holds NaN."""
    if not all(np.isfinite(v).all() for v in outputs.values()):
        raise RequestError("the model's outputs for these images are not finite (pixel values far outside 0..1?)")
    return outputs


def reply_of(outputs: dict[str, np.ndarray], row: bool) -> dict:
    """TensorFlow Serving's response: per image in the row format, per output in the columnar one."""
    lists = {name: value.tolist() for name, value in outputs.items()}
    if row:
        return {"predictions": [dict(zip(lists, values, strict=True)) for values in zip(*lists.values(), strict=True)]}
    return {"outputs": lists}


def page_image(body: bytes, content_type: str) -> np.ndarray:
    """The one image of a ``POST /predict`` as a float32 (28, 28) MNIST digit: a PNG or JPEG
    by its first bytes (whatever the Content-Type says), else JSON ``{"image": ...}``."""
    if body.startswith((PNG, JPEG)):
        try:
            image = decode_image(body)
        except ImageError as e:
            raise RequestError(f"the image is {e}" if str(e).startswith(("not", "a ")) else f"the image: {e}") from None
    elif content_type.startswith("image/"):
        raise RequestError("the body is not a PNG or JPEG image (the only formats this server decodes)")
    else:
        payload = parse_json(body)
        if not isinstance(payload, dict) or "image" not in payload:
            raise RequestError('expected a PNG or JPEG body, or a JSON object {"image": [[...], ...]}')
        image = numbers(payload["image"], "image", max_depth=2)
        if image.ndim != 2:
            raise RequestError(f"image must be a non-empty 2-D array, got shape {list(image.shape)}")
        if image.shape == (28, 28) and image.min() >= 0 and image.max() <= 1:
            return image.astype(np.float32)  # already an MNIST digit
        if image.min() < 0 or image.max() > 255:
            raise RequestError("pixel values must be 0..1 for a 28x28 digit, or 0..255 for any other size")
        if max(image.shape) > MAX_SIDE:
            raise RequestError(f"image must be at most {MAX_SIDE} pixels a side, got {image.shape[1]}x{image.shape[0]}")
    try:
        return mnist_style(image.astype(np.float32))
    except ImageError as e:
        raise RequestError(str(e)) from None


# -- the API ----------------------------------------------------------------------------


def page_images(body: bytes, content_type: str) -> np.ndarray:
    """The page's one image as the model's input (1, 28, 28, 1)."""
    return page_image(body, content_type)[None, ..., None]


def page_reply(outputs: dict[str, np.ndarray]) -> dict:
    p = finite(outputs)["probabilities"][0]
    return {"digit": int(np.argmax(p)), "probabilities": [round(float(v), 6) for v in p]}


def predict_request(servable: Servable, body: bytes) -> tuple[str, np.ndarray, bool]:
    """A ``:predict`` body: (signature, images, row format?)."""
    return images_of(parse_json(body), servable, may_hold_booleans(body))


METHOD_NAMES = {"classify": ("classification", "tensorflow/serving/classify"),
                "regress": ("regression", "tensorflow/serving/regress")}


def unsupported_answer(servable: Servable, body: bytes, method: str) -> dict:
    """``:classify`` / ``:regress``: TensorFlow Serving's answer for a signature of another kind."""
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise RequestError("JSON Value: not an object")
    signature = signature_of(payload, servable)
    kind, wanted = METHOD_NAMES[method]
    raise RequestError(f"Expected {kind} signature method_name to be {wanted}. Was: "
                       f"{servable.method_name(signature)}")
