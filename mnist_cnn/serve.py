"""A small HTTP server for a trained CNN: a draw-a-digit page and a JSON endpoint.

    python scripts/serve.py logs/<run>/model.keras        # or a SavedModel folder
    # http://127.0.0.1:8000/  -- draw a digit, watch the ten probabilities

- ``GET /``: one self-contained page (no CDN, works offline): a 280x280 canvas, a Clear
  button, and the ten probabilities as bars that update while you draw.
- ``POST /predict`` with ``{"image": [[...], ...]}``: 28x28 values in 0..1 are taken as an
  MNIST digit as they are; any other HxW (values 0-255, e.g. the canvas) is prepared the
  way ``predict.py`` prepares image files (crop, scale into 20x20, centre by mass in
  28x28). Answers ``{"digit": d, "probabilities": [10 floats]}``. Bad JSON, a ragged,
  empty or non-numeric array, a body over ``MAX_BODY`` bytes -> 4xx with
  ``{"error": "..."}``, and the server keeps serving.

The standard library's ``ThreadingHTTPServer`` is enough for a local demo page and keeps
the package free of a web framework; it binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import tensorflow as tf

from mnist_cnn.errors import InputError, ModelFileError
from mnist_cnn.keras_file import load_cnn
from mnist_cnn.predict import ImageError, mnist_style

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20  # a 280x280 canvas as JSON integers is about 0.5 MB
MAX_SIDE = 2000


class RequestError(InputError):
    """A request the server answers with 400 (or 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def load_predictor(path: str):
    """A function float32 (N, 28, 28, 1) -> probabilities (N, 10), from a ``.keras`` file
    (through the strict loader) or a SavedModel folder made by ``export.py``."""
    if Path(path).is_dir():
        try:
            signature = tf.saved_model.load(path).signatures["serving_default"]
        except (OSError, KeyError, ValueError) as e:
            raise ModelFileError(f"{path}: not a SavedModel with a serving_default signature ({e})") from None
        return lambda images: signature(images=tf.constant(images))["probabilities"].numpy()
    model = load_cnn(path)
    return lambda images: model.predict(images, verbose=0)


def prepare(payload) -> np.ndarray:
    """The request's image as a float32 (28, 28) MNIST digit (RequestError otherwise)."""
    if not isinstance(payload, dict) or "image" not in payload:
        raise RequestError('expected a JSON object {"image": [[...], ...]}')
    try:
        image = np.asarray(payload["image"], dtype=np.float32)
    except (ValueError, TypeError):
        raise RequestError("image must be a rectangular array of numbers (rows of equal length)") from None
    if image.ndim != 2 or 0 in image.shape:
        raise RequestError(f"image must be a non-empty 2-D array, got shape {image.shape}")
    if max(image.shape) > MAX_SIDE or not np.isfinite(image).all():
        raise RequestError(f"image must be at most {MAX_SIDE} pixels a side, with finite values")
    if image.shape == (28, 28) and image.min() >= 0 and image.max() <= 1:
        return image  # already an MNIST digit
    if image.min() < 0 or image.max() > 255:
        raise RequestError("pixel values must be 0..1 for a 28x28 digit, or 0..255 for any other size")
    try:
        return mnist_style(image)
    except ImageError as e:
        raise RequestError(str(e)) from None


def make_handler(predictor):
    class Handler(BaseHTTPRequestHandler):
        server_version = "mnist_cnn"

        def do_GET(self):
            if self.path not in ("/", "/index.html"):
                return self.reply(404, {"error": f"no page {self.path}"})
            self.reply(200, PAGE.encode(), "text/html; charset=utf-8")

        def do_POST(self):
            if self.path != "/predict":
                return self.reply(404, {"error": f"no endpoint {self.path}"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise RequestError(f"body of {length:,} bytes is over the {MAX_BODY:,}-byte limit", 413)
                try:
                    payload = json.loads(self.rfile.read(length) or b"null")
                except (ValueError, UnicodeDecodeError) as e:
                    raise RequestError(f"body is not JSON ({e})") from None
                probabilities = predictor(prepare(payload)[None, ..., None])[0]
            except RequestError as e:
                if e.status == 413:
                    self.discard(length)
                return self.reply(e.status, {"error": str(e)})
            self.reply(200, {"digit": int(np.argmax(probabilities)),
                             "probabilities": [round(float(p), 6) for p in probabilities]})

        def discard(self, length: int) -> None:
            """Read and drop an over-long body (so the client reads our 413 rather than a
            broken pipe), up to a bound; past it, close the connection."""
            left = min(length, 16 * MAX_BODY)
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
            self.close_connection = True

        def reply(self, status: int, body, content_type="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # one line per request, through logging
            log.info("%s %s", self.address_string(), format % args)

    return Handler


def make_server(model_path: str, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    predictor = load_predictor(model_path)
    try:
        return ThreadingHTTPServer((host, port), make_handler(predictor))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


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
  const rgba = ctx.getImageData(0, 0, 280, 280).data, image = [];
  for (let y = 0; y < 280; y++) {
    const row = new Array(280);
    for (let x = 0; x < 280; x++) row[x] = rgba[4 * (280 * y + x)];
    image.push(row);
  }
  try {
    const response = await fetch("/predict", {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify({image})});
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
