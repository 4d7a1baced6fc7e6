"""The Open Inference Protocol (KServe's V2, Triton's HTTP/REST API) over the same versions, so
that ``tritonclient.http.InferenceServerClient`` and KServe clients run unchanged
(https://github.com/kserve/open-inference-protocol, ``inference_rest.md``; the binary tensor
extension as Triton documents it in ``extension_binary_data.md``).

- ``GET /v2``: server metadata; ``GET /v2/health/live`` and ``/v2/health/ready``: 200, or 400
  when not (the spec's 4xx);
- ``GET /v2/models/mnist[/versions/N]``: model metadata; ``.../ready``: the model's readiness;
- ``POST /v2/models/mnist[/versions/N]/infer``: one input ``images`` of shape [N, 28, 28, 1],
  ``FP32`` (values in [0, 1], the ``serving_default`` signature) or ``UINT8`` (pixels 0-255,
  ``serve_uint8``), as JSON ``data`` (flat or nested, row-major) or as binary data after the JSON
  header (``Inference-Header-Content-Length`` and the input's ``binary_data_size``); outputs
  ``probabilities`` (FP32 [N, 10]) and ``digits`` (INT64 [N]), all or those named, each as JSON or
  binary (the output's ``binary_data``, else the request's ``binary_data_output``).

Errors are ``{"error": "..."}``: 400 for a request the model cannot take, 404 for a model or
version that is not served. Every check is made on the header before a value is read.
"""

from __future__ import annotations

import json
import math

import numpy as np

from mnist_cnn import __version__
from mnist_cnn.serving.tfserving import MAX_INSTANCES, RequestError, finite, may_hold_booleans, numbers, parse_json
from mnist_cnn.serving.versions import IMAGE, Model, Servable

HEADER = "inference-header-content-length"
INPUTS = {"FP32": ("serving_default", np.float32), "UINT8": ("serve_uint8", np.uint8)}
OUTPUTS = {"probabilities": ("FP32", np.dtype("<f4"), [-1, 10]), "digits": ("INT64", np.dtype("<i8"), [-1])}


def server_metadata() -> dict:
    return {"name": "mnist_cnn", "version": __version__, "extensions": ["binary_tensor_data"]}


def model_metadata(model: Model, servable: Servable) -> dict:
    """The model's metadata: its one input as FP32 (UINT8 pixels are taken too, through serve_uint8)."""
    return {"name": model.name, "versions": [str(servable.version)], "platform": "tensorflow_savedmodel",
            "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, *IMAGE]}],
            "outputs": [{"name": name, "datatype": datatype, "shape": shape}
                        for name, (datatype, _, shape) in OUTPUTS.items()]}


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object")
    return value


def infer_request(body: bytes, header_length: str | None, servable: Servable):
    """An ``infer`` body: (signature, images, {output name: binary?}, request id)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise RequestError(f"{HEADER} must be the length of the JSON header, at most the body's "
                               f"{len(body):,} bytes; got {header_length[:30]!r}")
        header, binary = body[:int(header_length)], body[int(header_length):]
    else:
        header, binary = body, b""
    request = _object(parse_json(header), "the request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise RequestError("the model has one input, images: 'inputs' must list exactly one tensor")
    tensor = _object(inputs[0], "an input")
    if tensor.get("name") != "images":
        raise RequestError(f"unexpected input {str(tensor.get('name'))[:60]!r}; the model's input is 'images'")
    datatype = tensor.get("datatype")
    if datatype not in INPUTS:
        raise RequestError(f"images must be FP32 (values in [0, 1]) or UINT8 (pixels 0-255), got {str(datatype)[:20]}")
    signature, dtype = INPUTS[datatype]
    if signature not in servable.functions:
        raise RequestError(f"this version has no {signature} signature for {datatype} images")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4 or not all(type(d) is int for d in shape)
            or tuple(shape[1:]) != IMAGE or not 1 <= shape[0] <= MAX_INSTANCES):
        raise RequestError(f"images must have shape [N, 28, 28, 1] with N from 1 to {MAX_INSTANCES}, "
                           f"got {str(shape)[:60]}")
    size = math.prod(shape)
    parameters = _object(tensor.get("parameters", {}), "an input's parameters")
    if "binary_data_size" in parameters:
        nbytes = parameters["binary_data_size"]
        if type(nbytes) is not int or nbytes != size * np.dtype(dtype).itemsize or nbytes != len(binary):
            raise RequestError(f"images' binary_data_size must be {size * np.dtype(dtype).itemsize:,} bytes "
                               f"({datatype} {shape}) and the binary data after the header; got {str(nbytes)[:20]} "
                               f"and {len(binary):,}")
        images = np.frombuffer(binary, np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
        if dtype is np.float32 and not np.isfinite(images).all():
            raise RequestError("images has a number that is not finite")
    else:
        if binary:
            raise RequestError("binary data after the header, but no input has a binary_data_size")
        data = tensor.get("data")
        if isinstance(data, list) and len(data) > size:
            raise RequestError(f"images hold more than {size:,} values")
        values = numbers(data, "images", max_depth=4, booleans=may_hold_booleans(header))
        if values.size != size:
            raise RequestError(f"images hold {values.size:,} values; shape {shape} needs {size:,}")
        values = values.reshape(shape)
        if dtype is np.uint8 and ((values != np.round(values)).any() or values.min() < 0 or values.max() > 255):
            raise RequestError("UINT8 images take whole numbers 0..255")
        images = values.astype(dtype)
    default = bool(_object(request.get("parameters", {}), "the request's parameters").get("binary_data_output"))
    wanted = {}
    for output in request.get("outputs") or [{"name": name} for name in OUTPUTS]:
        output = _object(output, "a requested output")
        if output.get("name") not in OUTPUTS:
            raise RequestError(f"unexpected output {str(output.get('name'))[:60]!r}; the model's outputs are "
                               f"{', '.join(OUTPUTS)}")
        wanted[output["name"]] = bool(_object(output.get("parameters", {}), "an output's parameters").get(
            "binary_data", default))
    request_id = request.get("id")
    return signature, images, wanted, request_id if isinstance(request_id, str) else None


def infer_reply(model: Model, servable: Servable, outputs: dict[str, np.ndarray], wanted: dict[str, bool],
                request_id: str | None) -> tuple[bytes, dict[str, str]]:
    """The ``infer`` response: (body, extra headers); binary outputs follow the JSON header."""
    outputs = finite(outputs)
    reply = {"model_name": model.name, "model_version": str(servable.version), "outputs": []}
    if request_id is not None:
        reply["id"] = request_id
    blobs = []
    for name, binary in wanted.items():
        datatype, dtype, _ = OUTPUTS[name]
        value = outputs[name].astype(dtype)
        tensor = {"name": name, "datatype": datatype, "shape": list(value.shape)}
        if binary:
            blob = value.tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = value.ravel().tolist()
        reply["outputs"].append(tensor)
    header = json.dumps(reply, separators=(",", ":")).encode()
    if not blobs:
        return header, {}
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}
