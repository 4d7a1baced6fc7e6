"""What the server did, for Prometheus (``prometheus-client``): scraped at TensorFlow Serving's path
``/monitoring/prometheus/metrics`` and at ``/metrics``.

- ``mnist_cnn_serving_requests_total{model, api, status}``: requests answered, by API (``rest_predict``,
  ``rest_status``, ``rest_metadata``, ``rest_classify``, ``grpc_predict``, ``grpc_status``, ``grpc_metadata``,
  ``v2_infer``, ``v2_metadata``, ``page``) and status (the HTTP status, or the gRPC code's name);
- ``mnist_cnn_serving_request_seconds{model, api}``: each request's time in the server (histogram);
- ``mnist_cnn_serving_model_run_seconds{model}``: each model call's time (histogram), and
  ``mnist_cnn_serving_batch_size{model}``: the images of each model call (histogram: batching at work);
- ``mnist_cnn_serving_queued_images``, ``mnist_cnn_serving_in_flight``: images waiting for a model call,
  requests being handled (gauges);
- ``mnist_cnn_serving_loaded_versions{model}``, ``mnist_cnn_serving_ready``: versions loaded, readiness;
- ``process_*``: the process's CPU, memory and open files (prometheus-client's process collector).

Each server has its own registry: nothing is added to prometheus-client's global one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, model: str):
        self.model = model
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter("mnist_cnn_serving_requests", "Requests answered, by API and status",
                                ["model", "api", "status"], registry=self.registry)
        self.request_seconds = Histogram("mnist_cnn_serving_request_seconds", "A request's time in the server",
                                         ["model", "api"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.model_run_seconds = Histogram("mnist_cnn_serving_model_run_seconds", "One model call's time",
                                           ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("mnist_cnn_serving_batch_size", "Images in one model call", ["model"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queued = Gauge("mnist_cnn_serving_queued_images", "Images waiting for a model call",
                            registry=self.registry)
        self.in_flight = Gauge("mnist_cnn_serving_in_flight", "Requests being handled", registry=self.registry)
        self.loaded = Gauge("mnist_cnn_serving_loaded_versions", "Versions loaded", ["model"], registry=self.registry)
        self.ready = Gauge("mnist_cnn_serving_ready", "1 when the server is ready for traffic",
                           registry=self.registry)

    def answered(self, api: str, status, seconds: float) -> None:
        self.requests.labels(self.model, api, str(status)).inc()
        self.request_seconds.labels(self.model, api).observe(seconds)

    def model_run(self, images: int, seconds: float) -> None:
        self.batch_size.labels(self.model).observe(images)
        self.model_run_seconds.labels(self.model).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
