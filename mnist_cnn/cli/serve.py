"""``mnist-cnn-serve`` / ``scripts/serve.py``: a draw-a-digit page and a prediction API."""

from __future__ import annotations

from mnist_cnn.cli.common import Parser, command_name, main_with


def parser() -> Parser:
    p = Parser(prog=command_name("serve.py"), description="Serve a trained CNN: a draw-a-digit page and POST /predict.")
    p.add_argument("model", metavar="MODEL.keras|SAVEDMODEL_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one) (default: 8000)")
    return p


def main(argv=None) -> int:
    def body(args):
        from mnist_cnn import serve  # after parsing: the model loads here

        server = serve.make_server(args.model, args.host, args.port)
        host, port = server.server_address[:2]
        print(f"Serving {args.model} on http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()

    return main_with(parser(), argv, body)
