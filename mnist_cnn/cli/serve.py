"""``mnist-cnn-serve`` / ``scripts/serve.py``: a draw-a-digit page and a prediction API."""

from __future__ import annotations

import argparse

from mnist_cnn.cli.common import Parser, command_name, main_with


def port_number(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text!r}")
    return int(text)


def parser() -> Parser:
    p = Parser(prog=command_name("serve.py"),
               description="Serve a trained CNN: TensorFlow Serving's REST API and a draw-a-digit page.")
    p.add_argument("model", metavar="MODEL.keras|SAVEDMODEL_DIR|BASE_DIR",
                   help="a .keras file, a SavedModel version folder, or a base folder (its newest version)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port (0: any free one) (default: 8000)")
    p.add_argument("--model-name", default="mnist", metavar="NAME",
                   help="the model's name in /v1/models/NAME (default: mnist)")
    return p


def main(argv=None) -> int:
    def body(args):
        from mnist_cnn import serve  # after parsing: the model loads here

        server = serve.make_server(args.model, args.host, args.port, args.model_name)
        host, port = server.server_address[:2]
        servable = server.servable
        print(f"Serving {servable.path} (version {servable.version}) on http://{host}:{port}/  "
              f"(Ctrl-C to stop)", flush=True)
        print(f"TensorFlow Serving REST API: http://{host}:{port}/v1/models/{servable.name}:predict", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()

    return main_with(parser(), argv, body)
