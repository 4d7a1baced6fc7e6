"""A bounded load and attack test of ``mnist-cnn-serve`` on 127.0.0.1 (``mnist-cnn-bench --serving``).

The server runs as its own process (as a user runs it) on a free port. Cases:

- ``single``: ``clients`` threads each send ``requests`` one-image predict requests while
  ``idle`` connections that never send a byte and ``trickling`` ones that send a byte every
  ``trickle_every`` seconds are open (slow clients);
- ``batch``: 16 clients x 50 requests of 256 real digits (the largest request);
- ``bombs``: four 308 kB PNGs of 6300x6300 16-bit RGBA at once (2 GB each once decoded), then
  four JPEG bombs at once (``attacks.jpeg_bomb``: two of 60,000 progressive scans, a 1 kB
  13000x13000 progressive colour image and a 16000x11000 CMYK one);
- ``stalled``: ``stalled`` gRPC calls that never send their request, held while one client
  sends ``requests`` ordinary gRPC Predict calls (needs the grpc extra);
- ``flood``: ``silent`` sockets that never send a byte and reconnect when closed (past the
  server's 4,096-connection cap) while one client sends ``requests`` ordinary REST predicts.

Reported per case: errors, median and p99 latency, throughput, and the server's peak
resident memory (VmHWM from /proc, reset before the case); for the bombs, the server's CPU
time. Then, in this process, one model call on N images against N calls on one image: whether
batching requests would pay.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mnist_cnn import as_command, console, data, export, train
from mnist_cnn.bench.attacks import SilentSockets, jpeg_bomb, png_bomb, stalled_grpc_calls
from mnist_cnn.keras_file import load_cnn
from mnist_cnn.serving import versions as servables


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def _post(url: str, body: bytes, content_type: str = "application/json", timeout: float = 120) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _trickle(port: int, stop: threading.Event, every: float) -> None:
    """A client that sends a request one byte every ``every`` seconds, again when it is cut off."""
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b" " * 100000
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                for byte in head:
                    s.sendall(bytes([byte]))
                    if stop.wait(every):
                        return
        except OSError:
            continue


class _KeptAlive:
    """A client's one HTTP/1.1 connection, kept alive between its requests (as requests.Session,
    tritonclient and TF Serving's own clients keep theirs); reconnects when the server closes it."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path
        self.connection = None

    def post(self, body: bytes, content_type: str) -> int:
        for _ in range(2):
            try:
                if self.connection is None:
                    self.connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
                self.connection.request("POST", self.path, body, {"Content-Type": content_type})
                response = self.connection.getresponse()
                response.read()
                return response.status
            except OSError:
                self.connection = None
        return 0


def _hammer(url: str, bodies: list[bytes], clients: int, requests: int, content_type="application/json",
            keep_alive: bool = False) -> dict:
    latencies, errors, lock = [], [], threading.Lock()

    def client(k: int) -> None:
        kept = _KeptAlive(url) if keep_alive else None
        for r in range(requests):
            start = time.perf_counter()
            body = bodies[(k * requests + r) % len(bodies)]
            status = kept.post(body, content_type) if kept else _post(url, body, content_type)
            with lock:
                latencies.append(time.perf_counter() - start)
                if status not in (200, 400):  # a refused bomb is a 400, as it should be
                    errors.append(status)

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = sorted(1000 * x for x in latencies)
    return {"clients": clients, "requests": len(ms), "errors": len(errors), "median_ms": statistics.median(ms),
            "p99_ms": ms[int(0.99 * (len(ms) - 1))], "requests_per_s": len(ms) / (time.perf_counter() - began)}


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system, from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _latencies(name: str, call, requests: int) -> dict:
    """``call()`` ``requests`` times in a row: errors (``call`` returned False or raised), p50, p99."""
    ms, errors = [], 0
    for _ in range(requests):
        start = time.perf_counter()
        try:
            ok = call()
        except Exception:
            ok = False
        ms.append(1000 * (time.perf_counter() - start))
        errors += not ok
    ms.sort()
    return {"case": name, "requests": requests, "errors": errors, "median_ms": statistics.median(ms),
            "p99_ms": ms[int(0.99 * (len(ms) - 1))]}


def _bombs(port: int, pid: int, name: str, bodies: list[bytes], content_type: str) -> dict:
    before, cpu = _memory_mb(pid, "VmRSS"), cpu_seconds(pid)
    _reset_peak(pid)
    with ThreadPoolExecutor(len(bodies)) as pool:
        timed = list(pool.map(lambda body: _timed_post(f"http://127.0.0.1:{port}/predict", body, content_type),
                              bodies))
    return {"case": name, "bytes": [len(b) for b in bodies], "statuses": [s for s, _ in timed],
            "max_ms": max(ms for _, ms in timed), "grown_mb": _memory_mb(pid, "VmHWM") - before,
            "cpu_s": cpu_seconds(pid) - cpu}


def _grpc_predict(target: str):
    """A function that sends one gRPC Predict of one image to ``target`` and says whether it was answered."""
    import grpc  # the grpc extra
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    call = predict_pb2.PredictRequest()
    call.model_spec.name = "mnist"
    call.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 28, 28, 1), np.float32)))
    return lambda: stub.Predict(call, timeout=10).model_spec.version.value > 0, channel


@contextlib.contextmanager
def _server(model_dir: Path, *args: str):
    """``mnist-cnn-serve MODEL_DIR ARGS`` on a free port, ready (warmed up): (process, port)."""
    port = _free_port()
    command = "import sys; from mnist_cnn.cli.serve import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", as_command(command), str(model_dir), "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5):
                    break
            except OSError:
                time.sleep(0.2)
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def batching_test(model_dir: Path, clients: int = 16, requests: int = 300, sizes=(1, 32)) -> dict:
    """``clients`` concurrent clients sending single-image predicts on connections they keep alive,
    against the server with each ``--max-batch-size`` in ``sizes`` (one server after the other,
    same bodies): requests/s, p50, p99, the server's CPU per request, and the first request's
    latency after warm-up."""
    (images, _), _ = data.sample_arrays()
    singles = [json.dumps({"instances": (images[i:i + 1, ..., None] / 255.0).tolist()}).encode() for i in range(50)]
    results = {}
    for size in sizes:
        with _server(model_dir, "--max-batch-size", str(size)) as (proc, port):
            url = f"http://127.0.0.1:{port}/v1/models/mnist:predict"
            start = time.perf_counter()
            first = _post(url, singles[0])
            first_ms = 1000 * (time.perf_counter() - start)
            cpu = cpu_seconds(proc.pid)
            run = _hammer(url, singles, clients, requests, keep_alive=True)
            spent = cpu_seconds(proc.pid) - cpu
            results[size] = {**run, "first_ms": first_ms if first == 200 else float("nan"),
                             "cpu_ms_per_request": 1000 * spent / run["requests"]}
    return results


def load_test(model_dir: Path, clients: int = 8, requests: int = 100, idle: int = 1000, trickling: int = 70,
              trickle_every: float = 9.0, batch_clients: int = 16, batch_requests: int = 50, stalled: int = 100,
              silent: int = 8000) -> dict:
    """The cases above against one server process."""
    (images, _), _ = data.sample_arrays()
    singles = [json.dumps({"instances": (images[i:i + 1, ..., None] / 255.0).tolist()}).encode() for i in range(50)]
    batches = [json.dumps({"signature_name": "serve_uint8", "instances": images[i:i + 256, ..., None].tolist()}
                          ).encode() for i in range(0, 1024, 256)]
    grpc_port = _free_port()
    has_grpc = all(importlib.util.find_spec(m) for m in ("grpc", "tensorflow_serving"))
    grpc_args = ["--grpc-port", str(grpc_port)] if has_grpc else []
    with _server(model_dir, *grpc_args) as (proc, port):
        stop, results = threading.Event(), {}
        try:
            url = f"http://127.0.0.1:{port}/v1/models/mnist:predict"
            results["rss_idle_mb"] = _memory_mb(proc.pid, "VmRSS")
            held = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]
            tricklers = [threading.Thread(target=_trickle, args=(port, stop, trickle_every)) for _ in range(trickling)]
            for t in tricklers:
                t.start()
            time.sleep(1.0)
            _reset_peak(proc.pid)
            results["single"] = {**_hammer(url, singles, clients, requests), "batch": 1, "idle": idle,
                                 "trickling": trickling, "peak_mb": _memory_mb(proc.pid, "VmHWM")}
            stop.set()
            for s in held:
                s.close()
            _reset_peak(proc.pid)
            results["batch"] = {**_hammer(url, batches, batch_clients, batch_requests), "batch": 256,
                                "peak_mb": _memory_mb(proc.pid, "VmHWM")}
            results["bombs"] = _bombs(port, proc.pid, "PNG", [png_bomb()] * 4, "image/png")
            slow, wide = jpeg_bomb(2000, 2000, ac_scans=60_000), jpeg_bomb(13000, 13000, 3, dc_bytes=900)
            results["jpeg_bombs"] = _bombs(port, proc.pid, "JPEG", [slow, wide, jpeg_bomb(16000, 11000, 4,
                                                                                           dc_bytes=1200), slow],
                                           "image/jpeg")
            if has_grpc:
                target = f"127.0.0.1:{grpc_port}"
                predict, channel = _grpc_predict(target)
                predict()  # connected
                release = stalled_grpc_calls(target, stalled)
                try:
                    time.sleep(1.0)
                    _reset_peak(proc.pid)
                    results["stalled"] = {**_latencies("stalled", predict, requests), "stalled": stalled,
                                          "peak_mb": _memory_mb(proc.pid, "VmHWM")}
                finally:
                    release()
                    channel.close()
            one = singles[0]
            with SilentSockets(port, silent) as flood:
                time.sleep(1.0)
                _reset_peak(proc.pid)
                results["flood"] = {**_latencies("flood", lambda: _post(url, one, timeout=10) == 200, requests),
                                    "silent": silent, "opened": flood.open, "reconnects": flood.reconnects,
                                    "peak_mb": _memory_mb(proc.pid, "VmHWM")}
        finally:
            stop.set()
    return results


def _timed_post(url: str, body: bytes, content_type: str = "image/png") -> tuple[int, float]:
    start = time.perf_counter()
    status = _post(url, body, content_type)
    return status, 1000 * (time.perf_counter() - start)


def batching_gain(model_dir: Path, n: int = 8, rounds: int = 20) -> dict:
    """One model call on ``n`` images against ``n`` calls on one image (median seconds)."""
    servable = servables.Model(model_dir).load()
    (images, _), _ = data.sample_arrays()
    x = (images[:n, ..., None] / 255.0).astype(np.float32)
    servable.run("serving_default", x)  # trace
    singles, together = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(n):
            servable.run("serving_default", x[i:i + 1])
        singles.append(time.perf_counter() - start)
        start = time.perf_counter()
        servable.run("serving_default", x)
        together.append(time.perf_counter() - start)
    one_by_one, batched = statistics.median(singles), statistics.median(together)
    return {"images": n, "one_by_one_ms": 1000 * one_by_one, "batched_ms": 1000 * batched,
            "speedup": one_by_one / batched}


def measure(log, clients: int = 8, requests: int = 100) -> dict:
    """Train a small model, export it, and load-test the export."""
    with tempfile.TemporaryDirectory() as folder:
        with console.hidden():
            run = train.fit(train.TrainConfig(data="sample", epochs=1, steps_per_epoch=20, logdir=folder), verbose=0)
        model_dir = export.export_savedmodel(load_cnn(run.model_path), Path(folder) / "served")
        log("  load test: one image a request among idle and trickling clients, 256 images a request, "
            "image bombs ...")
        results = load_test(model_dir, clients, requests)
        results["batching"] = batching_gain(model_dir)
        log("  batching: 16 clients of one image a request, --max-batch-size 1 and 32 ...")
        results["batched"] = batching_test(model_dir)
    return results
