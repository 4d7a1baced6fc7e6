"""scripts/serve.py end to end: a real server process on a free port of 127.0.0.1 -- real
digits through TensorFlow Serving's REST API and POST /predict, bad and hostile requests,
and a real browser drawing on the page."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, free_port, quick
from PIL import Image

from mnist_cnn import export, predict, train
from mnist_cnn.keras_file import load_cnn

pytestmark = pytest.mark.slow


def start_server(*args):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), *map(str, args), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "Serving ... on http://127.0.0.1:PORT/"
    assert f"http://127.0.0.1:{port}/" in line, proc.stderr.read()[-2000:] if proc.poll() is not None else line
    return proc, port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A model trained well enough to read digits, exported twice (versions 1 and 2) to a
    base folder, and that base folder served: (base url, model path, version 2's folder)."""
    folder = tmp_path_factory.mktemp("serve")
    run = train.fit(quick(folder, epochs=3, steps_per_epoch=60), verbose=0)
    model = load_cnn(run.model_path)
    base = folder / "models"
    export.export_savedmodel(model, base)
    newest = export.export_savedmodel(model, base)
    proc, port = start_server(base)
    yield f"http://127.0.0.1:{port}", run.model_path, newest
    proc.terminate()
    proc.wait(timeout=30)


def request(base: str, path: str, body: bytes | None = None, content_type="application/json"):
    headers = {"Content-Type": content_type} if body is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, data=body, headers=headers),
                                    timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(base: str, body: bytes):
    return request(base, "/predict", body)


def raw(port: int, data: bytes, timeout=30) -> bytes:
    """Send bytes as they are on a new connection; what comes back until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
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
    base, model_path, _ = server
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
    inputs = metadata["metadata"]["signature_def"]["signature_def"]["serve_uint8"]["inputs"]
    assert inputs == {"images": {"dtype": "uint8", "shape": [-1, 28, 28, 1]}}
    for path in ("/v1/models/other", "/v1/models/mnist/versions/1", "/v1/models/mnist/versions/1:predict"):
        status, answer = request(base, path)
        assert status == 404 and "Servable not found" in answer["error"], path


def test_tensorflow_serving_row_and_columnar_requests_equal_the_saved_model(server, sample):
    """A batch of 32 test digits, both formats, both signatures: the answers are the SavedModel's own outputs."""
    base, _, newest = server
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
        ({"signature_name": "nope", "instances": []}, "no signature 'nope'"),
        ({"instances": [[[0.0] * 28] * 28]}, "shape [N, 28, 28, 1]"),
        ({"instances": [[[[0.5]] * 28] * 28] * 257}, "at most 256"),
        ({"signature_name": "serve_uint8", "instances": [[[[0.5]] * 28] * 28]}, "whole numbers 0..255"),
        ({"instances": [[[["0"]] * 28] * 28]}, "numbers only"),
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
    base, model_path, _ = server
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
    assert status == 400 and "not a readable image" in answer["error"]


def good_request_answered(base):
    ok, answer = post(base, json.dumps({"image": np.zeros((28, 28)).tolist()}).encode())
    assert ok == 200 and len(answer["probabilities"]) == 10


@pytest.mark.parametrize(
    "head, status",
    [
        (b"Content-Length: -1\r\n", b"400"),
        (b"Content-Length: abc\r\n", b"400"),
        (b"Content-Length: 1.5\r\n", b"400"),
        (b"Content-Length: -99999999999999999999\r\n", b"400"),
        (b"Content-Length: 99999999999999999999\r\n", b"400"),
        (b"Content-Length: 5\r\nContent-Length: 6\r\n", b"400"),
        (b"Transfer-Encoding: chunked\r\n", b"411"),
        (b"", b"411"),  # a body without its length
    ],
)
def test_every_length_header_is_checked_never_an_unbounded_read(server, head, status):
    base, *_ = server
    port = int(base.rsplit(":", 1)[1])
    answer = raw(port, b"POST /predict HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + b'{"image": [[0]]}' * 10)
    assert answer.startswith(b"HTTP/1.0 " + status), answer[:200]
    assert b'{"error": ' in answer
    good_request_answered(base)


def test_silent_and_short_clients_are_dropped_and_others_served(server):
    base, *_ = server
    port = int(base.rsplit(":", 1)[1])
    silent = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(100)]
    short = socket.create_connection(("127.0.0.1", port), timeout=60)
    short.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
    try:
        good_request_answered(base)  # while 101 connections hang
        assert short.recv(100) == b""  # dropped after the idle timeout, no answer owed
    finally:
        for s in [*silent, short]:
            s.close()
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
    _, model_path, _ = server
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
