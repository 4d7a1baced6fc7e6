"""scripts/serve.py end to end: a real server process on a free port of 127.0.0.1 -- real
digits through TensorFlow Serving's REST API and POST /predict, bad and hostile requests,
and a real browser drawing on the page."""

import io
import json
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, free_port
from PIL import Image

from mnist_cnn import as_command, export, predict
from mnist_cnn.bench.attacks import png_bomb
from mnist_cnn.keras_file import load_cnn

pytestmark = pytest.mark.slow
REQUEST_SECONDS = 6  # the module server's whole-request deadline


def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the suite may run with SIGINT ignored


def start_server(*args, host="127.0.0.1", out=None, ready=True):
    """``scripts/serve.py ARGS`` on a free port: (process, port), once it listens and (``ready``)
    has warmed up. Its stdout (the start lines and one access-log line a request) goes to a file,
    so a long test cannot fill a pipe."""
    port = free_port()
    out = out or tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False).name
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), *map(str, args), "--port", str(port),
                             "--host", host], stdout=open(out, "w"), stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if "/v1/models/" in Path(out).read_text():
            proc.out = Path(out)
            while ready and "warmed up: version" not in proc.out.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            return proc, port
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"the server did not start: {proc.stderr.read()[-2000:]}")


def stop(proc):
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, exported_run):
    """The session's trained model (it reads most digits), exported twice (versions 1 and 2) to a
    base folder, and that base folder served: (base url, model path, version 2's folder).
    Its whole-request deadline is REQUEST_SECONDS."""
    folder = tmp_path_factory.mktemp("serve")
    model = load_cnn(exported_run.model_path)
    base = folder / "models"
    export.export_savedmodel(model, base)
    newest = export.export_savedmodel(model, base)
    proc, port = start_server(base, "--request-timeout", REQUEST_SECONDS, "--grpc-port", free_port())
    yield f"http://127.0.0.1:{port}", exported_run.model_path, newest, proc
    stop(proc)


def request(base: str, path: str, body: bytes | None = None, content_type="application/json", timeout=60,
            method=None):
    headers = {"Content-Type": content_type} if body is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, data=body, headers=headers, method=method),
                                    timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(base: str, body: bytes):
    return request(base, "/predict", body)


def raw(port: int, data: bytes, timeout=30, half_close=True) -> bytes:
    """Send bytes as they are on a new connection; what comes back until it closes. (A client
    that half-closes gets no answer to a request still being worked on: asyncio closes on EOF.)"""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_page_is_self_contained(server):
    base, *_ = server
    with urllib.request.urlopen(base + "/", timeout=30) as response:
        page = response.read().decode()
    assert '<canvas id="pad" width="280" height="280">' in page and 'id="clear"' in page
    assert "http://" not in page and "https://" not in page  # no CDN: works offline


def test_real_digits_through_the_endpoint(server, sample):
    base, model_path, *_ = server
    _, (x, y) = sample
    digits = (x[:20] / 255.0).astype("float32")
    expected = load_cnn(model_path).predict(digits[..., None], verbose=0)
    for image, want in zip(digits, expected, strict=True):
        status, answer = post(base, json.dumps({"image": image.tolist()}).encode())
        assert status == 200 and answer["digit"] == int(want.argmax())
        np.testing.assert_allclose(answer["probabilities"], want, atol=1e-5)
    # any size in 0..255 is prepared exactly like predict.py's image files
    model, right = load_cnn(model_path), 0
    for image, label in zip(x[20:40], y[20:40], strict=True):
        scan = 255 - np.kron(image, np.ones((4, 4), np.uint8))  # 112 x 112, dark ink on light paper
        status, answer = post(base, json.dumps({"image": scan.tolist()}).encode())
        assert status == 200
        prepared = predict.mnist_style(scan.astype(np.float32))[None, ..., None]
        np.testing.assert_allclose(answer["probabilities"], model.predict(prepared, verbose=0)[0], atol=1e-5)
        right += answer["digit"] == int(label)
    assert right >= 12  # a short training run, on digits drawn 4x larger and inverted


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "body is not JSON"),
        (b'{"picture": []}', 400, 'a JSON object {"image"'),
        (b'{"image": [[1, 2], [3]]}', 400, "rectangular array of numbers"),
        (b'{"image": []}', 400, "non-empty array"),
        (b'{"image": "abc"}', 400, "non-empty array"),
        (b'{"image": [1, 2, 3]}', 400, "non-empty 2-D array"),
        (b'{"image": [["a", "b"]]}', 400, "numbers only"),
        (b'{"image": [["1", "2"], ["3", "4"]]}', 400, "numbers only"),
        (b'{"image": [[true, false], [true, true]]}', 400, "numbers only"),
        (b'{"image": [[null, 1], [1, 1]]}', 400, "numbers only"),
        (b'{"image": [[1' + b"0" * 400 + b', 1], [1, 1]]}', 400, "out of range"),
        (b'{"image": [[1e400, 1], [1, 1]]}', 400, "out of range"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "body is not JSON"),
        (b'{"image": [[0, 0], [0, 0]]}', 400, "no digit found"),
        (b'{"image": [[-5, 300], [0, 1]]}', 400, "pixel values must be"),
        (b" " * (5 << 20), 413, "over the 4,194,304-byte limit"),
    ],
)
def test_bad_requests_are_4xx_with_one_line_and_the_server_lives_on(server, body, status, message):
    base, *_ = server
    got, answer = post(base, body)
    assert got == status and message in answer["error"] and "\n" not in answer["error"]
    ok, answer = post(base, json.dumps({"image": np.zeros((28, 28)).tolist()}).encode())
    assert ok == 200 and len(answer["probabilities"]) == 10


def signature_outputs(folder, name, images):
    outputs = tf.saved_model.load(str(folder)).signatures[name](images=tf.constant(images))
    return {key: value.numpy() for key, value in outputs.items()}


def test_tensorflow_serving_status_and_metadata(server):
    base, *_ = server
    assert request(base, "/v1/models/mnist") == (200, {"model_version_status": [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
    assert request(base, "/v1/models/mnist/versions/2")[0] == 200
    status, metadata = request(base, "/v1/models/mnist/metadata")
    assert status == 200 and metadata["model_spec"] == {"name": "mnist", "signature_name": "", "version": "2"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "serve_uint8", "__saved_model_init_op"} <= set(signatures)  # every SignatureDef
    dims = [{"size": size, "name": ""} for size in ("-1", "28", "28", "1")]  # TensorInfo JSON, as TF Serving's
    assert signatures["serve_uint8"]["inputs"] == {"images": {
        "dtype": "DT_UINT8", "tensor_shape": {"dim": dims, "unknown_rank": False}, "name": "serve_uint8_images:0"}}
    default = signatures["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    assert default["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert default["inputs"]["images"]["name"] == "serving_default_images:0"
    assert default["outputs"]["probabilities"]["tensor_shape"]["dim"] == [{"size": "-1", "name": ""},
                                                                          {"size": "10", "name": ""}]
    assert default["outputs"]["digits"]["dtype"] == "DT_INT64"
    for path in ("/v1/models/other", "/v1/models/mnist/versions/1", "/v1/models/mnist/versions/1:predict"):
        status, answer = request(base, path)
        assert status == 404 and "Servable not found" in answer["error"], path


def test_tensorflow_serving_row_and_columnar_requests_equal_the_saved_model(server, sample):
    """A batch of 32 test digits, both formats, both signatures: the answers are the SavedModel's own outputs."""
    base, _, newest, _ = server
    _, (x, _) = sample
    uint8 = x[:32, ..., None]
    for signature, images in (("serving_default", (uint8 / 255.0).astype(np.float32)), ("serve_uint8", uint8)):
        want = signature_outputs(newest, signature, images)
        for path in ("/v1/models/mnist:predict", "/v1/models/mnist/versions/2:predict"):
            status, rows = request(base, path, json.dumps({"signature_name": signature,
                                                           "instances": images.tolist()}).encode())
            assert status == 200, rows
            np.testing.assert_array_equal([r["probabilities"] for r in rows["predictions"]], want["probabilities"])
            assert [r["digits"] for r in rows["predictions"]] == want["digits"].tolist()
        named = [{"images": image} for image in images.tolist()]
        status, rows = request(base, "/v1/models/mnist:predict", json.dumps(
            {"signature_name": signature, "instances": named}).encode())
        assert status == 200 and [r["digits"] for r in rows["predictions"]] == want["digits"].tolist()
        for inputs in (images.tolist(), {"images": images.tolist()}):
            status, columns = request(base, "/v1/models/mnist:predict", json.dumps(
                {"signature_name": signature, "inputs": inputs}).encode())
            assert status == 200, columns
            np.testing.assert_array_equal(columns["outputs"]["probabilities"], want["probabilities"])
            assert columns["outputs"]["digits"] == want["digits"].tolist()


@pytest.mark.parametrize(
    "body, message",
    [
        ({"instances": [[[[0.0]] * 28] * 28], "inputs": []}, "exactly one of"),
        ({}, "exactly one of"),
        ({"signature_name": "nope", "instances": []}, 'Serving signature name: "nope" not found'),
        ({"instances": [[[0.0] * 28] * 28]}, "shape [N, 28, 28, 1]"),
        ({"instances": [[[[0.5]] * 28] * 28] * 257}, "at most 256"),
        ({"signature_name": "serve_uint8", "instances": [[[[0.5]] * 28] * 28]}, "whole numbers 0..255"),
        ({"instances": [[[["0"]] * 28] * 28]}, "numbers only"),
        # one odd value among numbers: NumPy's fast conversion would take true as 1.0 and "0.5" as text
        ({"instances": [[[[0.5]] * 28] * 27 + [[[0.5]] * 27 + [[True]]]]}, "numbers only"),
        ({"instances": [[[[0.5]] * 28] * 27 + [[[0.5]] * 27 + [["0.5"]]]]}, "numbers only"),
        ({"instances": [[[[0.5]] * 28] * 27 + [[[0.5]] * 27 + [[None]]]]}, "numbers only"),
        ({"instances": [[[[0.5]] * 28] * 27 + [[[0.5]] * 27 + [[0.5, 0.5]]]]}, "rectangular"),
        ({"instances": [[[[0.5]] * 28] * 27 + [[[0.5]] * 27 + [[1e39]]]]}, "out of range"),
        ({"instances": [[[[0.5]] * 28] * 27 + [[[0.5]] * 27 + [[10**39]]]]}, "out of range"),
        ({"instances": [{"pixels": 1}]}, 'each instance must be {"images"'),
        ({"inputs": {"x": 1}}, 'inputs must be {"images"'),
        ([1, 2], 'expected a JSON object with "instances"'),
    ],
)
def test_tensorflow_serving_errors_are_400_with_one_line(server, body, message):
    base, *_ = server
    status, answer = request(base, "/v1/models/mnist:predict", json.dumps(body).encode())
    assert status == 400 and message in answer["error"] and "\n" not in answer["error"], answer


def test_predict_takes_a_png_or_jpeg_body_as_predict_py_prepares_files(server, sample, tmp_path):
    base, model_path, *_ = server
    _, (x, _) = sample
    model = load_cnn(model_path)
    for i, (fmt, content_type) in enumerate((("PNG", "image/png"), ("JPEG", "image/jpeg"))):
        scan = 255 - np.kron(x[i], np.ones((5, 5), np.uint8))  # 140 x 140, dark ink on paper
        path = tmp_path / f"digit.{fmt.lower()}"
        Image.fromarray(scan).save(path, fmt)
        status, answer = request(base, "/predict", path.read_bytes(), content_type)
        assert status == 200, answer
        want = model.predict(predict.mnist_style(predict.read_image(path))[None, ..., None], verbose=0)[0]
        np.testing.assert_allclose(answer["probabilities"], want, atol=1e-5)
    status, answer = request(base, "/predict", b"not a png", "image/png")
    assert status == 400 and "not a PNG or JPEG image" in answer["error"]
    # the bytes decide, not the label: a PNG sent as application/octet-stream is read as a PNG
    status, answer = request(base, "/predict", (tmp_path / "digit.png").read_bytes(), "application/octet-stream")
    assert status == 200 and len(answer["probabilities"]) == 10


def good_request_answered(base, timeout=60):
    ok, answer = request(base, "/predict", json.dumps({"image": np.zeros((28, 28)).tolist()}).encode(),
                         timeout=timeout)
    assert ok == 200 and len(answer["probabilities"]) == 10


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: -1\r\n",
        b"Content-Length: abc\r\n",
        b"Content-Length: 1.5\r\n",
        b"Content-Length: -99999999999999999999\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Transfer-Encoding: gzip\r\n",
    ],
)
def test_a_malformed_length_header_is_400_and_the_connection_closed(server, head):
    base, *_ = server
    port = int(base.rsplit(":", 1)[1])
    answer = raw(port, b"POST /predict HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + b'{"image": [[0]]}' * 10)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    good_request_answered(base)


def test_a_length_over_the_limit_is_413_before_the_body_is_read(server):
    base, *_ = server
    port = int(base.rsplit(":", 1)[1])
    for length in (b"99999999999999999999", b"5000000"):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: " + length
                      + b"\r\n\r\n")
            answer = read_response(s)  # no body sent: refused from the header, no 100 Continue asked of us
        assert answer.startswith(b"HTTP/1.1 413 ") and b"over the 4,194,304-byte limit" in answer, answer[:300]


class Responses:
    """Whole responses (headers and their Content-Length of body) from one connection, in order;
    bytes past one response (pipelined answers arrive together under load) are kept for the next."""

    def __init__(self, sock: socket.socket):
        self.sock, self.data = sock, b""

    def _fill(self, until) -> None:
        while not until():
            self.data += self.sock.recv(65536) or pytest.fail(f"closed after {self.data!r}")

    def next(self) -> bytes:
        self._fill(lambda: b"\r\n\r\n" in self.data)
        head, _, rest = self.data.partition(b"\r\n\r\n")
        length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), b"0"))
        self._fill(lambda: len(self.data) >= len(head) + 4 + length)
        answer, self.data = self.data[:len(head) + 4 + length], self.data[len(head) + 4 + length:]
        return answer


def read_response(s: socket.socket) -> bytes:
    return Responses(s).next()


def chunked(body: bytes, size: int = 1000) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_chunked_bodies_are_counted_as_they_arrive(server):
    base, *_ = server
    port = int(base.rsplit(":", 1)[1])
    good = json.dumps({"image": np.zeros((28, 28)).tolist()}).encode()
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    answer = raw(port, head + chunked(good), half_close=False)
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"digit"' in answer, answer[:300]
    answer = raw(port, head + chunked(b" " * (5 << 20), 1 << 16), half_close=False)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"error"' in answer, answer[:300]
    good_request_answered(base)


def test_http_1_1_keep_alive_pipelining_and_100_continue(server):
    base, *_ = server
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /v1/models/mnist HTTP/1.1\r\nHost: x\r\n\r\n" * 3)  # three requests in one send
        responses = Responses(s)
        answers = [responses.next() for _ in range(3)]
        assert all(a.startswith(b"HTTP/1.1 200 OK") and a.endswith(b'"error_message":""}}]}') for a in answers)
        body = json.dumps({"image": np.zeros((28, 28)).tolist()}).encode()  # over 1 kB: curl asks first
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert responses.next().startswith(b"HTTP/1.1 100 Continue\r\n")  # sent before the body
        s.sendall(body)  # the same connection, kept alive
        answer = responses.next()
        assert answer.startswith(b"HTTP/1.1 200 OK") and b'"probabilities"' in answer


def trickle(port: int, head: bytes, stop: threading.Event, every: float) -> float:
    """Send ``head`` one byte every ``every`` seconds until the server closes the connection
    (-> seconds it took) or ``stop`` is set (-> inf)."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        for byte in head * 100:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                return time.monotonic() - began
            if stop.wait(every):
                return float("inf")
    return float("inf")


def test_idle_and_trickling_clients_cost_a_socket_not_the_server(server):
    """1,000 connections that send nothing and 70 that send a byte a second: normal requests are
    answered meanwhile, and each trickling request is cut at the whole-request deadline."""
    base, *_ = server
    port = int(base.rsplit(":", 1)[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))  # this test's own sockets
    idle = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(1000)]
    stop = threading.Event()
    heads = [b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",  # a slow body
             b"GET /v1/models/mnist/metadata HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"x" * 200]  # slow headers
    with ThreadPoolExecutor(70) as pool:
        cut = [pool.submit(trickle, port, heads[i % 2], stop, 1.0) for i in range(70)]
        try:
            time.sleep(2)
            for _ in range(10):  # under the old thread-per-connection server: none answered in 60 s
                good_request_answered(base, timeout=REQUEST_SECONDS / 2)
            seconds = [f.result(timeout=REQUEST_SECONDS * 4) for f in cut]
        finally:
            stop.set()
            for s in idle:
                s.close()
    # every trickler cut at the deadline, however steadily it sent (a per-read timeout never fires)
    assert max(seconds) < REQUEST_SECONDS * 3 and min(seconds) >= REQUEST_SECONDS - 1, seconds
    good_request_answered(base)


def test_a_saved_model_of_another_shape_is_refused_at_start(tmp_path):
    module = tf.Module()
    module.f = tf.function(lambda x: {"out": tf.reduce_sum(x, axis=[1, 2, 3])},
                           input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / "other" / "1"), signatures={"serving_default": module.f})
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "serve.py"), str(tmp_path / "other"), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "signature serving_default takes {'x': 'float32[None, 28, 28, 1]'}" \
        in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, message", [(["--port", "70000"], "argument --port: expected a port 0-65535"),
                                           (["--port", "-1"], "argument --port: expected a port 0-65535"),
                                           (["--host", "999.1.1.1"], "cannot listen on 999.1.1.1:")])
def test_a_bad_port_or_host_is_one_line_and_exit_2(server, args, message):
    _, model_path, *_ = server
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "serve.py"), str(model_path), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def chromium_driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=900,700"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def test_a_browser_draws_a_one_and_reads_it(server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    base, *_ = server
    driver = chromium_driver()
    try:
        driver.get(base + "/")
        pad = driver.find_element(By.ID, "pad")
        strokes = ActionChains(driver).move_to_element_with_offset(pad, 0, -90).click_and_hold()
        for _ in range(18):  # a vertical stroke down the middle: a "1"
            strokes = strokes.move_by_offset(0, 10)
        strokes.release().perform()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not driver.find_element(By.ID, "digit").text:
            time.sleep(0.2)
        time.sleep(1.0)  # the last prediction after the pointer went up
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert driver.find_element(By.ID, "digit").text == "1"
        best = driver.find_element(By.CSS_SELECTOR, ".row.best .label").text
        assert best == "1"
        driver.find_element(By.ID, "clear").click()
        assert driver.find_element(By.ID, "digit").text == ""
    finally:
        driver.quit()


# -- images that cost nothing to refuse -------------------------------------------------------


def memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_an_image_bomb_is_refused_from_its_header_at_no_cost(server, tmp_path):
    """The issue's 308 kB PNG of 6300x6300 16-bit RGBA (2 GB once decoded): four at once, as
    PNG and as octet-stream, and a 30000x30000 JPEG header: each 400, the server's peak memory
    (VmHWM, reset first) within 50 MB of where it was."""
    base, _, _, proc = server
    bomb = png_bomb(6300, 6300)
    assert len(bomb) < 400_000
    jpeg = tmp_path / "big.jpg"
    Image.new("L", (64, 64)).save(jpeg)
    big_jpeg = jpeg.read_bytes().replace(b"\x00\x40\x00\x40", (30000).to_bytes(2, "big") * 2, 1)  # SOF0 size
    good_request_answered(base)
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = memory_kb(proc.pid, "VmHWM")
    bodies = [(bomb, "image/png"), (bomb, "application/octet-stream"), (bomb, "image/png"), (big_jpeg, "image/jpeg")]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: request(base, "/predict", *b), bodies))
    for status, answer in answers:
        assert status == 400 and ("pixels, more than the 2000 pixels a side" in answer["error"]
                                  or "refused as a decompression bomb" in answer["error"]
                                  or "JPEG whose scans decode more than 8,000,000 blocks" in answer["error"]), answer
    grown = memory_kb(proc.pid, "VmHWM") - before
    assert grown < 50 * 1024, f"the server's peak memory grew by {grown / 1024:.0f} MB"


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(server, sample, tmp_path):
    """A 5600x5600 photo-sized JPEG (over the 2,000-pixel side) is read through libjpeg's draft
    mode at 1/8 scale, not refused and not decoded whole."""
    base, model_path, *_ = server
    _, (x, _) = sample
    path = tmp_path / "photo.jpg"
    Image.fromarray(255 - np.kron(x[3], np.ones((200, 200), np.uint8))).save(path, "JPEG", quality=90)
    status, answer = request(base, "/predict", path.read_bytes(), "image/jpeg")
    assert status == 200, answer
    with Image.open(path) as img:
        img.draft("L", (500, 500))
        assert img.size == (700, 700)  # what the server decodes: 1/8 scale
    prepared = predict.mnist_style(predict.read_image(path, formats=("JPEG",), max_side=2000))
    want = load_cnn(model_path).predict(prepared[None, ..., None], verbose=0)[0]
    np.testing.assert_allclose(answer["probabilities"], want, atol=1e-5)


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF"])
def test_only_png_and_jpeg_are_decoded_whatever_the_label(server, fmt):
    base, *_ = server
    image = io.BytesIO()
    if fmt == "TIFF":  # the float TIFF holding NaN
        Image.fromarray(np.full((40, 40), np.nan, np.float32)).save(image, fmt)
    else:
        Image.new("L", (40, 40), 255).save(image, fmt)
    for label in ("image/png", "image/jpeg"):
        status, answer = request(base, "/predict", image.getvalue(), label)
        assert status == 400 and "not a PNG or JPEG image" in answer["error"], answer


# -- TensorFlow Serving's answers to what is not a prediction ---------------------------------


def nested(depth: int):
    value = 0.5
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        (":predict", {"instances": [[[[1e39]] * 28] * 28]}, 400, "out of range"),  # finite in float64 only
        (":predict", {"instances": [[[[3e38]] * 28] * 28]}, 400, "outputs for these images are not finite"),
        (":predict", {"signature_name": ["serving_default"], "instances": []}, 400, "must be a string"),
        (":predict", {"instances": nested(100)}, 400, "nested deeper than 4 levels"),
        (":classify", {"examples": [{"x": 1}]}, 400, "Expected classification signature method_name to be "
                                                      "tensorflow/serving/classify. Was: tensorflow/serving/predict"),
        (":regress", {"examples": [{"x": 1}]}, 400, "Expected regression signature method_name to be "
                                                     "tensorflow/serving/regress. Was: tensorflow/serving/predict"),
        (":classify", {"signature_name": "nope"}, 400, 'Serving signature name: "nope" not found'),
    ],
)
def test_tensorflow_serving_client_mistakes_are_4xx_never_500_or_nan(server, path, body, status, message):
    base, *_ = server
    got, answer = request(base, "/v1/models/mnist" + path, json.dumps(body).encode())
    assert got == status and message in answer["error"], answer


def test_page_images_nested_or_out_of_range_are_400(server):
    base, *_ = server
    for body, message in (({"image": nested(100)}, "nested deeper than 2 levels"),
                          ({"image": [[1e39] * 28] * 28}, "out of range")):
        status, answer = post(base, json.dumps(body).encode())
        assert status == 400 and message in answer["error"], answer


@pytest.mark.parametrize("method, path, status", [
    ("PUT", "/v1/models/mnist", 405), ("DELETE", "/", 405), ("OPTIONS", "/predict", 405),
    ("GET", "/v1/models/mnist:predict", 405), ("GET", "/nowhere", 404), ("POST", "/v1/models/mnist/x", 404)])
def test_other_methods_and_paths_are_json_errors(server, method, path, status):
    base, *_ = server
    got, answer = request(base, path, b"{}" if method in ("PUT", "POST") else None, method=method)
    assert got == status and isinstance(answer["error"], str), answer
    with urllib.request.urlopen(urllib.request.Request(base + "/v1/models/mnist", method="HEAD"), timeout=30) as r:
        assert r.status == 200 and r.read() == b""


# -- versions, as TensorFlow Serving manages them -----------------------------------------


def status_of(base):
    """(status, the versions AVAILABLE): TF Serving's status lists unloaded versions too, as END."""
    status, answer = request(base, "/v1/models/mnist")
    return status, [v["version"] for v in answer.get("model_version_status", []) if v["state"] == "AVAILABLE"]


def test_a_base_folder_is_polled_broken_versions_skipped_on_ipv6(server, tmp_path):
    """Over IPv6: a half-written version 3 beside 1 and 2 is skipped (one log line) and 2
    serves; a new export (4) is loaded and served within a few polls, 2 unloaded."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    _, _, newest, _ = server
    base = tmp_path / "models"
    shutil.copytree(newest, base / "1")
    shutil.copytree(newest, base / "2")
    (base / "3").mkdir()
    (base / "3" / "saved_model.pb").write_bytes((newest / "saved_model.pb").read_bytes()[:1000])  # cut short
    proc, port = start_server(base, "--poll-seconds", "0.3", host="::1")
    try:
        url = f"http://[::1]:{port}"
        assert status_of(url) == (200, ["2"])
        assert proc.out.read_text().startswith(f"Serving {base / '2'} (version 2) on {url}/")
        shutil.copytree(newest, base / ".staging")  # as export does: complete, then renamed into place
        (base / ".staging").rename(base / "4")
        deadline = time.monotonic() + 60
        while status_of(url) != (200, ["4"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status_of(url) == (200, ["4"])
        assert request(url, "/v1/models/mnist/versions/2")[1]["model_version_status"][0]["state"] == "END"
        assert request(url, "/v1/models/mnist/versions/2:predict", b"{}")[0] == 404  # unloaded
        images = np.zeros((1, 28, 28, 1)).tolist()
        status, answer = request(url, "/v1/models/mnist/versions/4:predict", json.dumps({"instances": images}).encode())
        assert status == 200 and len(answer["predictions"]) == 1
    finally:
        stop(proc)
    skipped = [line for line in proc.stderr.read().splitlines() if "skipping version" in line]
    assert len(skipped) == 1 and "version 3" in skipped[0], skipped  # once, not at every poll


def test_the_command_line_defaults_are_the_servers():
    from mnist_cnn.cli import serve as serve_cli
    from mnist_cnn.serving import connections, core, http, server, versions

    assert (serve_cli.POLL_SECONDS, serve_cli.REQUEST_SECONDS, serve_cli.WORKERS, serve_cli.DRAIN_SECONDS,
            serve_cli.MAX_CONNECTIONS, serve_cli.MAX_BATCH_SIZE, serve_cli.MAX_ENQUEUED_BATCHES,
            serve_cli.BATCH_THREADS) == (
        versions.POLL_SECONDS, connections.REQUEST_SECONDS, http.WORKERS, server.DRAIN_SECONDS,
        connections.MAX_CONNECTIONS,
        core.MAX_BATCH_SIZE, core.MAX_ENQUEUED_BATCHES, core.BATCH_THREADS)


# -- TensorFlow Serving's gRPC API, through its official stubs ---------------------------------


def grpc_target(proc) -> str:
    line = next(line for line in proc.out.read_text().splitlines() if line.startswith("TensorFlow Serving gRPC API: "))
    return line.split(": ", 1)[1]


def test_grpc_predict_metadata_and_status_with_the_official_stubs(server, sample):
    grpc = pytest.importorskip("grpc", reason="the grpc extra is in the dev extra")
    from tensorflow_serving.apis import (
        classification_pb2,
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    _, _, newest, proc = server
    _, (x, _) = sample
    channel = grpc.insecure_channel(grpc_target(proc))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    uint8 = x[:32, ..., None]
    for signature, images in (("serving_default", (uint8 / 255.0).astype(np.float32)), ("serve_uint8", uint8)):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "mnist"
        request.model_spec.signature_name = signature
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
        response = stub.Predict(request, timeout=60)
        want = signature_outputs(newest, signature, images)
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs["probabilities"]), want["probabilities"])
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs["digits"]), want["digits"])
        assert response.model_spec.version.value == 2

    metadata = get_model_metadata_pb2.GetModelMetadataRequest()
    metadata.model_spec.name = "mnist"
    metadata.metadata_field.append("signature_def")
    signatures = get_model_metadata_pb2.SignatureDefMap()
    stub.GetModelMetadata(metadata, timeout=60).metadata["signature_def"].Unpack(signatures)
    inputs = signatures.signature_def["serve_uint8"].inputs["images"]
    assert inputs.dtype == tf.uint8.as_datatype_enum and [d.size for d in inputs.tensor_shape.dim] == [-1, 28, 28, 1]

    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "mnist"
    answer = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status, timeout=60)
    assert [(v.version, v.state) for v in answer.model_version_status] == [
        (2, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]

    def refused(call, request):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=60)
        return caught.value.code(), caught.value.details()

    bad = predict_pb2.PredictRequest()
    bad.model_spec.name = "mnist"
    bad.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((2, 28, 28), np.float32)))
    code, details = refused(stub.Predict, bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "shape [N, 28, 28, 1]" in details
    bad.inputs["images"].CopyFrom(tf.make_tensor_proto(np.full((1, 28, 28, 1), np.inf, np.float32)))
    assert refused(stub.Predict, bad)[0] == grpc.StatusCode.INVALID_ARGUMENT
    bad.model_spec.name = "other"
    assert refused(stub.Predict, bad) == (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(other)")
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "mnist"
    code, details = refused(stub.Classify, classify)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Was: tensorflow/serving/predict" in details
    channel.close()


def test_grpc_port_without_the_extra_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['tensorflow_serving'] = None; from mnist_cnn.cli.serve import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", as_command(code), str(tmp_path), "--grpc-port", "0"],
                          capture_output=True, text=True, timeout=120)
    last = proc.stderr.splitlines()[-1]  # (python -c is not our command: TensorFlow's start-up lines come first)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith("serve.py: error: --grpc-port needs") and "pip install 'mnist_cnn[grpc]'" in last


def test_the_body_budget_refuses_past_its_bound_and_gives_back_what_a_request_held():
    from mnist_cnn.serving.http import Budget
    from mnist_cnn.serving.tfserving import RequestError

    budget = Budget(10)
    with budget.held() as first:
        budget.take(first, 6)
        with budget.held() as second, pytest.raises(RequestError) as refused:
            budget.take(second, 6)
        assert refused.value.status == 503 and budget.used == 6
    assert budget.used == 0
