"""TensorFlow Serving's gRPC API for ``mnist-cnn-serve --grpc-port N`` (the ``grpc`` extra:
``pip install ".[grpc]"``, which brings ``tensorflow-serving-api`` and ``grpcio``).

The same versions as the REST API (``servables.Model``) answer TensorFlow Serving's
``PredictionService.Predict`` / ``GetModelMetadata`` and ``ModelService.GetModelStatus``, so
a client built on the official stubs (``prediction_service_pb2_grpc.PredictionServiceStub``)
runs unchanged; ``Classify`` and ``Regress`` answer as TensorFlow Serving does for a
predict-only signature. Requests are bounded as the REST API's are: at most ``MAX_BODY`` bytes
a message (gRPC's own receive limit), ``MAX_INSTANCES`` images, shapes checked from the
TensorProto's header before its values are read, values finite in float32. Every client
mistake is ``INVALID_ARGUMENT`` (``NOT_FOUND`` for a model or version that is not served).

The server is gRPC's asyncio server on the same event loop as the REST API: a call costs a
coroutine, not a thread, until its request has arrived, so stalled or slow clients hold no
worker; decoding and predicting share the REST API's bounded workers (``core.Service``), and
each call is answered within the request deadline (``DEADLINE_EXCEEDED`` past it) or, during
a drain, ``UNAVAILABLE`` at its end.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc
import numpy as np
import tensorflow as tf
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from mnist_cnn.errors import InputError
from mnist_cnn.serving.core import Overloaded, Refused, Service
from mnist_cnn.serving.tfserving import FLOAT32_MAX, MAX_BODY, MAX_INSTANCES, METHOD_NAMES, RequestError, finite
from mnist_cnn.serving.versions import IMAGE, SIGNATURES, Model, Servable

log = logging.getLogger(__name__)

DTYPES = {np.float32: tf.float32.as_datatype_enum, np.uint8: tf.uint8.as_datatype_enum}


class Failure(Exception):
    """A call answered with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code


def _version(model: Model, spec) -> int | None:
    """The version a ModelSpec names (None: the newest), once its model name and label are checked."""
    if spec.name != model.name:
        raise Failure(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name[:60]})")
    choice = spec.WhichOneof("version_choice")
    if choice == "version_label":  # no labels are configured here, so none is known
        raise Failure(grpc.StatusCode.INVALID_ARGUMENT,
                      f"Unrecognized servable version label: {spec.version_label[:60]}")
    return spec.version.value if choice == "version" else None


def _servable(model: Model, spec) -> Servable:
    version = _version(model, spec)
    servable = model.get(version)
    if servable is None:
        raise Failure(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({model.name}, {version})")
    return servable


def _dtype_name(enum: int) -> str:
    try:
        return tf.as_dtype(enum).name if enum else "no dtype"
    except TypeError:
        return f"dtype {enum}"


def _images(request, servable: Servable, signature: str) -> np.ndarray:
    """The request's ``images`` tensor, its dtype and shape checked before its values are read."""
    if set(request.inputs) != {"images"}:
        raise RequestError(f"the signature has one input, images; got {sorted(request.inputs)[:5]}")
    proto = request.inputs["images"]
    dims = [d.size for d in proto.tensor_shape.dim]
    if len(dims) != 4 or tuple(dims[1:]) != IMAGE or not 1 <= dims[0] <= MAX_INSTANCES:
        raise RequestError(f"images must have shape [N, 28, 28, 1] with N from 1 to {MAX_INSTANCES}, got {dims}")
    wanted = DTYPES[SIGNATURES[signature]]
    if proto.dtype != wanted:
        raise RequestError(f"{signature} takes {_dtype_name(wanted)} images, got {_dtype_name(proto.dtype)}")
    if proto.int_val and (min(proto.int_val) < 0 or max(proto.int_val) > 255):  # (NumPy 1.x would wrap them)
        bad = next(v for v in proto.int_val if not 0 <= v <= 255)
        raise RequestError(f"{signature} takes pixels 0..255, got {bad}")
    try:
        images = tf.make_ndarray(proto)
    except (ValueError, TypeError, OverflowError) as e:  # e.g. int_val 300 for uint8
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


API = {"Predict": "grpc_predict", "Classify": "grpc_classify", "Regress": "grpc_regress",
       "GetModelMetadata": "grpc_metadata", "GetModelStatus": "grpc_status"}


def call(method):
    """A servicer method ``method(self, request)`` as a gRPC handler: answered within the request
    deadline through the service, every failure a status with one line of details, every answer
    counted by API and status."""
    @functools.wraps(method)
    async def handler(self, request, context):
        loop = asyncio.get_running_loop()
        began = loop.time()
        self.service.calls_begun += 1
        self.service.calls_open += 1
        code = grpc.StatusCode.OK
        try:
            return await self.service.answer(method(self, request), began + self.request_seconds)
        except Failure as e:
            code, details = e.code, str(e)
        except RequestError as e:
            code = grpc.StatusCode.UNAVAILABLE if e.status == 503 else grpc.StatusCode.INVALID_ARGUMENT
            details = str(e)
        except Overloaded as e:
            code, details = grpc.StatusCode.UNAVAILABLE, str(e)
        except Refused as e:
            code = grpc.StatusCode.DEADLINE_EXCEEDED if e.kind == "deadline" else grpc.StatusCode.UNAVAILABLE
            details = str(e)
        except Exception as e:
            log.error("gRPC %s: %s: %s", method.__name__, type(e).__name__, str(e)[:200])
            code, details = grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})"
        finally:
            self.service.calls_open -= 1
            self.service.metrics.answered(API[method.__name__], code.name, loop.time() - began)
        await context.abort(code, details)
    return handler


class _Servicer:
    def __init__(self, service: Service, request_seconds: float):
        self.service, self.model, self.request_seconds = service, service.model, request_seconds


class PredictionService(_Servicer, prediction_service_pb2_grpc.PredictionServiceServicer):
    @call
    async def Predict(self, request):
        servable = _servable(self.model, request.model_spec)
        signature = request.model_spec.signature_name or "serving_default"
        if signature not in servable.functions:
            raise RequestError(f'Serving signature name: "{signature[:60]}" not found in signature def')
        images = await self.service.run(_images, request, servable, signature)
        outputs = finite(await self.service.predict(servable, signature, images))
        wanted = set(request.output_filter) or set(outputs)
        if wanted - set(outputs):
            raise RequestError(f"output_filter names {sorted(wanted - set(outputs))[:5]}, not outputs of {signature}")
        response = _answering(predict_pb2.PredictResponse(), self.model, servable, signature)
        for name in sorted(wanted):
            response.outputs[name].CopyFrom(tf.make_tensor_proto(outputs[name]))
        return response

    async def _other_kind(self, request, method: str):
        servable = _servable(self.model, request.model_spec)
        signature = request.model_spec.signature_name or "serving_default"
        if signature not in servable.signature_defs:
            raise RequestError(f"No signature was found with the name: {signature[:60]}")
        kind, wanted = METHOD_NAMES[method]
        raise RequestError(f"Expected {kind} signature method_name to be {wanted}. "
                           f"Was: {servable.method_name(signature)}")

    @call
    async def Classify(self, request):
        await self._other_kind(request, "classify")

    @call
    async def Regress(self, request):
        await self._other_kind(request, "regress")

    @call
    async def GetModelMetadata(self, request):
        servable = _servable(self.model, request.model_spec)
        if list(request.metadata_field) != ["signature_def"]:
            raise RequestError("Metadata field signature_def is the only one supported; "
                               f"got {[f[:60] for f in request.metadata_field[:5]]}")
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for name, signature in servable.signature_defs.items():
            signatures.signature_def[name].CopyFrom(signature)
        response = _answering(get_model_metadata_pb2.GetModelMetadataResponse(), self.model, servable)
        response.metadata["signature_def"].Pack(signatures)
        return response


class ModelService(_Servicer, model_service_pb2_grpc.ModelServiceServicer):
    @call
    async def GetModelStatus(self, request):
        """Every version the model knows, as the REST status (LOADING, AVAILABLE, UNLOADING, END)."""
        version = _version(self.model, request.model_spec)
        known = self.model.status(version)["model_version_status"]
        if not known:
            raise Failure(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({self.model.name}, "
                          f"{version})")
        response = get_model_status_pb2.GetModelStatusResponse()
        for entry in known:
            status = response.model_version_status.add()
            status.version = int(entry["version"])
            status.state = get_model_status_pb2.ModelVersionStatus.State.Value(entry["state"])
        return response


MAX_CONCURRENT_CALLS = 10_000  # calls open at once (a stalled one costs memory, not a thread); more are refused


class Health:
    """The standard ``grpc.health.v1.Health`` service: SERVING when the service is ready, NOT_SERVING
    otherwise, for the whole server (``""``), the model's name and both TF Serving services."""

    NAMES = ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")

    def __init__(self, service: Service):
        self.service = service
        self.servicer = health.aio.HealthServicer()
        self.ready = None

    async def update(self, ready: bool | None = None) -> None:
        """Publish the service's readiness, or ``ready`` (before the service turns so), when it changed."""
        ready = self.service.ready if ready is None else ready
        if ready != self.ready:
            self.ready = ready
            status = health_pb2.HealthCheckResponse.SERVING if self.ready else \
                health_pb2.HealthCheckResponse.NOT_SERVING
            for name in (*self.NAMES, self.service.model.name):
                await self.servicer.set(name, status)


def start(service: Service, host: str, port: int, request_seconds: float) -> tuple[grpc.aio.Server, int, Health]:
    """A gRPC server for ``service`` bound to ``host:port`` (0: a free one), not yet started
    (``await server.start()`` on the serving event loop): (server, port, its health service)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_BODY)],
                             maximum_concurrent_rpcs=MAX_CONCURRENT_CALLS)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(service, request_seconds), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(service, request_seconds), server)
    checks = Health(service)
    health_pb2_grpc.add_HealthServicer_to_server(checks.servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise InputError(f"cannot listen for gRPC on {address} ({e})") from None
    if not bound:
        raise InputError(f"cannot listen for gRPC on {address}")
    return server, bound, checks
