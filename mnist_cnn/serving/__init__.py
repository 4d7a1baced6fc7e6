"""``mnist-cnn-serve``: the model server, its own wing of the package.

- ``versions``: the versions served (loaded, checked, warmed up, polled and swapped as TensorFlow
  Serving does, with their states);
- ``core``: what every face shares (workers, batching, deadlines, readiness, the drain), and
  ``metrics`` (Prometheus);
- ``decode``: image bodies decoded within a fixed memory and CPU budget;
- ``tfserving``: TensorFlow Serving's API semantics (requests, answers, errors); ``v2``: the Open
  Inference Protocol's;
- ``connections``: uvicorn's HTTP/1.1 connections with a whole-request deadline and room past the cap;
- ``http``: the Starlette app (TF Serving's REST API, V2, health, metrics and the draw-a-digit ``page``);
- ``grpc``: TensorFlow Serving's gRPC API and gRPC health (the ``grpc`` extra);
- ``server``: the process: both faces on one event loop, signals and the graceful drain.
"""
