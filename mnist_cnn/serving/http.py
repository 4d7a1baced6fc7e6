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
Continue``, IPv4 and IPv6; an idle connection costs a socket, not a thread). Each request has
a whole-request deadline, ``request_seconds`` from its first byte: its headers and body must
have arrived by then, however the bytes trickle in (or the connection is closed), and it is
answered by then (or gets 504; work still queued for a worker is dropped). A body over
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
import socket
from collections import OrderedDict

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from mnist_cnn.errors import InputError
from mnist_cnn.serving import v2
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
REQUEST_SECONDS = 10.0  # a request must have arrived, and been answered, within this of its first byte
KEEP_ALIVE_SECONDS = 5.0  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 4096  # open at once; past it the connection idle longest is closed
WORKERS = 4  # requests decoded and predicted at once
DEADLINE = "mnist_cnn.deadline"  # the scope key of a request's deadline (the event loop's clock)
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

    async def predict(servable, signature, images):
        return await service.predict(servable, signature, images)

    async def page(request, taken):
        request.state.api = "page"
        return HTMLResponse(PAGE)

    @endpoint
    async def predict_page(request, taken):
        request.state.api = "page"
        body = await read_body(request, budget, taken)
        servable = model.current()
        images = await service.run(page_images, body, request.headers.get("content-type", ""))
        return JSONResponse(page_reply(await predict(servable, "serving_default", images)))

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
            return JSONResponse(reply_of(finite(await predict(servable, signature, images)), row))
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
        outputs = await predict(servable, signature, images)
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


# -- the HTTP/1.1 connections ---------------------------------------------------------------


class Room:
    """Room for new clients: the connections waiting for a request (none begun), in the order they
    began to wait. When the open connections pass ``cap``, those that have waited longest are
    closed -- first those that never sent a byte -- never a connection working on a request.

    Closing is paced: ``BATCH`` connections every ``GRACE`` seconds (1,000 a second). A client
    that reconnects whenever it is closed turns every close into a new connection in the listen
    queue; closing thousands at once kept that queue full, and a new client's predict took a
    median of 1.2 s (TCP's one-second SYN retry, by the look of it). The pause also lets a client that has just
    connected send its request before it could be taken for idle. Past twice the cap, a new
    connection is closed at once (the file descriptors' bound)."""

    GRACE = 0.05  # seconds between two rounds of closing
    BATCH = 50  # connections closed in one round

    def __init__(self, cap: int):
        self.cap = cap
        self.idle: OrderedDict = OrderedDict()  # DeadlineProtocol -> None
        self._pending = None

    def waiting(self, connection) -> None:
        self.idle[connection] = None
        self.idle.move_to_end(connection)

    def working(self, connection) -> None:
        self.idle.pop(connection, None)

    def check(self, connections: set, loop) -> None:
        if len(connections) > self.cap and self._pending is None:
            self._pending = loop.call_later(self.GRACE, self._make_room, connections, loop)

    def _make_room(self, connections: set, loop) -> None:
        self._pending = None
        excess = min(len(connections) - self.cap, self.BATCH)
        if excess <= 0:
            return
        silent = [c for c in self.idle if not c.heard][:excess]
        heard = [c for c in self.idle if c.heard][:excess - len(silent)] if len(silent) < excess else []
        for connection in silent + heard:
            connection.close_idle()
        self.check(connections, loop)


class DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a whole-request deadline and room for new clients
    (``Room``, as ``Config.room``).

    Deadline: from the moment a connection waits for a request, its headers and body must have
    arrived within ``request_seconds`` (``Config.request_seconds``), however slowly the bytes
    trickle in, or the connection is closed; the request's scope carries its deadline to
    answer by (``request_seconds`` from its first byte)."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self._deadline = None
        self._first_byte = None
        self._arm()
        room = self.config.room
        if len(self.connections) > 2 * room.cap:
            self.close_idle()
        else:
            room.check(self.connections, self.loop)

    @property
    def heard(self) -> bool:
        """Whether the connection has sent a byte of the request it is waiting for."""
        return self._first_byte is not None

    def data_received(self, data: bytes) -> None:
        if self._first_byte is None:
            self._first_byte = self.loop.time()
        super().data_received(data)

    def handle_events(self):
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self.cycle is not None:  # a request began
            started = self._first_byte if self._first_byte is not None else self.loop.time()
            self.cycle.scope[DEADLINE] = started + self._seconds()
            self.config.room.working(self)

    def on_response_complete(self):
        self._first_byte = None
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc):
        if self._deadline is not None:
            self._deadline.cancel()
        self.config.room.working(self)
        super().connection_lost(exc)

    def _seconds(self) -> float:
        return getattr(self.config, "request_seconds", REQUEST_SECONDS)

    def _arm(self):
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self._seconds(), self._expire)
        self.config.room.waiting(self)

    def close_idle(self):
        self.config.room.working(self)
        self.connections.discard(self)  # uvicorn's connection_lost does it too, once the socket has closed
        if not self.transport.is_closing():
            self.transport.close()

    def _expire(self):
        cycle = self.cycle
        waiting = cycle is None or cycle.response_complete or cycle.more_body  # headers or body still due
        if waiting and not self.transport.is_closing():
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()


def connection_settings(config, request_seconds: float, max_connections: int = MAX_CONNECTIONS) -> None:
    """What ``DeadlineProtocol`` reads from uvicorn's ``Config``."""
    config.request_seconds = request_seconds
    config.room = Room(max_connections)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host`` (IPv4 or IPv6) and ``port`` (0: any free one)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, OverflowError, UnicodeError) as e:
        raise InputError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 too
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock
