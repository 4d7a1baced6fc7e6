"""``mnist-cnn-serve`` / ``scripts/serve.py``: TensorFlow Serving's REST API and a draw-a-digit page."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import resource

from mnist_cnn import console
from mnist_cnn.cli.common import Parser, command_name, loading_tensorflow, main_with
from mnist_cnn.errors import UsageError

# the defaults of mnist_cnn.serve / servables, repeated here so that --help does not load TensorFlow
# (tests/test_serve.py checks they agree)
POLL_SECONDS, REQUEST_SECONDS, WORKERS = 1.0, 10.0, 4


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


def workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 64, got {text!r}")
    return int(text)


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
                   help="a request's headers and body must arrive within this, or its connection is closed "
                   f"(default: {REQUEST_SECONDS:g})")
    p.add_argument("--grpc-port", type=port_number, metavar="PORT",
                   help="also answer TensorFlow Serving's gRPC API (PredictionService, ModelService) on this port "
                   "(needs the grpc extra: pip install 'mnist_cnn[grpc]')")
    p.add_argument("--workers", type=workers, default=WORKERS, metavar="N",
                   help=f"requests parsed and predicted at once (default: {WORKERS})")
    return p


def _log_requests() -> None:
    """uvicorn's access log (one line a request) on stdout and its warnings on stderr, as ours."""
    console.show("uvicorn.access", logging.INFO)
    console.show("uvicorn.error", logging.WARNING)


def _more_sockets() -> None:
    """Idle connections cost a socket each: raise this process's open-file limit to its hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv=None) -> int:
    def body(args):
        if args.grpc_port is not None and not all(importlib.util.find_spec(m) for m in ("grpc", "tensorflow_serving")):
            raise UsageError("--grpc-port needs TensorFlow Serving's API for Python: pip install 'mnist_cnn[grpc]' "
                             "(tensorflow-serving-api of your TensorFlow's version, and grpcio)")
        with loading_tensorflow():  # after parsing: TensorFlow loads here
            from mnist_cnn import serve

        _more_sockets()
        server = serve.Server(args.model, args.host, args.port, args.model_name, args.poll_seconds,
                              args.request_timeout, args.workers)
        grpc_server = None
        if args.grpc_port is not None:
            from mnist_cnn import grpc_serve

            grpc_server, grpc_port = grpc_serve.start(server.model, args.host, args.grpc_port, args.workers)
        servable = server.model.current()
        print(f"Serving {servable.path} (version {servable.version}) on {server.url}  (Ctrl-C to stop)", flush=True)
        if grpc_server is not None:
            print(f"TensorFlow Serving gRPC API: {server.address[0]}:{grpc_port}", flush=True)
        print(f"TensorFlow Serving REST API: {server.url}v1/models/{server.model.name}:predict", flush=True)
        _log_requests()
        try:
            server.run()
        finally:
            if grpc_server is not None:
                grpc_server.stop(grace=2)

    return main_with(parser(), argv, body)
