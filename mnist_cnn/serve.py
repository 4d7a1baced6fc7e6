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
a whole-request deadline (``request_seconds`` for its headers and body together, however the
bytes trickle in); a body over ``MAX_BODY`` is refused from its length or as it is counted;
bodies held at once are bounded by ``BODY_BUDGET`` (503 past it); at most ``workers``
requests parse and predict at once. Images are decoded only as PNG or JPEG, their size read
from the header and refused before decoding. It binds 127.0.0.1 unless told otherwise; it
has no TLS or authentication: put it behind a proxy that has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from mnist_cnn.errors import InputError
from mnist_cnn.page import PAGE
from mnist_cnn.servables import MODEL_NAME, POLL_SECONDS, Model
from mnist_cnn.tfserving import RequestError, page_answer, predict_answer, unsupported_answer

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20  # bytes: 256 float images as JSON are about 1.6 MB
BODY_BUDGET = 64 * MAX_BODY  # bytes of request bodies held at once, counted as they arrive
REQUEST_SECONDS = 10.0  # a request's headers and body must have arrived within this
KEEP_ALIVE_SECONDS = 5.0  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 4096  # open at once; a request on a connection past it gets 503
WORKERS = 4  # requests parsed and predicted at once


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



def make_app(model: Model, workers: int = WORKERS, poll_seconds: float = POLL_SECONDS) -> Starlette:
    """The ASGI app: routes, a bounded pool for parsing and predicting, a poller of new versions."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="mnist-cnn-predict")
    budget = Budget(BODY_BUDGET)

    def endpoint(handler):
        """Every answer JSON: a client mistake is a 4xx, a bug of ours a 500 and one log line."""
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            with budget.held() as taken:
                try:
                    return await handler(request, taken)
                except RequestError as e:  # an unread body is discarded by uvicorn, within the request deadline
                    return error(e.status, str(e))
                except ClientDisconnect:  # the client left (or missed the request deadline)
                    return Response(status_code=400)
                except Exception as e:
                    log.error("%s %s: %s: %s", request.method, request.url.path[:100], type(e).__name__, str(e)[:200])
                    return error(500, f"internal error ({type(e).__name__})")
        return run

    async def work(function, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    async def page(request, taken):
        return HTMLResponse(PAGE)

    @endpoint
    async def predict_page(request, taken):
        body = await read_body(request, budget, taken)
        return JSONResponse(await work(page_answer, model.current(), body,
                                       request.headers.get("content-type", "")))

    @endpoint
    async def tf_serving(request, taken):
        path, method = request.url.path, request.method
        match = ROUTE.fullmatch(path)
        verb = match and match["verb"]
        if match is None:
            raise RequestError(f"Malformed request: {method} {path[:100]}", 404)
        if match["name"] != model.name:
            raise RequestError(f"Servable not found for request: Latest({match['name'][:60]})", 404)
        version = match["version"]
        if version is not None and int(version) >= 2**63:
            raise RequestError(f"Failed to convert version: {version[:30]} to numeric.")
        servable = model.get(None if version is None else int(version))
        if servable is None:
            raise RequestError(f"Servable not found for request: Specific({model.name}, {version[:30]})", 404)
        if (method == "POST") != bool(verb) or method not in ("GET", "HEAD", "POST"):
            raise RequestError(f"Malformed request: {method} {path[:100]}", 405)
        if method != "POST":
            return JSONResponse(model.metadata(servable) if match["metadata"] else model.status())
        body = await read_body(request, budget, taken)
        if verb.lower() == "predict":
            return JSONResponse(await work(predict_answer, servable, body))
        return JSONResponse(await work(unsupported_answer, servable, body, verb.lower()))

    async def not_found(request, exc):
        message = "Method Not Allowed" if exc.status_code == 405 else f"no page {request.url.path[:100]}"
        return error(exc.status_code, message, getattr(exc, "headers", None))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loader = ThreadPoolExecutor(1, thread_name_prefix="mnist-cnn-poll")  # loads never take a predict worker

        async def poll():
            while True:
                await asyncio.sleep(poll_seconds)
                await asyncio.get_running_loop().run_in_executor(loader, model.poll)

        task = asyncio.create_task(poll()) if model.base is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            loader.shutdown(wait=False, cancel_futures=True)
            pool.shutdown(wait=False, cancel_futures=True)

    routes = [Route("/", endpoint(page)), Route("/index.html", endpoint(page)),
              Route("/predict", predict_page, methods=["POST"]),
              Route("/v1/{rest:path}", tf_serving, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH",
                                                                "OPTIONS"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)


# -- the HTTP server --------------------------------------------------------------------


class DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a whole-request deadline: from the moment a
    connection waits for a request, its headers and body must have arrived within
    ``REQUEST_SECONDS`` (``Config.request_seconds``), however slowly the bytes trickle in;
    otherwise the connection is closed. Once a request is whole, the answer takes what it takes."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self._deadline = None
        self._arm()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc):
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self):
        if self._deadline is not None:
            self._deadline.cancel()
        seconds = getattr(self.config, "request_seconds", REQUEST_SECONDS)
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _expire(self):
        cycle = self.cycle
        waiting = cycle is None or cycle.response_complete or cycle.more_body  # headers or body still due
        if waiting and not self.transport.is_closing():
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()


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


class Server:
    """``Server(model_path, host, port)`` loads the model and binds (both may raise
    ``InputError``, before anything serves); ``run()`` serves until SIGINT/SIGTERM."""

    def __init__(self, model_path, host: str = "127.0.0.1", port: int = 8000, name: str = MODEL_NAME,
                 poll_seconds: float = POLL_SECONDS, request_seconds: float = REQUEST_SECONDS,
                 workers: int = WORKERS):
        self.socket = listen(host, port)  # a taken port is refused before the model loads
        try:
            self.model = Model(model_path, name)
            self.model.load()
        except BaseException:
            self.socket.close()
            raise
        self.address = self.socket.getsockname()[:2]
        self.config = uvicorn.Config(make_app(self.model, workers, poll_seconds), http=DeadlineProtocol,
                                     log_config=None, timeout_keep_alive=KEEP_ALIVE_SECONDS,
                                     limit_concurrency=MAX_CONNECTIONS, timeout_graceful_shutdown=5)
        self.config.request_seconds = request_seconds

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def run(self) -> None:
        try:
            uvicorn.Server(self.config).run(sockets=[self.socket])
        finally:
            self.socket.close()
