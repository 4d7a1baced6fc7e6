"""The core every protocol face shares: ``Service`` -- the workers that decode and predict,
server-side batching, each request's deadline, readiness, the drain and the metrics -- over the
versions ``versions.Model`` loads, and the poller that looks for new ones.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mnist_cnn.serving.metrics import Metrics
from mnist_cnn.serving.versions import Model, Servable

MAX_BATCH_SIZE = 32  # images merged into one model call (TF Serving's batching default)
MAX_ENQUEUED_BATCHES = 64  # batches' worth of images that may wait; past it 503 / UNAVAILABLE
BATCH_THREADS = 1  # batched model calls at once (TF Serving's num_batch_threads)


class Refused(Exception):
    """A request the service will not answer: ``kind`` is ``"deadline"`` (it ran past its
    deadline) or ``"draining"`` (still running when the drain's time was up)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Service:
    """What every protocol face shares: the model's versions, the workers that decode and predict
    (at most ``workers`` at once; a request waiting for one costs no thread), batching, each
    request's deadline, readiness, the drain and the metrics.

    ``answer(work, deadline)`` awaits a request's whole handling (reading its body, decoding,
    predicting) until ``deadline`` (the event loop's clock) or the end of a drain, whichever
    comes first; past either it raises ``Refused`` and the handling is cancelled: work that is
    still queued for a worker never runs, and work a worker has begun is bounded (decoding
    within its budget, one model call) and frees the worker when it ends.

    ``predict(servable, signature, images)``: the model's outputs, from a model call shared with
    the other requests waiting for the same version and signature (server-side batching, as
    TensorFlow Serving's ``--enable_batching``): when one of ``batch_threads`` model calls can start
    (TF Serving's ``num_batch_threads``; one by default: a call uses every core through TensorFlow's
    own threads, and two at once on 2 cores only contend), the requests waiting are merged, up to
    ``max_batch_size`` images, into one call, whose outputs are split back. With
    ``batch_timeout`` 0 (the default, as TF Serving advises on a CPU) only what is already waiting
    is merged, so batching adds no latency; a request of ``max_batch_size`` images or more runs
    alone, and ``max_batch_size`` 1 turns batching off. At most ``max_enqueued_batches`` batches'
    worth of images wait: past it a request is refused at once (503 / ``UNAVAILABLE``).

    ``ready``: a version is loaded and warmed up, and no drain has begun. ``drain(seconds)`` turns
    the service not ready at once and, ``seconds`` later, refuses whatever is still in flight."""

    def __init__(self, model: Model, workers: int, max_batch_size: int = MAX_BATCH_SIZE, batch_timeout: float = 0.0,
                 max_enqueued_batches: int = MAX_ENQUEUED_BATCHES, batch_threads: int = BATCH_THREADS):
        self.model = model
        self.workers = workers
        self.batch_threads = min(batch_threads, workers)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="mnist-cnn-predict")
        self.max_batch_size, self.batch_timeout = max_batch_size, batch_timeout
        self.max_queued_images = max_enqueued_batches * max_batch_size
        self.draining = False
        self.in_flight = 0
        self.cut_off = 0  # requests refused at the drain's deadline
        self.calls_begun = self.calls_open = 0  # gRPC calls begun, and not yet answered (server._stop_grpc)
        self.queued_images = 0
        self.metrics = Metrics(model.name)
        self.metrics.ready.set_function(lambda: float(self.ready))
        self.metrics.loaded.labels(model.name).set_function(
            lambda: sum(state in ("AVAILABLE", "UNLOADING") for state in model.states.values()))
        self.metrics.queued.set_function(lambda: self.queued_images)
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self._expired: asyncio.Future | None = None  # made on the event loop, when first needed
        self._slots: asyncio.Semaphore | None = None  # model calls at once
        self._queues: dict[tuple, collections.deque] = {}
        self._consumers: dict[tuple, asyncio.Task] = {}

    @property
    def ready(self) -> bool:
        return self.model.warm and not self.draining

    def _expiry(self) -> asyncio.Future:
        """Done when the drain ends (one future shared by every request in flight)."""
        if self._expired is None:
            self._expired = asyncio.get_running_loop().create_future()
        return self._expired

    async def run(self, function, *args):
        """``function(*args)`` on a worker (a thread of the bounded pool)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def answer(self, work, deadline: float):
        """The result of the coroutine ``work``, or ``Refused`` at ``deadline`` or the drain's end."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(work)
        expired = self._expiry()
        self.in_flight += 1
        try:
            done, _ = await asyncio.wait({task, expired}, timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            if expired in done:
                self.cut_off += 1
                raise Refused("draining", "the server is shutting down and could not finish this request in time")
            raise Refused("deadline", "the request was not answered within the server's request deadline")
        finally:
            if not task.done():
                task.cancel()
            self.in_flight -= 1

    # -- batching -------------------------------------------------------------------------

    def _run_model(self, servable: Servable, signature: str, images: np.ndarray) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        outputs = servable.run(signature, images)
        self.metrics.model_run(len(images), time.perf_counter() - start)
        return outputs

    async def predict(self, servable: Servable, signature: str, images: np.ndarray) -> dict[str, np.ndarray]:
        """``servable``'s outputs for ``images`` through ``signature``, batched with other requests."""
        n = len(images)
        if self.max_batch_size <= 1:  # batching off: each request's own model call, on any worker
            return await self.run(self._run_model, servable, signature, images)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.batch_threads)
        if n >= self.max_batch_size:  # a batch of its own
            async with self._slots:
                return await self.run(self._run_model, servable, signature, images)
        if self.queued_images + n > self.max_queued_images:
            raise Overloaded(f"the server is busy ({self.queued_images:,} images wait for the model); try again")
        key = (servable.version, id(servable), signature)
        future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, collections.deque()).append((images, future))
        self.queued_images += n
        if key not in self._consumers:
            self._consumers[key] = asyncio.create_task(self._consume(key, servable, signature))
        return await future

    async def _consume(self, key: tuple, servable: Servable, signature: str) -> None:
        """Form batches from ``key``'s queue whenever a model call can start, until it is empty."""
        queue = self._queues[key]
        try:
            while queue:
                await self._slots.acquire()
                if self.batch_timeout > 0 and sum(len(x) for x, _ in queue) < self.max_batch_size:
                    await asyncio.sleep(self.batch_timeout)  # give more requests a moment to join
                batch, n = [], 0
                while queue and (not batch or n + len(queue[0][0]) <= self.max_batch_size):
                    images, future = queue.popleft()
                    self.queued_images -= len(images)
                    if not future.done():  # (a request past its deadline has given up)
                        batch.append((images, future))
                        n += len(images)
                if batch:
                    asyncio.create_task(self._run_batch(servable, signature, batch))
                else:
                    self._slots.release()
        finally:
            del self._consumers[key]
            if not queue:
                del self._queues[key]

    async def _run_batch(self, servable: Servable, signature: str, batch: list) -> None:
        try:
            images = batch[0][0] if len(batch) == 1 else np.concatenate([x for x, _ in batch])
            outputs = await self.run(self._run_model, servable, signature, images)
            start = 0
            for x, future in batch:
                if not future.done():
                    future.set_result({name: value[start:start + len(x)] for name, value in outputs.items()})
                start += len(x)
        except BaseException as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(e if isinstance(e, Exception) else RuntimeError("the model call ended"))
            if not isinstance(e, Exception):
                raise
        finally:
            self._slots.release()

    # -- the drain --------------------------------------------------------------------------

    def drain(self, seconds: float) -> None:
        """Not ready from now on; what is still in flight ``seconds`` from now is refused."""
        self.draining = True
        served = self.model.current()
        if served is not None:
            self.model.states[served.version] = "UNLOADING"
        asyncio.get_running_loop().call_later(seconds, self.expire)

    def expire(self) -> None:
        """Refuse what is in flight now (the drain's end, or a second signal)."""
        self.draining = True
        if not self._expiry().done():
            self._expiry().set_result(True)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Overloaded(Exception):
    """The batch queue is full: answered at once with 503 / ``UNAVAILABLE``."""


def settle_heap() -> None:
    """Collect, then freeze what is alive (``gc.freeze``): the loaded versions' tens of thousands
    of objects leave the collector's generations, so its full passes stop pausing the server (the
    p99 of 16 single-image clients fell from ~180 ms to ~25 ms). Called once a version is warm
    and after every swap; unfrozen first, so that an unloaded version's cycles are collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def poll_versions(model: Model, seconds: float) -> None:
    """Look at ``model``'s base folder every ``seconds`` for a new version, forever (until
    cancelled), in a thread of its own: a load never takes a request's worker."""
    loader = ThreadPoolExecutor(1, thread_name_prefix="mnist-cnn-poll")
    try:
        while True:
            await asyncio.sleep(seconds)
            if await asyncio.get_running_loop().run_in_executor(loader, model.poll) is not None:
                await asyncio.get_running_loop().run_in_executor(loader, settle_heap)
    finally:
        loader.shutdown(wait=False, cancel_futures=True)
