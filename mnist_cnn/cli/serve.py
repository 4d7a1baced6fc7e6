"""``mnist-cnn-serve`` / ``scripts/serve.py``: TensorFlow Serving's REST API and a draw-a-digit page."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import resource
import signal

from mnist_cnn import console
from mnist_cnn.cli.common import Parser, command_name, loading_tensorflow, main_with
from mnist_cnn.errors import UsageError

# the defaults of mnist_cnn.serving, repeated here so that --help does not load TensorFlow
# (tests/test_serve.py checks they agree)
POLL_SECONDS, REQUEST_SECONDS, WORKERS, DRAIN_SECONDS, MAX_CONNECTIONS = 1.0, 10.0, 4, 30.0, 4096
MAX_BATCH_SIZE, MAX_ENQUEUED_BATCHES, BATCH_THREADS = 32, 64, 1


def port_number(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text!r}")
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds, more than 0 and at most 86400, got {text!r}")
    return value


def whole(low: int, high: int):
    def number(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high:,}, got {text!r}")
        return int(text)
    return number


def parser() -> Parser:
    p = Parser(prog=command_name("serve.py"),
               description="Serve a trained CNN: TensorFlow Serving's REST API and a draw-a-digit page.")
    p.add_argument("model", metavar="MODEL.keras|SAVEDMODEL_DIR|BASE_DIR",
                   help="a .keras file, a SavedModel version folder, or a base folder of version folders "
                   "(its newest loadable version, polled for new ones)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind, IPv4 or IPv6 ('::' for all) (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port (0: any free one) (default: 8000)")
    p.add_argument("--model-name", default="mnist", metavar="NAME",
                   help="the model's name in /v1/models/NAME (default: mnist)")
    p.add_argument("--poll-seconds", type=seconds, default=POLL_SECONDS, metavar="S",
                   help="how often a base folder is looked at for a new version, as TensorFlow Serving's "
                   f"--file_system_poll_wait_seconds (default: {POLL_SECONDS:g})")
    p.add_argument("--request-timeout", type=seconds, default=REQUEST_SECONDS, metavar="S",
                   help="a request's headers and body must arrive within this of its first byte (or its "
                   "connection is closed), and it is answered within it (or gets 504; gRPC: DEADLINE_EXCEEDED) "
                   f"(default: {REQUEST_SECONDS:g})")
    p.add_argument("--grpc-port", type=port_number, metavar="PORT",
                   help="also answer TensorFlow Serving's gRPC API (PredictionService, ModelService) on this port "
                   "(needs the grpc extra: pip install 'mnist_cnn[grpc]')")
    p.add_argument("--max-connections", type=whole(16, 60000), default=MAX_CONNECTIONS, metavar="N",
                   help="HTTP connections open at once; a new one past it closes the connection that has waited "
                   f"longest for a request (default: {MAX_CONNECTIONS})")
    p.add_argument("--max-batch-size", type=whole(1, 1024), default=MAX_BATCH_SIZE, metavar="N",
                   help="server-side batching: concurrent requests merged into one model call of up to N images "
                   f"(REST, gRPC and V2 alike); 1 turns batching off (default: {MAX_BATCH_SIZE})")
    p.add_argument("--batch-timeout-micros", type=whole(0, 10_000_000), default=0, metavar="US",
                   help="how long a batch that is not full waits for more requests; 0 merges only what is already "
                   "waiting and adds no latency, as TensorFlow Serving advises on a CPU (default: 0)")
    p.add_argument("--max-enqueued-batches", type=whole(1, 100_000), default=MAX_ENQUEUED_BATCHES, metavar="N",
                   help="batches' worth of images that may wait for the model; past it a request gets 503 "
                   f"(gRPC: UNAVAILABLE) at once (default: {MAX_ENQUEUED_BATCHES})")
    p.add_argument("--num-batch-threads", type=whole(1, 64), default=BATCH_THREADS, metavar="N",
                   help="batched model calls at once (at most --workers); each uses every core through TensorFlow's "
                   f"own threads (default: {BATCH_THREADS})")
    p.add_argument("--workers", type=whole(1, 64), default=WORKERS, metavar="N",
                   help=f"requests decoded and predicted at once (default: {WORKERS})")
    p.add_argument("--drain-seconds", type=seconds, default=DRAIN_SECONDS, metavar="S",
                   help="on SIGTERM or SIGINT, stop accepting and let what is in flight finish for up to this "
                   "long; what is still running then gets 503 (gRPC: UNAVAILABLE); a second signal ends the drain "
                   f"at once (default: {DRAIN_SECONDS:g})")
    return p


def _log_requests() -> None:
    """uvicorn's access log (one line a request) on stdout and its warnings on stderr, as ours."""
    console.show("uvicorn.access", logging.INFO)
    console.show("uvicorn.error", logging.WARNING)


def _more_sockets() -> None:
    """Idle connections cost a socket each: raise this process's open-file limit to its hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)  # past --max-connections: gRPC, files
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv=None) -> int:
    def body(args):
        grpc_start = None
        if args.grpc_port is not None:
            if not all(importlib.util.find_spec(m) for m in ("grpc", "tensorflow_serving")):
                raise UsageError("--grpc-port needs TensorFlow Serving's API for Python: pip install "
                                 "'mnist_cnn[grpc]' (tensorflow-serving-api of your TensorFlow's version, and grpcio)")
        with loading_tensorflow():  # after parsing: TensorFlow loads here
            from mnist_cnn.serving import server as serving

            if args.grpc_port is not None:
                from mnist_cnn.serving import grpc as grpc_face

                grpc_start = grpc_face.start
        _more_sockets()
        server = serving.Server(args.model, args.host, args.port, args.model_name, args.poll_seconds,
                                args.request_timeout, args.workers, args.drain_seconds, args.grpc_port, grpc_start,
                                args.max_connections, args.max_batch_size, args.batch_timeout_micros / 1e6,
                                args.max_enqueued_batches, args.num_batch_threads)
        servable = server.model.current()

        def started(grpc_port):
            print(f"Serving {servable.path} (version {servable.version}) on {server.url}  (Ctrl-C to stop)", flush=True)
            if grpc_port is not None:
                print(f"TensorFlow Serving gRPC API: {server.address[0]}:{grpc_port}", flush=True)
            print(f"TensorFlow Serving REST API: {server.url}v1/models/{server.model.name}:predict", flush=True)
            _log_requests()

        server.run(started)
        service = server.service
        why = signal.Signals(server.signal).name if server.signal else "its own"
        print(f"Stopped on {why}: drained in {server.drain_took:.1f} s; {service.cut_off} request(s) still running "
              f"when the drain ended answered 503", flush=True)

    return main_with(parser(), argv, body)
