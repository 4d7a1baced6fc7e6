"""TensorFlow Serving's gRPC API for ``mnist-cnn-serve --grpc-port N`` (the ``grpc`` extra:
``pip install ".[grpc]"``, which brings ``tensorflow-serving-api`` and ``grpcio``).

The same versions as the REST API (``servables.Model``) answer TensorFlow Serving's
``PredictionService.Predict`` / ``GetModelMetadata`` and ``ModelService.GetModelStatus``, so
a client built on the official stubs (``prediction_service_pb2_grpc.PredictionServiceStub``)
runs unchanged; ``Classify`` and ``Regress`` answer as TensorFlow Serving does for a
predict-only signature. Requests are bounded as the REST API's are: at most ``MAX_BODY`` bytes
a message (gRPC's own receive limit), ``MAX_INSTANCES`` images, shapes checked from the
TensorProto's header before its values are read, values finite in float32.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from mnist_cnn.errors import InputError
from mnist_cnn.servables import IMAGE, SIGNATURES, Model, Servable
from mnist_cnn.serve import MAX_BODY
from mnist_cnn.tfserving import FLOAT32_MAX, MAX_INSTANCES, METHOD_NAMES, RequestError, outputs_of

DTYPES = {np.float32: tf.float32.as_datatype_enum, np.uint8: tf.uint8.as_datatype_enum}


def _servable(model: Model, spec, context) -> Servable:
    if spec.name != model.name:
        context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name[:60]})")
    version = spec.version.value if spec.HasField("version") else None
    servable = model.get(version)
    if servable is None:
        context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({model.name}, {version})")
    return servable


def _images(request, servable: Servable, signature: str) -> np.ndarray:
    """The request's ``images`` tensor, its dtype and shape checked before its values are read."""
    if set(request.inputs) != {"images"}:
        raise RequestError(f"the signature has one input, images; got {sorted(request.inputs)[:5]}")
    proto = request.inputs["images"]
    dims = [d.size for d in proto.tensor_shape.dim]
    if len(dims) != 4 or tuple(dims[1:]) != IMAGE or not 1 <= dims[0] <= MAX_INSTANCES:
        raise RequestError(f"images must have shape [N, 28, 28, 1] with N from 1 to {MAX_INSTANCES}, got {dims}")
    if proto.dtype != DTYPES[SIGNATURES[signature]]:
        raise RequestError(f"{signature} takes {tf.as_dtype(DTYPES[SIGNATURES[signature]]).name} images, "
                           f"got {tf.as_dtype(proto.dtype).name if proto.dtype else 'no dtype'}")
    try:
        images = tf.make_ndarray(proto)
    except (ValueError, TypeError) as e:
        raise RequestError(f"images: {str(e)[:200]}") from None
    if images.shape != (dims[0], *IMAGE):
        raise RequestError(f"images hold {images.size} values, not {dims[0] * 784}")
    if images.dtype == np.float32 and (not np.isfinite(images).all() or np.abs(images).max() > FLOAT32_MAX):
        raise RequestError("images has a number out of range")
    return images


def _answering(response, model: Model, servable, signature: str = ""):
    """``response`` with its model_spec naming the model, version and signature that answered."""
    response.model_spec.name = model.name
    response.model_spec.version.value = servable.version
    if signature:
        response.model_spec.signature_name = signature
    return response


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, model: Model):
        self.model = model

    def Predict(self, request, context):
        servable = _servable(self.model, request.model_spec, context)
        signature = request.model_spec.signature_name or "serving_default"
        try:
            if signature not in servable.functions:
                raise RequestError(f'Serving signature name: "{signature[:60]}" not found in signature def')
            outputs = outputs_of(servable, signature, _images(request, servable, signature))
        except RequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        wanted = set(request.output_filter) or set(outputs)
        if wanted - set(outputs):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"output_filter names {sorted(wanted - set(outputs))}, "
                          f"not outputs of {signature}")
        response = _answering(predict_pb2.PredictResponse(), self.model, servable, signature)
        for name in sorted(wanted):
            response.outputs[name].CopyFrom(tf.make_tensor_proto(outputs[name]))
        return response

    def _other_kind(self, request, context, method: str):
        servable = _servable(self.model, request.model_spec, context)
        signature = request.model_spec.signature_name or "serving_default"
        if signature not in servable.signature_defs:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"No signature was found with the name: {signature[:60]}")
        kind, wanted = METHOD_NAMES[method]
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Expected {kind} signature method_name to be {wanted}. "
                      f"Was: {servable.method_name(signature)}")

    def Classify(self, request, context):
        self._other_kind(request, context, "classify")

    def Regress(self, request, context):
        self._other_kind(request, context, "regress")

    def GetModelMetadata(self, request, context):
        servable = _servable(self.model, request.model_spec, context)
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Metadata field signature_def is the only one supported; "
                          f"got {list(request.metadata_field)[:5]}")
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for name, signature in servable.signature_defs.items():
            signatures.signature_def[name].CopyFrom(signature)
        response = _answering(get_model_metadata_pb2.GetModelMetadataResponse(), self.model, servable)
        response.metadata["signature_def"].Pack(signatures)
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, model: Model):
        self.model = model

    def GetModelStatus(self, request, context):
        servable = _servable(self.model, request.model_spec, context)
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = servable.version
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return response


def start(model: Model, host: str, port: int, workers: int) -> tuple[grpc.Server, int]:
    """A started gRPC server for ``model`` on ``host:port`` (0: a free one): (server, port)."""
    server = grpc.server(ThreadPoolExecutor(workers, thread_name_prefix="mnist-cnn-grpc"),
                         options=[("grpc.max_receive_message_length", MAX_BODY)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(model), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(model), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise InputError(f"cannot listen for gRPC on {address} ({e})") from None
    if not bound:
        raise InputError(f"cannot listen for gRPC on {address}")
    server.start()
    return server, bound
