"""The ``mnist-cnn-serve`` process: both protocol faces on one event loop, and the graceful drain.

    server = Server("exported/", port=8000)   # loads and binds, or InputError
    server.run()                              # serves until SIGTERM or SIGINT

``run()`` serves TensorFlow Serving's REST API (uvicorn) and, with ``grpc_port``, its gRPC API
(gRPC's asyncio server) on one event loop, with one poller of new versions. Once a version is
warm, what is alive is frozen out of the garbage collector's passes (``core.settle_heap``). The signals are
ours, not uvicorn's (as MLServer coordinates its REST and gRPC shutdown itself): on the first
SIGTERM or SIGINT the service turns not ready, both listeners close (uvicorn closes the idle
keep-alive connections; gRPC refuses new calls), and what is in flight finishes; what is
still running ``drain_seconds`` later is answered 503 (gRPC ``UNAVAILABLE``). Then ``run()``
returns, and the command prints one line and exits 0. A second signal ends the drain at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import uvicorn

from mnist_cnn.errors import InputError, ModelFileError
from mnist_cnn.serving.connections import (
    KEEP_ALIVE_SECONDS,
    MAX_CONNECTIONS,
    REQUEST_SECONDS,
    DeadlineProtocol,
    connection_settings,
    listen,
)
from mnist_cnn.serving.core import (
    BATCH_THREADS,
    MAX_BATCH_SIZE,
    MAX_ENQUEUED_BATCHES,
    Service,
    poll_versions,
    settle_heap,
)
from mnist_cnn.serving.http import WORKERS, make_app
from mnist_cnn.serving.versions import MODEL_NAME, POLL_SECONDS, Model

log = logging.getLogger(__name__)

DRAIN_SECONDS = 30.0  # as Triton's --exit-timeout-secs
SETTLE = 0.25  # seconds without a new gRPC call before gRPC stops taking calls (see Server._stop_grpc)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server without its signal handlers: ``Server.run`` owns SIGTERM and SIGINT (uvicorn
    would re-raise the signal after its own shutdown, ending the process with status -15)."""

    def capture_signals(self):
        return contextlib.nullcontext()


class Server:
    """``Server(model_path, ...)`` loads the model and binds (both may raise ``InputError``,
    before anything serves); ``run()`` serves until SIGINT/SIGTERM and drains."""

    def __init__(self, model_path, host: str = "127.0.0.1", port: int = 8000, name: str = MODEL_NAME,
                 poll_seconds: float = POLL_SECONDS, request_seconds: float = REQUEST_SECONDS,
                 workers: int = WORKERS, drain_seconds: float = DRAIN_SECONDS, grpc_port: int | None = None,
                 grpc_start=None, max_connections: int = MAX_CONNECTIONS, max_batch_size: int = MAX_BATCH_SIZE,
                 batch_timeout: float = 0.0, max_enqueued_batches: int = MAX_ENQUEUED_BATCHES,
                 batch_threads: int = BATCH_THREADS):
        """``grpc_start``: ``serving.grpc.start`` (the grpc extra), which ``run()`` calls to answer
        TensorFlow Serving's gRPC API on ``grpc_port`` too."""
        self.socket = listen(host, port)  # a taken port is refused before the model loads
        try:
            self.model = Model(model_path, name)
            self.model.load()
        except BaseException:
            self.socket.close()
            raise
        self.host, self.grpc_port, self.grpc_start = host, grpc_port, grpc_start
        self.address = self.socket.getsockname()[:2]
        self.poll_seconds, self.request_seconds, self.drain_seconds = poll_seconds, request_seconds, drain_seconds
        self.service = Service(self.model, workers, max_batch_size, batch_timeout, max_enqueued_batches,
                               batch_threads)
        self.config = uvicorn.Config(make_app(self.service, request_seconds), http=DeadlineProtocol, lifespan="off",
                                     log_config=None, timeout_keep_alive=KEEP_ALIVE_SECONDS, limit_concurrency=None,
                                     timeout_graceful_shutdown=drain_seconds + 5)
        connection_settings(self.config, request_seconds, max_connections)
        self.signal: int | None = None  # the signal that stopped the server
        self.drain_took = 0.0
        self.warm_error: BaseException | None = None

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def run(self, started=None) -> None:
        """Serve until SIGTERM or SIGINT, then drain. ``started(grpc_port)`` is called once both
        faces listen (``grpc_port`` None without gRPC)."""
        try:
            asyncio.run(self._serve(started))
        finally:
            self.socket.close()
            self.service.close()

    async def _serve(self, started) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(number: int) -> None:
            if self.signal is None:
                self.signal = number
                stop.set()
            else:  # a second signal: refuse what is still in flight now
                self.service.expire()

        grpc_server = health = None
        if self.grpc_start is not None:
            grpc_server, self.grpc_port, health = self.grpc_start(self.service, self.host, self.grpc_port,
                                                                  self.request_seconds)
            await health.update()
            await grpc_server.start()
        web = _Uvicorn(self.config)
        serving = asyncio.create_task(web.serve(sockets=[self.socket]))
        poller = None
        loader = ThreadPoolExecutor(1, thread_name_prefix="mnist-cnn-warm-up")
        for number in SIGNALS:
            loop.add_signal_handler(number, on_signal, number)
        try:
            while not web.started and not serving.done():
                await asyncio.sleep(0.01)
            if serving.done():  # uvicorn could not start
                await serving
                raise InputError(f"cannot serve on {self.url}")
            if started is not None:
                started(self.grpc_port)
            # live from here; ready once the first version has replayed its warm-up requests
            warming = loop.run_in_executor(loader, self._warm_up)
            ended = asyncio.create_task(stop.wait())
            await asyncio.wait({ended, serving, warming}, return_when=asyncio.FIRST_COMPLETED)
            if warming.done() and not stop.is_set():
                self.warm_error = warming.exception()
                if self.warm_error is None:
                    if health is not None:  # gRPC's health first: HTTP answered ready before it said SERVING
                        await health.update(ready=True)
                    self.model.ready_up()
                    log.info("warmed up: version %d is ready (%d warm-up requests replayed)",
                             self.model.current().version, warming.result())
                    if self.model.base is not None:
                        poller = asyncio.create_task(poll_versions(self.model, self.poll_seconds))
                    await asyncio.wait({ended, serving}, return_when=asyncio.FIRST_COMPLETED)
            began = time.monotonic()
            if poller is not None:  # no new version swaps in while the served one drains
                poller.cancel()
            self.service.drain(self.drain_seconds)
            if health is not None:
                await health.update()
            web.should_exit = True
            stopping = [serving]
            if grpc_server is not None:
                stopping.append(asyncio.create_task(self._stop_grpc(grpc_server)))
            await asyncio.gather(*stopping)
            self.drain_took = time.monotonic() - began
        finally:
            for number in SIGNALS:
                loop.remove_signal_handler(number)
            if poller is not None:
                poller.cancel()
            if grpc_server is not None:
                await grpc_server.stop(None)
            loader.shutdown(wait=False, cancel_futures=True)
        if self.warm_error is not None:
            raise ModelFileError(f"{self.model.current().path}: cannot warm up: {self.warm_error}"[:400])

    def _warm_up(self) -> int:
        replayed = self.model.warm_up()
        settle_heap()  # before it turns ready: the collector's full passes would pause requests
        return replayed

    async def _stop_grpc(self, server) -> None:
        """Stop gRPC once the calls that had arrived have been answered. gRPC's asyncio server takes
        calls off the wire one at a time on the event loop, and ``stop()`` cancels those it has not
        taken yet (CANCELLED, though the client sent them before the signal: 6 of 10 did so when a
        REST load kept the loop busy). So the calls on gRPC's open connections are still taken and
        answered until none has been open for ``SETTLE`` seconds (at most ``drain_seconds``); then
        gRPC stops (its clients get GOAWAY and go elsewhere) and what remains is answered."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.drain_seconds
        seen, quiet_since = self.service.calls_begun, loop.time()
        while loop.time() < end and loop.time() - quiet_since < SETTLE:
            await asyncio.sleep(0.02)
            if self.service.calls_open or self.service.calls_begun != seen:
                seen, quiet_since = self.service.calls_begun, loop.time()
        await server.stop(max(0.0, end - loop.time()) + 1)
