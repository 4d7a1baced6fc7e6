"""scripts/serve.py end to end: a real server process on a free port of 127.0.0.1, real
digits through POST /predict, bad requests, and a real browser drawing on the page."""

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import REPO, free_port, quick

from mnist_cnn import predict, train
from mnist_cnn.keras_file import load_cnn

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A model trained well enough to read digits, served: (base url, model path)."""
    folder = tmp_path_factory.mktemp("serve")
    run = train.fit(quick(folder, epochs=3, steps_per_epoch=60), verbose=0)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), str(run.model_path),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "Serving ... on http://127.0.0.1:PORT/"
    assert f"http://127.0.0.1:{port}/" in line, proc.stderr.read()[-2000:] if proc.poll() is not None else line
    yield f"http://127.0.0.1:{port}", run.model_path
    proc.terminate()
    proc.wait(timeout=30)


def post(base: str, body: bytes):
    request = urllib.request.Request(base + "/predict", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_page_is_self_contained(server):
    base, _ = server
    with urllib.request.urlopen(base + "/", timeout=30) as response:
        page = response.read().decode()
    assert '<canvas id="pad" width="280" height="280">' in page and 'id="clear"' in page
    assert "http://" not in page and "https://" not in page  # no CDN: works offline


def test_real_digits_through_the_endpoint(server, sample):
    base, model_path = server
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
        (b'{"picture": []}', 400, 'expected a JSON object {"image"'),
        (b'{"image": [[1, 2], [3]]}', 400, "rectangular array of numbers"),
        (b'{"image": []}', 400, "non-empty 2-D array"),
        (b'{"image": "abc"}', 400, "rectangular array of numbers"),
        (b'{"image": [1, 2, 3]}', 400, "non-empty 2-D array"),
        (b'{"image": [["a", "b"]]}', 400, "rectangular array of numbers"),
        (b'{"image": [[0, 0], [0, 0]]}', 400, "no digit found"),
        (b'{"image": [[-5, 300], [0, 1]]}', 400, "pixel values must be"),
        (b" " * (5 << 20), 413, "over the 4,194,304-byte limit"),
    ],
)
def test_bad_requests_are_4xx_with_one_line_and_the_server_lives_on(server, body, status, message):
    base, _ = server
    got, answer = post(base, body)
    assert got == status and message in answer["error"] and "\n" not in answer["error"]
    ok, answer = post(base, json.dumps({"image": np.zeros((28, 28)).tolist()}).encode())
    assert ok == 200 and len(answer["probabilities"]) == 10


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

    base, _ = server
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
