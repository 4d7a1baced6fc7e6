"""Serving a trained CNN over HTTP: TensorFlow Serving's REST API, and a draw-a-digit page.

    mnist-cnn-serve exported/                 # a base folder: its newest version (exported/<N>/)
    mnist-cnn-serve exported/2                # one version folder, or a run's model.keras
    # http://127.0.0.1:8000/  -- draw a digit, watch the ten probabilities

TensorFlow Serving's REST API (https://www.tensorflow.org/tfx/serving/api_rest), so that a
client written for TensorFlow Serving runs unchanged:

- ``GET /v1/models/mnist`` (and ``/versions/N``): the version's status;
  ``GET /v1/models/mnist/metadata``: the signatures;
- ``POST /v1/models/mnist[/versions/N]:predict`` with the row format
  ``{"instances": [...]}`` -> ``{"predictions": [{"probabilities": [...], "digits": d}, ...]}``
  or the columnar format ``{"inputs": ...}`` -> ``{"outputs": {"probabilities": ..., "digits": ...}}``;
  ``"signature_name"``: ``serving_default`` (float32 images in [0, 1]) or ``serve_uint8``
  (integers 0-255); images of shape (28, 28, 1), up to ``MAX_INSTANCES`` a request.
  Errors are ``{"error": "..."}`` with status 400 (404 for an unknown model or version).

The page's own endpoint, ``POST /predict``, takes one image: a PNG or JPEG body
(``Content-Type: image/png``; the page sends its canvas so), prepared the way
``mnist-cnn-predict`` prepares files, or JSON ``{"image": [[...], ...]}`` (28x28 values in
0..1 as they are; any other size 0..255 prepared like a file). It answers
``{"digit": d, "probabilities": [10 floats]}``.

Facing a network: every request is answered with a status line or its connection closed;
bodies need a valid ``Content-Length`` of at most ``MAX_BODY`` bytes (no chunked bodies);
a client silent for ``IDLE_SECONDS`` is dropped; at most ``MAX_CONNECTIONS`` connections
are served at once (the rest wait in the listen queue) and at most ``MAX_WORKERS`` requests
are parsed and predicted at once, which bounds memory. It binds 127.0.0.1 unless told
otherwise; it has no TLS or authentication: put it behind a proxy that has them.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import tensorflow as tf

from mnist_cnn.errors import InputError, ModelFileError
from mnist_cnn.keras_file import load_cnn
from mnist_cnn.predict import ImageError, mnist_style, read_image

log = logging.getLogger(__name__)

MODEL_NAME = "mnist"
MAX_BODY = 4 << 20  # bytes: 256 float images as JSON are about 1.6 MB
MAX_INSTANCES = 256  # images in one :predict request
MAX_SIDE = 2000  # pixels a side of a /predict image
IDLE_SECONDS = 10.0  # a connection silent this long is closed
MAX_CONNECTIONS = 64  # served at once; more wait in the listen queue
MAX_WORKERS = 4  # requests parsed and predicted at once
SIGNATURES = {"serving_default": np.float32, "serve_uint8": np.uint8}
IMAGE = (28, 28, 1)


class RequestError(InputError):
    """A request the server answers with a 4xx status and ``{"error": ...}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# -- the model ----------------------------------------------------------------------------


@dataclass
class Servable:
    """One version of the model: ``run(signature, images)`` -> its outputs as arrays."""

    name: str
    version: int
    path: Path
    signatures: dict  # signature name -> function(np images) -> {"probabilities", "digits"}
    owner: object = None  # what the signatures' variables belong to (a loaded SavedModel)

    def run(self, signature: str, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.signatures[signature](images)


def versions(base: Path) -> list[int]:
    """The integer-named version folders of a TensorFlow Serving base folder, ascending."""
    found = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")]
    return sorted(v for v in found if (base / str(v) / "saved_model.pb").is_file())


def resolve(path: str | Path) -> tuple[Path, int]:
    """What ``mnist-cnn-serve PATH`` serves, and as which version: a ``.keras`` file (version
    1), a SavedModel version folder (its number; 1 if it is not a number), or a base folder
    of version folders (the newest, as TensorFlow Serving's default policy does)."""
    path = Path(path)
    if path.is_file():
        return path, 1
    if not path.is_dir():
        raise ModelFileError(f"{path}: not found")
    if (path / "saved_model.pb").is_file():
        return path, int(path.name) if path.name.isdigit() else 1
    found = versions(path)
    if not found:
        raise ModelFileError(f"{path}: neither a SavedModel nor a base folder of version folders (<N>/saved_model.pb)")
    return path / str(found[-1]), found[-1]


def _check_signature(path: Path, name: str, function, dtype) -> None:
    """A signature must take ``images`` (None, 28, 28, 1) of ``dtype`` and give probabilities (None, 10)."""
    inputs = function.structured_input_signature[1]
    spec = inputs.get("images")
    if set(inputs) != {"images"} or spec.dtype != tf.as_dtype(dtype) or spec.shape.as_list() != [None, *IMAGE]:
        shown = {k: f"{v.dtype.name}{v.shape.as_list()}" for k, v in inputs.items()}
        raise ModelFileError(f"{path}: signature {name} takes {shown}, not images {tf.as_dtype(dtype).name}"
                             f"[None, 28, 28, 1]")
    outputs = function.structured_outputs
    probabilities = outputs.get("probabilities") if isinstance(outputs, dict) else None
    if probabilities is None or probabilities.shape.as_list() != [None, 10] or set(outputs) - {"probabilities",
                                                                                              "digits"}:
        raise ModelFileError(f"{path}: signature {name} must give probabilities [None, 10] (and digits), "
                             f"gives {sorted(outputs) if isinstance(outputs, dict) else outputs}")


def load_servable(path: str | Path, name: str = MODEL_NAME) -> Servable:
    """The model at ``path`` (see ``resolve``), its signatures checked before it serves."""
    path, version = resolve(path)
    if path.is_file():
        model = load_cnn(path)

        def keras_signature(scale):
            def run(images):
                probabilities = model.predict(images.astype(np.float32) * scale, verbose=0)
                return {"probabilities": probabilities, "digits": probabilities.argmax(axis=1)}
            return run

        return Servable(name, version, path, {"serving_default": keras_signature(1.0),
                                              "serve_uint8": keras_signature(1 / 255)})
    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, ValueError, RuntimeError, tf.errors.OpError) as e:
        raise ModelFileError(f"{path}: cannot load the SavedModel ({str(e).strip().splitlines()[0][:200]})") from None
    if "serving_default" not in loaded.signatures:
        raise ModelFileError(f"{path}: the SavedModel has no serving_default signature")
    functions = {}
    for signature, dtype in SIGNATURES.items():
        if signature in loaded.signatures:
            function = loaded.signatures[signature]
            _check_signature(path, signature, function, dtype)
            functions[signature] = (lambda f: lambda images: {
                k: v.numpy() for k, v in f(images=tf.constant(images)).items()})(function)
    return Servable(name, version, path, functions, owner=loaded)


# -- requests -----------------------------------------------------------------------------


def numbers(value, what: str) -> np.ndarray:
    """A JSON array of numbers as float64, strictly: rectangular, only numbers (no strings,
    booleans or nulls), finite. RequestError otherwise."""
    try:
        array = np.array(value, dtype=object)
    except (ValueError, RecursionError):
        raise RequestError(f"{what} must be a rectangular array of numbers") from None
    if array.ndim == 0 or array.size == 0:
        raise RequestError(f"{what} must be a non-empty array, got {type(value).__name__}")
    kinds = {type(v) for v in array.flat}
    if kinds - {int, float}:
        ragged = bool(kinds & {list, dict})
        raise RequestError(f"{what} must be a rectangular array of numbers" if ragged else
                           f"{what} must hold numbers only, not {sorted(k.__name__ for k in kinds - {int, float})}")
    try:
        array = array.astype(np.float64)
    except OverflowError:
        raise RequestError(f"{what} has a number out of range") from None
    if not np.isfinite(array).all():
        raise RequestError(f"{what} has a number out of range")
    return array


def images_of(payload, servable: Servable) -> tuple[str, np.ndarray, bool]:
    """A TensorFlow Serving predict request: (signature name, images, row format?)."""
    if not isinstance(payload, dict):
        raise RequestError('expected a JSON object with "instances" (row format) or "inputs" (columnar format)')
    signature = payload.get("signature_name", "serving_default")
    if signature not in servable.signatures:
        raise RequestError(f"no signature {str(signature)[:60]!r}; this model has {sorted(servable.signatures)}")
    if ("instances" in payload) == ("inputs" in payload):
        raise RequestError('expected exactly one of "instances" (row format) or "inputs" (columnar format)')
    row = "instances" in payload
    value = payload["instances"] if row else payload["inputs"]
    if row and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        if any(set(v) != {"images"} for v in value):
            raise RequestError('each instance must be {"images": ...}: the signature has one input, images')
        value = [v["images"] for v in value]
    elif not row and isinstance(value, dict):
        if set(value) != {"images"}:
            raise RequestError('inputs must be {"images": ...}: the signature has one input, images')
        value = value["images"]
    if isinstance(value, list) and len(value) > MAX_INSTANCES:
        raise RequestError(f"{len(value)} images in one request; at most {MAX_INSTANCES}")
    images = numbers(value, "images")
    if images.shape[1:] != IMAGE:
        raise RequestError(f"images must have shape [N, 28, 28, 1], got {list(images.shape)}")
    if SIGNATURES[signature] is np.uint8:
        if (images != np.round(images)).any() or images.min() < 0 or images.max() > 255:
            raise RequestError(f"{signature} takes whole numbers 0..255")
        return signature, images.astype(np.uint8), row
    return signature, images.astype(np.float32), row


def reply_of(outputs: dict[str, np.ndarray], row: bool) -> dict:
    """TensorFlow Serving's response: per image in the row format, per output in the columnar one."""
    lists = {name: value.tolist() for name, value in outputs.items()}
    if row:
        return {"predictions": [dict(zip(lists, values, strict=True)) for values in zip(*lists.values(), strict=True)]}
    return {"outputs": lists}


def page_image(body: bytes, content_type: str) -> np.ndarray:
    """The one image of a ``POST /predict`` as a float32 (28, 28) MNIST digit."""
    if content_type in ("image/png", "image/jpeg"):
        try:
            image = read_image(io.BytesIO(body))
        except ImageError as e:
            raise RequestError(f"the {content_type} body is {e}") from None
    else:
        payload = parse_json(body)
        if not isinstance(payload, dict) or "image" not in payload:
            raise RequestError('expected a PNG or JPEG body, or a JSON object {"image": [[...], ...]}')
        image = numbers(payload["image"], "image")
        if image.ndim != 2:
            raise RequestError(f"image must be a non-empty 2-D array, got shape {list(image.shape)}")
        if image.shape == (28, 28) and image.min() >= 0 and image.max() <= 1:
            return image.astype(np.float32)  # already an MNIST digit
        if image.min() < 0 or image.max() > 255:
            raise RequestError("pixel values must be 0..1 for a 28x28 digit, or 0..255 for any other size")
    if max(image.shape) > MAX_SIDE:
        raise RequestError(f"image must be at most {MAX_SIDE} pixels a side, got {image.shape[1]}x{image.shape[0]}")
    try:
        return mnist_style(image.astype(np.float32))
    except ImageError as e:
        raise RequestError(str(e)) from None


def parse_json(body: bytes):
    try:
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(f"body is not JSON ({type(e).__name__}: {str(e)[:100]})") from None


ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]+))?(?P<rest>:predict|/metadata)?$")


class ClientGone(Exception):
    """The client stopped sending (timeout) or closed: there is no one to answer."""


def make_handler(servable: Servable):
    status_body = {"model_version_status": [{"version": str(servable.version), "state": "AVAILABLE",
                                             "status": {"error_code": "OK", "error_message": ""}}]}

    class Handler(BaseHTTPRequestHandler):
        server_version = "mnist_cnn"
        timeout = IDLE_SECONDS  # socket timeout: a silent client is dropped

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                return self.reply(200, PAGE.encode(), "text/html; charset=utf-8")
            try:
                rest = self.route()
            except RequestError as e:
                return self.reply(e.status, {"error": str(e)})
            if rest is None or rest == ":predict":
                return self.reply(404, {"error": f"no page {self.path[:100]}"})
            self.reply(200, self.metadata() if rest == "/metadata" else status_body)

        def do_POST(self):
            try:
                if self.path != "/predict" and self.route() != ":predict":
                    raise RequestError(f"no endpoint {self.path[:100]}", 404)
                body = self.read_body()
                with self.server.workers:  # bounded: parsing and predicting hold the memory
                    if self.path == "/predict":
                        content_type = self.headers.get_content_type()
                        probabilities = servable.run("serving_default", page_image(body, content_type)[None, ..., None])
                        answer = {"digit": int(np.argmax(probabilities["probabilities"][0])),
                                  "probabilities": [round(float(p), 6) for p in probabilities["probabilities"][0]]}
                    else:
                        signature, images, row = images_of(parse_json(body), servable)
                        answer = reply_of(servable.run(signature, images), row)
            except RequestError as e:
                return self.reply(e.status, {"error": str(e)})
            except ClientGone:
                self.close_connection = True
                return None
            except Exception as e:  # a bug of ours or the model's: a status line and one log line, never silence
                log.error("%s %s: %s: %s", self.command, self.path[:100], type(e).__name__, str(e)[:200])
                return self.reply(500, {"error": f"internal error ({type(e).__name__})"})
            self.reply(200, answer)

        def route(self) -> str | None:
            """For a ``/v1/models/...`` path: what follows the model (``""``, ``":predict"``,
            ``"/metadata"``); None for any other path; 404 for another model or version."""
            match = ROUTE.match(self.path)
            if match is None:
                return None
            if match["name"] != servable.name:
                raise RequestError(f"Servable not found for request: Latest({match['name'][:60]})", 404)
            if match["version"] is not None and int(match["version"]) != servable.version:
                raise RequestError(f"Servable not found for request: Specific({servable.name}, "
                                   f"{match['version'][:20]})", 404)
            return match["rest"] or ""

        def metadata(self) -> dict:
            return {"model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
                    "metadata": {"signature_def": {"signature_def": {
                        name: {"inputs": {"images": {"dtype": np.dtype(dtype).name, "shape": [-1, *IMAGE]}},
                               "outputs": {"probabilities": {"dtype": "float32", "shape": [-1, 10]},
                                           "digits": {"dtype": "int64", "shape": [-1]}}}
                        for name, dtype in SIGNATURES.items() if name in servable.signatures}}}}

        def read_body(self) -> bytes:
            """The request body, after checking its length header: never an unbounded read."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self.close_connection = True
                raise RequestError("chunked bodies are not accepted: send Content-Length", 411)
            lengths = self.headers.get_all("Content-Length") or []
            if not lengths:
                self.close_connection = True
                raise RequestError("Content-Length required", 411)
            if len(set(lengths)) > 1 or not re.fullmatch(r"[0-9]{1,15}", lengths[0].strip()):
                self.close_connection = True
                raise RequestError(f"Content-Length {lengths[0][:40]!r} is not a byte count", 400)
            length = int(lengths[0])
            if length > MAX_BODY:
                self.discard(length)
                raise RequestError(f"body of {length:,} bytes is over the {MAX_BODY:,}-byte limit", 413)
            try:
                body = self.rfile.read(length)
            except (TimeoutError, ConnectionError):
                raise ClientGone from None
            if len(body) < length:
                raise ClientGone
            return body

        def discard(self, length: int) -> None:
            """Read and drop an over-long body (so the client reads our 413 rather than a
            broken pipe), up to a bound; past it, close the connection."""
            left = min(length, 4 * MAX_BODY)
            try:
                while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                    left -= len(chunk)
            except (TimeoutError, ConnectionError):
                pass
            self.close_connection = True

        def reply(self, status: int, body, content_type="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (TimeoutError, ConnectionError):  # the client left before its answer
                self.close_connection = True

        def log_message(self, format, *args):  # one line per request, through logging
            log.info("%s %s", self.address_string(), format % args)

    return Handler


class Server(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with bounds: ``max_connections`` handled at once (the accept
    loop waits for a free slot; the kernel queues the rest), ``workers`` parsing and predicting."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS, max_workers: int = MAX_WORKERS):
        self.slots = threading.BoundedSemaphore(max_connections)
        self.workers = threading.BoundedSemaphore(max_workers)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self.slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(model_path: str, host: str = "127.0.0.1", port: int = 8000, name: str = MODEL_NAME) -> Server:
    servable = load_servable(model_path, name)
    try:
        server = Server((host, port), make_handler(servable))
    except (OSError, OverflowError, UnicodeError) as e:
        raise InputError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None
    server.servable = servable
    return server


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mnist_cnn: draw a digit</title>
<style>
 body { font-family: sans-serif; margin: 2em; background: #fafafa; color: #222; }
 main { display: flex; gap: 2em; align-items: flex-start; }
 canvas { background: #000; border-radius: 6px; cursor: crosshair; touch-action: none; }
 #bars { width: 320px; }
 .row { display: flex; align-items: center; gap: .5em; margin: 4px 0; }
 .label { width: 1em; font-weight: bold; }
 .track { flex: 1; background: #e4e4e4; height: 20px; border-radius: 3px; }
 .fill { background: #888; height: 100%; border-radius: 3px; width: 0; }
 .best .fill { background: #e8710a; }
 .value { width: 4em; text-align: right; font-variant-numeric: tabular-nums; }
 #digit { font-size: 64px; font-weight: bold; height: 80px; }
 button { font-size: 1em; padding: .4em 1.2em; margin-top: .8em; }
</style></head>
<body>
<h1>Draw a digit</h1>
<main>
 <div><canvas id="pad" width="280" height="280"></canvas><br><button id="clear">Clear</button></div>
 <div><div id="digit"></div><div id="bars"></div><p id="status"></p></div>
</main>
<script>
const pad = document.getElementById("pad"), ctx = pad.getContext("2d");
const bars = document.getElementById("bars");
for (let d = 0; d < 10; d++) {
  bars.insertAdjacentHTML("beforeend",
    `<div class="row" id="row${d}"><span class="label">${d}</span><div class="track"><div class="fill"></div></div>` +
    `<span class="value">0.000</span></div>`);
}
function clearPad() {
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, 280, 280);
  document.getElementById("digit").textContent = "";
  for (let d = 0; d < 10; d++) show(d, 0, false);
}
function show(d, p, best) {
  const row = document.getElementById("row" + d);
  row.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%";
  row.querySelector(".value").textContent = p.toFixed(3);
  row.classList.toggle("best", best);
}
let drawing = false, last = null, pending = false, again = false;
function point(e) { const r = pad.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; }
pad.addEventListener("pointerdown", e => { drawing = true; last = point(e); stroke(last); });
pad.addEventListener("pointermove", e => { if (drawing) { stroke(point(e)); } });
window.addEventListener("pointerup", () => { if (drawing) { drawing = false; predict(); } });
function stroke(p) {
  ctx.strokeStyle = "#fff"; ctx.lineWidth = 18; ctx.lineCap = "round"; ctx.lineJoin = "round";
  ctx.beginPath(); ctx.moveTo(last[0], last[1]); ctx.lineTo(p[0], p[1]); ctx.stroke(); last = p;
  predict();
}
async function predict() {
  if (pending) { again = true; return; }
  pending = true;
  try {
    const png = await new Promise(done => pad.toBlob(done, "image/png"));  // a few kB, not 0.3 MB of JSON
    const response = await fetch("/predict", {method: "POST", headers: {"Content-Type": "image/png"}, body: png});
    const answer = await response.json();
    if (response.ok) {
      answer.probabilities.forEach((p, d) => show(d, p, d === answer.digit));
      document.getElementById("digit").textContent = answer.digit;
      document.getElementById("status").textContent = "";
    } else {
      document.getElementById("status").textContent = answer.error;
    }
  } finally {
    pending = false;
    if (again) { again = false; predict(); }
  }
}
document.getElementById("clear").addEventListener("click", clearPad);
clearPad();
</script>
</body></html>
"""
