"""mnist-cnn-serve against a hostile client and an operator (issue #42), each case as the issue
reproduced it: JPEG bombs built from their markers, version folders that stopped polling,
stalled gRPC calls, silent sockets at the connection cap, SIGTERM mid-request, request
smuggling, client mistakes that were 500s. The server is a real process on 127.0.0.1; memory
is its VmHWM from /proc, CPU its utime + stime."""

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, free_port
from PIL import Image
from test_serve import memory_kb, request, start_server, status_of, stop

from mnist_cnn import predict
from mnist_cnn.bench.attacks import SilentSockets, jpeg_bomb, stalled_grpc_calls
from mnist_cnn.bench.serving import cpu_seconds
from mnist_cnn.keras_file import load_cnn
from mnist_cnn.serving.decode import MAX_SCANS, jpeg_cost
from mnist_cnn.serving.versions import scan_folder

pytestmark = pytest.mark.slow
CAP = 256  # the module server's --max-connections


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, exported_run, served):
    """The session's trained model served from a base folder, with gRPC and a connection cap of
    ``CAP``: .url, .proc, .grpc (target), .port, .model_path."""
    base = tmp_path_factory.mktemp("hostile") / "models"
    shutil.copytree(served, base / "1")
    proc, port = start_server(base, "--grpc-port", free_port(), "--max-connections", CAP, "--workers", 2)
    line = next(x for x in proc.out.read_text().splitlines() if x.startswith("TensorFlow Serving gRPC API: "))
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", proc=proc, grpc=line.split(": ", 1)[1], port=port,
                          model_path=exported_run.model_path)
    stop(proc)


def predict_body(n: int = 1) -> bytes:
    return json.dumps({"instances": np.zeros((n, 28, 28, 1)).tolist()}).encode()


# -- images: decoded within a budget read from their markers ------------------------------------


@pytest.mark.parametrize("options, scans", [({}, 1), ({"progressive": True}, 10),
                                            ({"progressive": True, "optimize": True}, 10), ({"subsampling": 0}, 1)])
def test_the_jpegs_cameras_and_browsers_write_are_within_the_budget(options, scans):
    """Pillow's (libjpeg's) own files, costed scan by scan: baseline is one scan, libjpeg's
    progression ten for colour; a progressive 800x600 keeps 1.4 MB of coefficients."""
    pixels = np.random.default_rng(0).integers(0, 255, (600, 800, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", **options)
    cost = jpeg_cost(out.getvalue())
    assert (cost.width, cost.height, cost.components, cost.scans) == (800, 600, 3, scans)
    assert cost.coefficient_bytes == (1_459_200 if scans > 1 else 0)


def test_jpeg_bombs_are_refused_from_their_markers_at_no_cost(hostile, sample):
    """The issue's bombs, four at once: 60,000 end-of-band scans over 2000x2000 (~850 kB; 14 s of
    CPU each before), a ~1 kB 13000x13000 three-component progressive (+967 MB before) and a
    16000x11000 CMYK one (+1,353 MB). Each is a 400 naming what it would cost; the server's peak
    memory stays within 50 MB and the four cost it under 3 CPU-s (28+ before). A real progressive
    JPEG of a digit is still read as predict.py reads it."""
    slow = jpeg_bomb(2000, 2000, ac_scans=60_000)
    wide = jpeg_bomb(13000, 13000, 3, dc_bytes=900)
    cmyk = jpeg_bomb(16000, 11000, 4, dc_bytes=1200)
    assert len(slow) < 1_000_000 and len(wide) < 1100 and len(cmyk) < 1400
    pid = hostile.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    memory, cpu = memory_kb(pid, "VmHWM"), cpu_seconds(pid)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda body: request(hostile.url, "/predict", body, "image/jpeg"),
                                [slow, wide, cmyk, slow]))
    assert [status for status, _ in answers] == [400] * 4, answers
    assert answers[0][1]["error"] == f"the image is a JPEG of more than {MAX_SCANS} scans"
    assert answers[1][1]["error"] == ("the image is a progressive JPEG of 13000x13000 pixels, 3 components: decoding "
                                      "it takes 967 MB, more than the 32 MB allowed")
    assert answers[2][1]["error"].startswith("the image is a JPEG whose scans decode more than 8,000,000 blocks")
    grown, spent = memory_kb(pid, "VmHWM") - memory, cpu_seconds(pid) - cpu
    assert grown < 50 * 1024, f"the server's peak memory grew by {grown / 1024:.0f} MB"
    assert spent < 3, f"the four bombs cost the server {spent:.1f} CPU-s"

    _, (x, _) = sample
    out = io.BytesIO()
    Image.fromarray(255 - np.kron(x[7], np.ones((20, 20), np.uint8))).save(out, "JPEG", progressive=True, quality=90)
    status, answer = request(hostile.url, "/predict", out.getvalue(), "image/jpeg")
    assert status == 200, answer
    prepared = predict.mnist_style(predict.read_image(io.BytesIO(out.getvalue()), formats=("JPEG",), max_side=2000))
    want = load_cnn(hostile.model_path).predict(prepared[None, ..., None], verbose=0)[0]
    np.testing.assert_allclose(answer["probabilities"], want, atol=1e-5)


# -- the connections and calls a client holds ---------------------------------------------------


def test_stalled_grpc_calls_hold_no_worker(hostile):
    """100 calls that open a request stream and never send a message (no deadline): before, four
    of them took every worker and other clients' Predict and GetModelStatus timed out. Now
    other calls are answered while all 100 are held, and REST too."""
    grpc = pytest.importorskip("grpc", reason="the grpc extra is in the dev extra")
    from tensorflow_serving.apis import (
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    release = stalled_grpc_calls(hostile.grpc, 100)
    try:
        time.sleep(1)  # the calls are open on the server
        with grpc.insecure_channel(hostile.grpc) as channel:
            call = predict_pb2.PredictRequest()
            call.model_spec.name = "mnist"
            call.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 28, 28, 1), np.float32)))
            for _ in range(10):
                answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(call, timeout=20)
                assert answer.outputs["probabilities"].tensor_shape.dim[1].size == 10
            status = get_model_status_pb2.GetModelStatusRequest()
            status.model_spec.name = "mnist"
            versions = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status, timeout=20)
            assert [v.version for v in versions.model_version_status] == [1]
        assert request(hostile.url, "/v1/models/mnist:predict", predict_body(), timeout=20)[0] == 200
    finally:
        release()


def test_silent_reconnecting_sockets_past_the_cap_do_not_lock_a_client_out(hostile):
    """1.5x ``CAP`` sockets that connect, send nothing and reconnect at once when closed (the
    issue's 4,200 against a cap of 4,096, scaled down): the server closes those that waited
    longest, never the new client: 40 predicts among them are all answered 200 (before: 115 of
    117 got 503)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    statuses = []
    with SilentSockets(hostile.port, CAP * 3 // 2, seconds=120) as flood:
        time.sleep(0.5)
        for _ in range(40):
            statuses.append(request(hostile.url, "/v1/models/mnist:predict", predict_body(), timeout=20)[0])
        reconnects = flood.reconnects
    assert statuses == [200] * 40
    assert reconnects >= CAP // 2, f"only {reconnects} silent sockets were closed to make room"


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_request_framed_twice_is_refused_and_its_connection_closed(hostile):
    """RFC 9112 6.1: Content-Length with Transfer-Encoding: chunked, then a second request on the
    same connection (how a request is smuggled past a proxy that reads the other framing).
    Before, both were answered and the connection stayed open; now one 400 and the close."""
    smuggled = (b"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                b"GET /v1/models/mnist HTTP/1.1\r\nHost: x\r\n\r\n")
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=20) as s:
        s.sendall(smuggled)
        reply = read_all(s)  # returns only once the server closes
    assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 400 "), reply[:300]
    assert b"both Content-Length and Transfer-Encoding" in reply


def test_client_mistakes_are_4xx_and_invalid_argument_never_500_or_unknown(hostile):
    """A version of 5,000 digits (Python's int() limit raised a 500 before the int64 check); gRPC
    tensors of dtype 9999 or uint8 values 300 and -5, and a version label no model has (UNKNOWN,
    or silently accepted, before)."""
    grpc = pytest.importorskip("grpc", reason="the grpc extra is in the dev extra")
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    status, answer = request(hostile.url, "/v1/models/mnist/versions/" + "9" * 5000)
    assert status == 400 and answer["error"].startswith("Failed to convert version: 999"), answer

    def uint8_request(values, dtype=tf.uint8.as_datatype_enum):
        call = predict_pb2.PredictRequest()
        call.model_spec.name = "mnist"
        call.model_spec.signature_name = "serve_uint8"
        tensor = call.inputs["images"]
        tensor.dtype = dtype
        for size in (1, 28, 28, 1):
            tensor.tensor_shape.dim.add().size = size
        tensor.int_val.extend(values)
        return call

    labelled = uint8_request([0] * 784)
    labelled.model_spec.version_label = "stable"
    with grpc.insecure_channel(hostile.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for call, details in [(uint8_request([0] * 784, dtype=9999), "serve_uint8 takes uint8 images, got dtype 9999"),
                              (uint8_request([300] * 784), "serve_uint8 takes pixels 0..255, got 300"),
                              (uint8_request([0] * 783 + [-5]), "serve_uint8 takes pixels 0..255, got -5"),
                              (labelled, "Unrecognized servable version label: stable")]:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Predict(call, timeout=20)
            assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)
        assert stub.Predict(uint8_request([255] * 784), timeout=20).model_spec.version.value == 1


# -- the whole-request deadline ---------------------------------------------------------------


def test_past_the_deadline_a_request_is_504_and_its_queued_work_is_dropped(tmp_path, served):
    """One worker, a 3-second deadline, 60 requests of 256 images at once (several seconds of
    work on one worker): those not answered in time get 504 with one line, never a 500, and
    their work, still queued, is dropped: a request sent right after, with the same deadline, is
    answered 200 (had the dropped work run first, it would have waited past its deadline too).
    Then SIGINT with a request whose body never ends: it gets 503 when --drain-seconds (1) are up,
    and the server exits 0 with its one line."""
    shutil.copytree(served, tmp_path / "models" / "1")
    proc, port = start_server(tmp_path / "models", "--workers", 1, "--request-timeout", 3, "--drain-seconds", 1)
    url = f"http://127.0.0.1:{port}"
    body = json.dumps({"signature_name": "serve_uint8", "instances": np.full((256, 28, 28, 1), 7).tolist()}).encode()
    stopping = False
    try:
        with ThreadPoolExecutor(60) as pool:
            answers = list(pool.map(lambda _: request(url, "/v1/models/mnist:predict", body, timeout=60), range(60)))
        statuses = [status for status, _ in answers]
        assert set(statuses) <= {200, 504} and statuses.count(504) >= 5, statuses
        late = next(answer for status, answer in answers if status == 504)
        assert late == {"error": "the request was not answered within the server's request deadline"}
        assert request(url, "/v1/models/mnist:predict", predict_body(), timeout=60)[0] == 200
        with left_unfinished(port) as unfinished:
            proc.send_signal(signal.SIGINT)
            stopping = True
            cut = unfinished.result(timeout=60)
    finally:
        if not stopping:  # the test failed before it stopped the server
            proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert cut.startswith(b"HTTP/1.1 503 ") and cut.endswith(
        b'{"error":"the server is shutting down and could not finish this request in time"}'), cut
    out = proc.out.read_text().splitlines()
    assert code == 0 and out[-1].startswith("Stopped on SIGINT: drained in "), out[-3:]
    assert out[-1].endswith("; 1 request(s) still running when the drain ended answered 503")
    assert "Traceback" not in proc.stderr.read()


# -- SIGTERM: a graceful drain ------------------------------------------------------------------


@contextlib.contextmanager
def left_unfinished(port: int):
    """A predict whose body is half sent and never finished, in flight: the future of its answer."""
    sent = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        unfinished = pool.submit(trickling_request, port, sent)
        assert sent.wait(30)
        time.sleep(0.2)  # the request is in
        yield unfinished


def trickling_request(port: int, sent: threading.Event) -> bytes:
    """A predict whose body is half sent and never finished: what the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b" " * 500)
        sent.set()
        return read_all(s)


def connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return True
    except ConnectionRefusedError:
        return False


def test_sigterm_drains_what_is_in_flight_and_exits_0(tmp_path, served):
    """SIGTERM with 50 REST predicts of 256 images and 10 gRPC predicts in flight, and one request
    whose body never ends (before: 4 of 50 were 500s with tracebacks, and the process ended by
    the signal, status -15). New connections are refused from the first moment; every predict is
    answered 200 / OK, however long it takes (--drain-seconds 120); a second SIGTERM then ends the
    drain at once: the unfinished request gets 503 with one line; the process prints one line and
    exits 0."""
    grpc = pytest.importorskip("grpc", reason="the grpc extra is in the dev extra")
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    shutil.copytree(served, tmp_path / "models" / "1")
    proc, port = start_server(tmp_path / "models", "--grpc-port", free_port(), "--drain-seconds", 120,
                              "--request-timeout", 120)
    target = next(x for x in proc.out.read_text().splitlines() if x.startswith("TensorFlow Serving gRPC API: "))
    url = f"http://127.0.0.1:{port}"
    body = json.dumps({"signature_name": "serve_uint8", "instances": np.full((256, 28, 28, 1), 7).tolist()}).encode()
    call = predict_pb2.PredictRequest()
    call.model_spec.name = "mnist"
    call.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((64, 28, 28, 1), np.float32)))
    channel = grpc.insecure_channel(target.split(": ", 1)[1])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    stub.Predict(call, timeout=60)  # connected
    sent, stopping = threading.Event(), False
    try:
        with ThreadPoolExecutor(62) as pool:
            rest = [pool.submit(request, url, "/v1/models/mnist:predict", body, timeout=120) for _ in range(50)]
            calls = [stub.Predict.future(call, timeout=120) for _ in range(10)]
            unfinished = pool.submit(trickling_request, port, sent)
            assert sent.wait(30)
            time.sleep(0.5)  # the requests are in
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while time.monotonic() - signalled < 6 and connects(port):
                time.sleep(0.05)
            assert not connects(port), "new connections were still accepted during the drain"
            statuses = [f.result()[0] for f in rest]
            answers = [f.result().model_spec.version.value for f in calls]
            assert not unfinished.done() and proc.poll() is None  # still draining: the unfinished request holds it
            proc.send_signal(signal.SIGTERM)
            stopping = True
            cut = unfinished.result(timeout=60)
    finally:
        if not stopping:  # the test failed before its second signal
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        channel.close()
    assert statuses == [200] * 50 and answers == [1] * 10
    assert cut.startswith(b"HTTP/1.1 503 ") and cut.endswith(
        b'{"error":"the server is shutting down and could not finish this request in time"}'), cut
    out, err = proc.out.read_text().splitlines(), proc.stderr.read()
    assert code == 0, err[-2000:]
    assert out[-1].startswith("Stopped on SIGTERM: drained in "), out[-3:]
    assert out[-1].endswith("; 1 request(s) still running when the drain ended answered 503")
    assert "Traceback" not in err and " 500" not in "\n".join(out)


# -- the version poller -------------------------------------------------------------------------


def test_nothing_in_a_version_folder_stops_the_poller(tmp_path, served):
    """Each of the issue's folders, one after another, while version 1 serves: an empty folder
    (polling stopped for good before), a symbolic link to /, a saved_model.pb linked to /dev/zero
    (the server grew by 2.3 GB in 2.6 s), a saved_model.pb that is a FIFO (the poller blocked in
    open()). Each is skipped with one log line, the server's memory stays put, and a version
    copied in afterwards -- file by file, while being polled -- is served."""
    base = tmp_path / "models"
    shutil.copytree(served, base / "1")
    proc, port = start_server(base, "--poll-seconds", 0.2)
    url = f"http://127.0.0.1:{port}"
    try:
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        before = memory_kb(proc.pid, "VmHWM")
        (base / "4").mkdir()
        (base / "20").symlink_to("/")
        (base / "7").mkdir()
        (base / "7" / "saved_model.pb").symlink_to("/dev/zero")
        shutil.copytree(served / "variables", base / "8" / "variables")
        os.mkfifo(base / "8" / "saved_model.pb")
        time.sleep(2)  # ten polls
        assert status_of(url) == (200, ["1"])
        assert memory_kb(proc.pid, "VmHWM") - before < 100 * 1024

        growing = base / "30"
        growing.mkdir()
        for source in sorted(served.rglob("*")):  # a copy as a slow tool makes it, file by file
            target = growing / source.relative_to(served)
            if source.is_dir():
                target.mkdir()
            else:
                shutil.copyfile(source, target)
                time.sleep(0.5)
        deadline = time.monotonic() + 60
        while status_of(url) != (200, ["30"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status_of(url) == (200, ["30"])
        assert request(url, "/v1/models/mnist/versions/30:predict", predict_body())[0] == 200
    finally:
        stop(proc)
    lines = [line for line in proc.stderr.read().splitlines() if "skipping version" in line]
    for version, why in [(4, "no saved_model.pb (an empty or half-written version folder)"),
                         (20, f"{base / '20'}: a symbolic link; version folders must be real folders inside"),
                         (7, f"{base / '7' / 'saved_model.pb'}: a symbolic link; a version folder holds only"),
                         (8, f"{base / '8' / 'saved_model.pb'}: not a regular file or folder")]:
        mine = [line for line in lines if f"skipping version {version}:" in line]
        assert len(mine) == 1 and why in mine[0], (version, mine)  # once, not at every poll


def test_a_version_folder_is_scanned_without_following_anything(tmp_path):
    """What the poller looks at before TensorFlow opens a file: lstat only, bounded."""
    folder = tmp_path / "5"
    (folder / "variables").mkdir(parents=True)
    stamp, problem = scan_folder(folder)
    assert problem == f"{folder}: no saved_model.pb (an empty or half-written version folder)"
    (folder / "saved_model.pb").write_bytes(b"x")
    (folder / "variables" / "variables.index").write_bytes(b"y")
    later, problem = scan_folder(folder)
    assert problem is None and later != stamp
    (folder / "variables" / "variables.data-00000-of-00001").symlink_to("/etc/passwd")
    assert "variables.data-00000-of-00001: a symbolic link" in scan_folder(folder)[1]
    for i in range(1001):
        (folder / f"f{i}").touch()
    assert scan_folder(folder)[1] == f"{folder}: more than 1000 files; not a SavedModel of this package"


@pytest.mark.parametrize("name", ["5", "6"])
def test_a_version_given_directly_is_checked_the_same_way(tmp_path, served, name):
    """``mnist-cnn-serve DIR/5`` whose saved_model.pb is a FIFO or a link: one line, exit 2, at once."""
    folder = tmp_path / name
    shutil.copytree(served / "variables", folder / "variables")
    if name == "5":
        os.mkfifo(folder / "saved_model.pb")
    else:
        (folder / "saved_model.pb").symlink_to("/dev/zero")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "serve.py"), str(folder), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    last = proc.stderr.splitlines()[-1]
    assert f"{folder / 'saved_model.pb'}: " in last and ("symbolic link" in last or "not a regular file" in last)
