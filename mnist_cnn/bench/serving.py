"""A bounded load test of ``mnist-cnn-serve`` on 127.0.0.1 (``mnist-cnn-bench --serving``).

The server runs as its own process (as a user runs it) on a free port; ``clients`` threads
each send ``requests`` TensorFlow Serving predict requests of ``batch`` real digits, while
``silent`` connections that never send a byte hold server slots. Reported: errors, median
and p99 latency, throughput, the server's resident memory before and after. Then, in this
process, one model call on N images against N calls on one image each: whether batching
concurrent requests into one model call would pay.
"""

from __future__ import annotations

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
import urllib.request
from pathlib import Path

import numpy as np

from mnist_cnn import data, export, serve, train
from mnist_cnn.bench.measure import quiet_runs
from mnist_cnn.keras_file import load_cnn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _post(url: str, body: bytes, timeout: float = 120) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def load_test(model_dir: Path, clients: int = 8, requests: int = 100, batch: int = 1, silent: int = 50) -> dict:
    """Latency and memory of a served model under ``clients`` x ``requests`` requests."""
    (images, _), _ = data.sample_arrays()
    bodies = [json.dumps({"instances": (images[i:i + batch, ..., None] / 255.0).tolist()}).encode()
              for i in range(0, 50 * batch, batch)]
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = "import sys; from mnist_cnn.cli.serve import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", command, str(model_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/v1/models/mnist:predict"
        for body in bodies[:5]:  # warm up: the first calls trace the model
            _post(url, body)
        rss_before = _rss_mb(proc.pid)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(silent)]
        latencies, errors, lock = [], [], threading.Lock()

        def client(k: int) -> None:
            for r in range(requests):
                start = time.perf_counter()
                status = _post(url, bodies[(k * requests + r) % len(bodies)])
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if status != 200:
                        errors.append(status)

        began = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - began
        rss_after = _rss_mb(proc.pid)
        for s in idle:
            s.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ms = sorted(1000 * x for x in latencies)
    return {"clients": clients, "requests": clients * requests, "batch": batch, "silent_connections": silent,
            "errors": len(errors), "median_ms": statistics.median(ms), "p99_ms": ms[int(0.99 * (len(ms) - 1))],
            "requests_per_s": len(ms) / seconds, "rss_before_mb": rss_before, "rss_after_mb": rss_after}


def batching_gain(model_dir: Path, n: int = 8, rounds: int = 20) -> dict:
    """One model call on ``n`` images against ``n`` calls on one image (median seconds)."""
    servable = serve.load_servable(model_dir)
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
    """Train a small model, export it, and load-test the export (single images and batches of 32)."""
    with tempfile.TemporaryDirectory() as folder:
        with quiet_runs():
            run = train.fit(train.TrainConfig(data="sample", epochs=1, steps_per_epoch=20, logdir=folder), verbose=0)
        model_dir = export.export_savedmodel(load_cnn(run.model_path), Path(folder) / "served")
        log("  load test, one image a request ...")
        single = load_test(model_dir, clients, requests, batch=1)
        log("  load test, 32 images a request ...")
        batched = load_test(model_dir, clients, max(1, requests // 4), batch=32)
        gain = batching_gain(model_dir)
    return {"single": single, "batch32": batched, "batching": gain}
