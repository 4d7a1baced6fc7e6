"""mnist-cnn-serve as operators run it (issue #43): readiness and health (HTTP, V2, gRPC), Prometheus
metrics scraped under load and checked against what was sent, server-side batching (merged calls equal
to unbatched ones, a bounded queue), warm-up (TensorFlow Serving's file, written by export and replayed
before a version turns ready), and the Open Inference Protocol through tritonclient's own client."""

import asyncio
import json
import shutil
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from test_serve import request, signature_outputs, start_server, stop
from test_serve_hostile import left_unfinished

from mnist_cnn import warmup
from mnist_cnn.serving.core import Overloaded, Service
from mnist_cnn.serving.versions import Model

pytestmark = pytest.mark.slow


# -- batching, in the service itself --------------------------------------------------------------


class Recorded:
    """A servable whose model call records the batch it got (and takes a little while)."""

    version, functions = 1, {"serving_default": None}

    def __init__(self):
        self.calls = []

    def run(self, signature, images):
        self.calls.append(len(images))
        time.sleep(0.02)
        flat = images.reshape(len(images), -1)
        return {"probabilities": flat[:, :10] * 2, "digits": flat[:, 0].astype(np.int64)}


def run_concurrently(service, servable, sizes):
    async def go():
        return await asyncio.gather(*[service.predict(servable, "serving_default",
                                                      np.full((n, 28, 28, 1), i, np.float32))
                                      for i, n in enumerate(sizes)], return_exceptions=True)
    return asyncio.run(go())


def test_concurrent_requests_share_model_calls_and_get_their_own_answers():
    """16 single images and a 3-image request at once, one worker: the first call takes what came
    first, the rest wait and are merged (up to 8 images a call); each request gets exactly its
    own rows back."""
    servable = Recorded()
    answers = run_concurrently(Service(Model("unused"), 1, max_batch_size=8), servable, [1] * 16 + [3])
    assert sum(servable.calls) == 19 and max(servable.calls) <= 8 and len(servable.calls) <= 5, servable.calls
    for i, (n, answer) in enumerate(zip([1] * 16 + [3], answers, strict=True)):
        assert answer["probabilities"].shape == (n, 10) and (answer["probabilities"] == 2 * i).all()
        assert (answer["digits"] == i).all()


def test_max_batch_size_1_turns_batching_off_and_a_full_queue_refuses_at_once():
    servable = Recorded()
    run_concurrently(Service(Model("unused"), 1, max_batch_size=1), servable, [1] * 6)
    assert servable.calls == [1] * 6
    answers = run_concurrently(Service(Model("unused"), 1, max_batch_size=2, max_enqueued_batches=2),
                               Recorded(), [1] * 12)
    refused = [a for a in answers if isinstance(a, Overloaded)]
    assert refused and all(isinstance(a, dict) for a in answers if a not in refused)
    assert "the server is busy (4 images wait for the model)" in str(refused[0])


# -- warm-up ---------------------------------------------------------------------------------------


def test_export_writes_tensorflow_servings_warm_up_file(served):
    """The file TF Serving replays: PredictionLog records, parsed with TF Serving's own protos."""
    prediction_log_pb2 = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(str(served / warmup.FILE))]
    shapes = [(r.predict_log.request.model_spec.signature_name,
               tf.make_ndarray(r.predict_log.request.inputs["images"]).shape,
               tf.make_ndarray(r.predict_log.request.inputs["images"]).dtype) for r in records]
    assert shapes == [("serving_default", (1, 28, 28, 1), np.float32), ("serve_uint8", (1, 28, 28, 1), np.uint8),
                      ("serving_default", (8, 28, 28, 1), np.float32), ("serve_uint8", (8, 28, 28, 1), np.uint8)]
    assert {r.predict_log.request.model_spec.name for r in records} == {"mnist"}
    assert [(s, x["images"].shape) for s, x in warmup.read(served)] == [(s, shape) for s, shape, _ in shapes]


def test_a_warm_up_request_that_does_not_fit_stops_the_server_in_one_line(tmp_path, served):
    """TF Serving fails a version whose warm-up fails; a server with no other version stops: exit 2."""
    version = tmp_path / "models" / "1"
    shutil.copytree(served, version)
    (version / warmup.FILE).unlink()
    warmup.write(version, "mnist", [("serving_default", np.zeros((1, 28, 28), np.float32))])
    proc, _ = start_server(tmp_path / "models", ready=False)
    assert proc.wait(timeout=120) == 2
    last = proc.stderr.read().splitlines()[-1]
    assert last == (f"serve.py: error: {version}: cannot warm up: {version}: a warm-up request for "
                    f"'serving_default' does not fit the model (inputs ['images'])"), last


# -- a server through its life: warming up, ready, draining ---------------------------------------


def health_of(target: str, stub=None):
    grpc = pytest.importorskip("grpc", reason="the grpc extra is in the dev extra")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=20)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def test_live_at_once_ready_after_warm_up_not_ready_from_the_first_moment_of_a_drain(tmp_path, served):
    """A version whose warm-up file holds 100 requests of 256 images: the server is live as soon
    as it listens while the version is LOADING (V2 ready 400, gRPC health NOT_SERVING), then
    replays all 100 and turns ready (AVAILABLE, 200, SERVING). On SIGTERM, a gRPC health watch
    already open sees NOT_SERVING at once, new connections are refused, and the version is
    reported UNLOADING to a gRPC status call made during the drain."""
    grpc = pytest.importorskip("grpc", reason="the grpc extra is in the dev extra")
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    version = tmp_path / "models" / "1"
    shutil.copytree(served, version)
    (version / warmup.FILE).unlink()
    warmup.write(version, "mnist", [("serve_uint8", np.full((256, 28, 28, 1), 9, np.uint8))] * 100)
    proc, port = start_server(tmp_path / "models", "--grpc-port", free_port(), "--drain-seconds", 60, ready=False)
    url, target = f"http://127.0.0.1:{port}", proc.out.read_text().split("gRPC API: ")[1].split()[0]
    stopping = False
    try:
        assert request(url, "/v2/health/live") == (200, {"live": True})
        assert request(url, "/v2/health/ready") == (400, {"ready": False})
        assert request(url, "/v1/models/mnist")[1]["model_version_status"][0]["state"] == "LOADING"
        assert health_of(target) == "NOT_SERVING"
        deadline = time.monotonic() + 120
        while request(url, "/v2/health/ready")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert request(url, "/v2/models/mnist/ready") == (200, {"name": "mnist", "ready": True})
        assert request(url, "/v1/models/mnist")[1]["model_version_status"][0]["state"] == "AVAILABLE"
        assert health_of(target) == "SERVING"
        assert "warmed up: version 1 is ready (100 warm-up requests replayed)" in proc.out.read_text()

        channel = grpc.insecure_channel(target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with left_unfinished(port) as unfinished:
            proc.send_signal(signal.SIGTERM)
            stopping = True
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            status = get_model_status_pb2.GetModelStatusRequest()
            status.model_spec.name = "mnist"
            states = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status, timeout=20)
            assert [(v.version, v.state) for v in states.model_version_status] == [
                (1, get_model_status_pb2.ModelVersionStatus.UNLOADING)]
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(url + "/v2/health/ready", timeout=5)
            proc.send_signal(signal.SIGTERM)  # the second: the drain ends now
            assert unfinished.result(timeout=60).startswith(b"HTTP/1.1 503 ")
        channel.close()
    finally:
        if not stopping:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


# -- one server under load: metrics, batching, the V2 API -----------------------------------------


@pytest.fixture(scope="module")
def operated(tmp_path_factory, served):
    base = tmp_path_factory.mktemp("operated") / "models"
    shutil.copytree(served, base / "1")
    proc, port = start_server(base, "--grpc-port", free_port())
    url = f"http://127.0.0.1:{port}"
    target = proc.out.read_text().split("gRPC API: ")[1].split()[0]
    yield SimpleNamespace(url=url, port=port, proc=proc, grpc=target, folder=base / "1")
    stop(proc)


def scrape(url: str) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample the server exports."""
    with urllib.request.urlopen(url + "/monitoring/prometheus/metrics", timeout=20) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def count(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_metrics_count_what_was_sent_under_load(operated, sample):
    """48 REST predicts of one digit (16 at a time), 5 that are 400, 10 gRPC Predicts and 6 V2 infers:
    the scrape's request counts by API and status, and the images through the model, are the ones
    sent (differences from a scrape before); requests were batched (fewer model calls than
    requests); the process metrics, loaded versions and readiness are there."""
    grpc = pytest.importorskip("grpc", reason="the grpc extra is in the dev extra")
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    _, (x, _) = sample
    before = scrape(operated.url)
    bodies = [json.dumps({"instances": (x[i:i + 1, ..., None] / 255.0).tolist()}).encode() for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        ok = list(pool.map(lambda b: request(operated.url, "/v1/models/mnist:predict", b)[0], bodies))
        bad = list(pool.map(lambda _: request(operated.url, "/v1/models/mnist:predict", b"{}")[0], range(5)))
    assert ok == [200] * 48 and bad == [400] * 5
    call = predict_pb2.PredictRequest()
    call.model_spec.name = "mnist"
    call.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((2, 28, 28, 1), np.float32)))
    with grpc.insecure_channel(operated.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for _ in range(10):
            stub.Predict(call, timeout=20)
    infer = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [3, 28, 28, 1],
                                    "data": x[:3].ravel().tolist()}]}).encode()
    for _ in range(6):
        assert request(operated.url, "/v2/models/mnist/infer", infer)[0] == 200
    after = scrape(operated.url)

    def sent(api, status):
        return count(after, "mnist_cnn_serving_requests_total", api=api, status=status) - count(
            before, "mnist_cnn_serving_requests_total", api=api, status=status)

    assert (sent("rest_predict", "200"), sent("rest_predict", "400"), sent("grpc_predict", "OK"),
            sent("v2_infer", "200")) == (48, 5, 10, 6)
    assert count(after, "mnist_cnn_serving_request_seconds_count", api="rest_predict") - count(
        before, "mnist_cnn_serving_request_seconds_count", api="rest_predict") == 53
    images = count(after, "mnist_cnn_serving_batch_size_sum") - count(before, "mnist_cnn_serving_batch_size_sum")
    calls = count(after, "mnist_cnn_serving_batch_size_count") - count(before, "mnist_cnn_serving_batch_size_count")
    assert images == 48 + 10 * 2 + 6 * 3
    assert calls < 48 + 10 + 6, "no request was batched with another"
    assert count(after, "mnist_cnn_serving_loaded_versions", model="mnist") == 1
    assert count(after, "mnist_cnn_serving_ready") == 1 and count(after, "process_resident_memory_bytes") > 100e6
    with urllib.request.urlopen(operated.url + "/metrics", timeout=20) as response:
        assert b"mnist_cnn_serving_requests_total" in response.read()


def test_batched_answers_equal_the_saved_models_own(operated, sample):
    """32 single digits at once (merged into shared model calls): each answer's probabilities within
    1e-6 of the SavedModel's own for that digit alone, and the same digit."""
    _, (x, _) = sample
    images = (x[100:132, ..., None] / 255.0).astype(np.float32)
    bodies = [json.dumps({"instances": images[i:i + 1].tolist()}).encode() for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda b: request(operated.url, "/v1/models/mnist:predict", b), bodies))
    want = signature_outputs(operated.folder, "serving_default", images)
    for i, (status, answer) in enumerate(answers):
        assert status == 200
        got = answer["predictions"][0]
        np.testing.assert_allclose(got["probabilities"], want["probabilities"][i], atol=1e-6)
        assert got["digits"] == want["digits"][i]


def test_tritonclient_reads_the_open_inference_protocol(operated, sample):
    """tritonclient.http with its defaults (binary tensors both ways), with JSON, FP32 images and
    UINT8 pixels, outputs by name: bit for bit the SavedModel's own (one request at a time, so no
    batching); server and model metadata, liveness and readiness; errors as the spec gives them."""
    http = pytest.importorskip("tritonclient.http", reason="tritonclient is in the dev extra")
    from tritonclient.utils import InferenceServerException

    _, (x, _) = sample
    pixels = x[:5, ..., None]
    floats = (pixels / 255.0).astype(np.float32)
    client = http.InferenceServerClient(f"127.0.0.1:{operated.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mnist")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    metadata = client.get_model_metadata("mnist")
    assert metadata["versions"] == ["1"] and metadata["inputs"] == [
        {"name": "images", "datatype": "FP32", "shape": [-1, 28, 28, 1]}]
    for datatype, images, signature in (("FP32", floats, "serving_default"), ("UINT8", pixels, "serve_uint8")):
        want = signature_outputs(operated.folder, signature, images)
        for binary in (True, False):
            tensor = http.InferInput("images", list(images.shape), datatype)
            tensor.set_data_from_numpy(images, binary_data=binary)
            outputs = None if binary else [http.InferRequestedOutput(name, binary_data=False)
                                           for name in ("probabilities", "digits")]
            result = client.infer("mnist", [tensor], outputs=outputs, request_id="r1")
            np.testing.assert_array_equal(result.as_numpy("probabilities"), want["probabilities"])
            np.testing.assert_array_equal(result.as_numpy("digits"), want["digits"])
            assert result.get_response()["id"] == "r1" and result.get_response()["model_version"] == "1"
        only = client.infer("mnist", [tensor], outputs=[http.InferRequestedOutput("digits")])
        assert only.as_numpy("probabilities") is None
        np.testing.assert_array_equal(only.as_numpy("digits"), want["digits"])

    wrong = http.InferInput("images", [1, 28, 28, 1], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 28, 28, 1)))
    with pytest.raises(InferenceServerException, match="images must be FP32"):
        client.infer("mnist", [wrong])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("other")
    header = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 28, 28, 1],
                                      "parameters": {"binary_data_size": 3136}}]}).encode()
    short = urllib.request.Request(operated.url + "/v2/models/mnist/infer", data=header + b"\0" * 10,
                                   headers={"Inference-Header-Content-Length": str(len(header))})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(short, timeout=20)
    assert refused.value.code == 400 and json.loads(refused.value.read())["error"] == (
        "images' binary_data_size must be 3,136 bytes (FP32 [1, 28, 28, 1]) and the binary data after the header; "
        "got 3136 and 10")
    client.close()


def test_a_new_version_is_warmed_up_before_it_serves_and_the_old_one_ends(operated):
    """A version copied into the base folder loads, replays its warm-up requests while version 1
    still serves, then serves; version 1 is reported END (TF Serving's states)."""
    base = operated.folder.parent
    shutil.copytree(operated.folder, base / ".staging")
    (base / ".staging").rename(base / "2")
    deadline = time.monotonic() + 60
    while request(operated.url, "/v1/models/mnist")[1]["model_version_status"][0] != {
            "version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}} \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    states = [(v["version"], v["state"]) for v in request(operated.url, "/v1/models/mnist")[1]["model_version_status"]]
    assert states == [("2", "AVAILABLE"), ("1", "END")]
    assert request(operated.url, "/v1/models/mnist/versions/1")[1]["model_version_status"][0]["state"] == "END"
    assert request(operated.url, "/v1/models/mnist/versions/1:predict", b"{}")[0] == 404
