"""Serving a trained CNN over HTTP: TensorFlow Serving's REST API, and a draw-a-digit page.

    mnist-cnn-serve exported/                 # a base folder: its newest version, polled for new ones
    mnist-cnn-serve exported/2                # one version folder, or a run's model.keras
    # http://127.0.0.1:8000/  -- draw a digit, watch the ten probabilities

TensorFlow Serving's REST API (https://www.tensorflow.org/tfx/serving/api_rest), so that a
client written for TensorFlow Serving runs unchanged:

- ``GET /v1/models/mnist[/versions/N]``: the version's status; ``.../metadata``: every
  signature as TensorInfo JSON (``DT_FLOAT``, ``tensor_shape``, tensor names, ``method_name``);
- ``POST /v1/models/mnist[/versions/N]:predict``, row format ``{"instances": [...]}`` ->
  ``{"predictions": [{"probabilities": [...], "digits": d}, ...]}`` or columnar
  ``{"inputs": ...}`` -> ``{"outputs": {...}}``; ``"signature_name"``: ``serving_default``
  (float32 images) or ``serve_uint8`` (integers 0-255); images ``(28, 28, 1)``, up to
  ``MAX_INSTANCES`` a request; ``:classify`` and ``:regress`` are answered as TensorFlow
  Serving answers them for a predict-only model.
- Errors are ``{"error": "..."}`` with a 4xx status (404: no such model, version or page).

``POST /predict`` (the page's) takes one image: a PNG or JPEG body (recognised by its bytes;
the page sends its canvas so), prepared as ``mnist-cnn-predict`` prepares files, or JSON
``{"image": [[...], ...]}`` (28x28 values in 0..1 as they are; any other size 0..255 prepared
like a file). It answers ``{"digit": d, "probabilities": [10 floats]}``.

Facing a network: the HTTP/1.1 server is uvicorn's (keep-alive, pipelining, ``100
Continue``, IPv4 and IPv6; an idle connection costs a socket, not a thread), its connections
bounded in ``connections``. Each request has a whole-request deadline, ``request_seconds``
from its first byte: its headers and body must have arrived by then, however the bytes
trickle in (or the connection is closed), and it is answered by then (or gets 504; work
still queued for a worker is dropped). A body over
``MAX_BODY`` is refused from its length or as it is counted; bodies held at once are bounded
by ``BODY_BUDGET`` (503 past it); at most ``workers`` requests decode and predict at once.
Images are decoded within a fixed budget (``decode``). Past ``MAX_CONNECTIONS`` open
connections, the connection that has waited longest for a request is closed to make room
(as nginx does), so silent sockets cannot lock a new client out. A request with both
``Content-Length`` and ``Transfer-Encoding`` is refused and its connection closed (RFC 9112
6.1: the two framings are how requests are smuggled past proxies). It binds 127.0.0.1 unless
told otherwise; it has no TLS or authentication: put it behind a proxy that has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mnist_cnn.serving import v2
from mnist_cnn.serving.connections import DEADLINE, REQUEST_SECONDS
from mnist_cnn.serving.core import Overloaded, Refused, Service
from mnist_cnn.serving.metrics import CONTENT_TYPE as METRICS_TYPE
from mnist_cnn.serving.page import PAGE
from mnist_cnn.serving.tfserving import (
    MAX_BODY,
    RequestError,
    finite,
    page_images,
    page_reply,
    predict_request,
    reply_of,
    unsupported_answer,
    version_number,
)

log = logging.getLogger(__name__)

BODY_BUDGET = 64 * MAX_BODY  # bytes of request bodies held at once, counted as they arrive
WORKERS = 4  # requests decoded and predicted at once
INLINE_BODY = 64 << 10  # bytes: a body this small (~4 images as JSON) is parsed on the event loop (~0.2 ms)


ROUTE = re.compile(r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]+))?"
                   r"(?::(?P<verb>classify|regress|predict)|(?P<metadata>/metadata))?", re.IGNORECASE)


class Budget:
    """Bytes of request bodies held at once (read, waiting or being parsed)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    @contextlib.contextmanager
    def held(self):
        taken = [0]
        try:
            yield taken
        finally:
            self.used -= taken[0]

    def take(self, taken: list, n: int) -> None:
        if self.used + n > self.limit:
            raise RequestError("the server is busy (too many request bodies at once); try again", 503)
        self.used += n
        taken[0] += n


async def read_body(request: Request, budget: Budget, taken: list) -> bytes:
    """The body, counted as it arrives: never more than ``MAX_BODY`` bytes kept, whatever the
    headers say (uvicorn has checked their syntax; a chunked body is counted the same way).
    An over-long body is read and dropped up to ``4 * MAX_BODY`` before the 413, so that the
    client reads the answer rather than a reset connection; past that it is cut."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        if int(length) <= 4 * MAX_BODY and "100-continue" not in request.headers.get("expect", "").lower():
            await _drop(request)
        raise RequestError(f"body of {int(length):,} bytes is over the {MAX_BODY:,}-byte limit", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            await _drop(request, size)
            raise RequestError(f"body is over the {MAX_BODY:,}-byte limit", 413)
        budget.take(taken, len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


async def _drop(request: Request, size: int = 0) -> None:
    async for chunk in request.stream():
        size += len(chunk)
        if size > 4 * MAX_BODY:
            return


def error(status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=headers)


def one_framing(app):
    """ASGI middleware: a request framed both by ``Content-Length`` and ``Transfer-Encoding``
    is answered 400 and its connection closed, whatever follows it on the connection."""
    async def checked(scope, receive, send):
        if scope["type"] == "http":
            names = {name for name, _ in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                response = error(400, "a request with both Content-Length and Transfer-Encoding is refused "
                                 "(RFC 9112 6.1)", headers={"Connection": "close"})
                return await response(scope, receive, send)
        return await app(scope, receive, send)
    return checked


V2_ROUTE = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[0-9]+))?(?:/(?P<verb>ready|infer))?")
METRICS_PATHS = ("/metrics", "/monitoring/prometheus/metrics")


def make_app(service: Service, request_seconds: float = REQUEST_SECONDS):
    """The ASGI app: TensorFlow Serving's REST API, the Open Inference Protocol (V2), health,
    metrics and the page over ``service``."""
    model = service.model
    budget = Budget(BODY_BUDGET)

    def endpoint(handler):
        """Every answer JSON: a client mistake is a 4xx, a request past its deadline 504, one still
        running at the end of a drain (or refused by a full batch queue) 503, a bug of ours a 500 and
        one log line. Each answer is counted by API and status (``request.state.api``)."""
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            loop = asyncio.get_running_loop()
            began = loop.time()
            deadline = request.scope.get(DEADLINE) or began + request_seconds
            request.state.api = "other"
            with budget.held() as taken:
                try:
                    response = await service.answer(handler(request, taken), deadline)
                except RequestError as e:  # an unread body is discarded by uvicorn, within the request deadline
                    response = error(e.status, str(e))
                except Overloaded as e:
                    response = error(503, str(e))
                except Refused as e:
                    response = error(504 if e.kind == "deadline" else 503, str(e))
                except ClientDisconnect:  # the client left (or missed the request deadline)
                    response = Response(status_code=400)
                except Exception as e:
                    log.error("%s %s: %s: %s", request.method, request.url.path[:100], type(e).__name__, str(e)[:200])
                    response = error(500, f"internal error ({type(e).__name__})")
            service.metrics.answered(request.state.api, response.status_code, loop.time() - began)
            return response
        return run

    async def page(request, taken):
        request.state.api = "page"
        return HTMLResponse(PAGE)

    @endpoint
    async def predict_page(request, taken):
        request.state.api = "page"
        body = await read_body(request, budget, taken)
        servable = model.current()
        images = await service.run(page_images, body, request.headers.get("content-type", ""))
        return JSONResponse(page_reply(await service.predict(servable, "serving_default", images)))

    @endpoint
    async def tf_serving(request, taken):
        path, method = request.url.path, request.method
        match = ROUTE.fullmatch(path)
        verb = match and match["verb"]
        request.state.api = f"rest_{verb.lower()}" if verb else "rest_metadata" if match and match["metadata"] \
            else "rest_status"
        if match is None:
            raise RequestError(f"Malformed request: {method} {path[:100]}", 404)
        if match["name"] != model.name:
            raise RequestError(f"Servable not found for request: Latest({match['name'][:60]})", 404)
        version = version_number(match["version"])
        servable = model.get(version)
        if servable is None and not (version in model.states and not verb and not match["metadata"]):
            raise RequestError(f"Servable not found for request: Specific({model.name}, {version})", 404)
        if (method == "POST") != bool(verb) or method not in ("GET", "HEAD", "POST"):
            raise RequestError(f"Malformed request: {method} {path[:100]}", 405)
        if method != "POST":
            return JSONResponse(model.metadata(servable) if match["metadata"] else model.status(version))
        body = await read_body(request, budget, taken)
        if verb.lower() == "predict":
            if len(body) <= INLINE_BODY:  # a few images: parsed here, cheaper than a worker's round trip
                signature, images, row = predict_request(servable, body)
            else:
                signature, images, row = await service.run(predict_request, servable, body)
            return JSONResponse(reply_of(finite(await service.predict(servable, signature, images)), row))
        return JSONResponse(await service.run(unsupported_answer, servable, body, verb.lower()))

    @endpoint
    async def open_inference(request, taken):
        path, method = request.url.path, request.method
        request.state.api = "v2_health"
        if path in ("/v2", "/v2/"):
            request.state.api = "v2_metadata"
            return JSONResponse(v2.server_metadata())
        if path == "/v2/health/live":
            return JSONResponse({"live": True})
        if path == "/v2/health/ready":
            return JSONResponse({"ready": service.ready}, 200 if service.ready else 400)
        match = V2_ROUTE.fullmatch(path)
        if match is None:
            raise RequestError(f"no page {path[:100]}", 404)
        verb = match["verb"]
        request.state.api = {"ready": "v2_health", "infer": "v2_infer"}.get(verb, "v2_metadata")
        if match["name"] != model.name:
            raise RequestError(f"Request for unknown model: '{match['name'][:60]}' is not found", 404)
        version = version_number(match["version"])
        servable = model.get(version)
        if servable is None:
            raise RequestError(f"Request for unknown model: '{model.name}' version {version} is not found", 404)
        if (method == "POST") != (verb == "infer"):
            raise RequestError(f"{method} is not allowed on {path[:100]}", 405)
        if verb == "ready":
            ready = service.ready and servable is model.current()
            return JSONResponse({"name": model.name, "ready": ready}, 200 if ready else 400)
        if verb is None:
            return JSONResponse(v2.model_metadata(model, servable))
        body = await read_body(request, budget, taken)
        arguments = (body, request.headers.get(v2.HEADER), servable)
        signature, images, wanted, request_id = v2.infer_request(*arguments) if len(body) <= INLINE_BODY \
            else await service.run(v2.infer_request, *arguments)
        outputs = await service.predict(servable, signature, images)
        payload, headers = v2.infer_reply(model, servable, outputs, wanted, request_id)
        kind = "application/octet-stream" if headers else "application/json"
        return Response(payload, 200, headers=headers, media_type=kind)

    async def metrics(request):
        return Response(service.metrics.exposition(), media_type=METRICS_TYPE)

    async def not_found(request, exc):
        message = "Method Not Allowed" if exc.status_code == 405 else f"no page {request.url.path[:100]}"
        return error(exc.status_code, message, getattr(exc, "headers", None))

    every = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
    routes = [Route("/", endpoint(page)), Route("/index.html", endpoint(page)),
              Route("/predict", predict_page, methods=["POST"]),
              *[Route(path, metrics, methods=["GET", "HEAD"]) for path in METRICS_PATHS],
              Route("/v1/{rest:path}", tf_serving, methods=every),
              Route("/v2", open_inference, methods=every), Route("/v2/{rest:path}", open_inference, methods=every)]
    return one_framing(Starlette(routes=routes, exception_handlers={HTTPException: not_found}))
