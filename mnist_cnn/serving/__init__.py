"""``mnist-cnn-serve``: the model server, its own wing of the package.

- ``core``: the versions served (loaded, checked, polled and swapped as TensorFlow Serving does);
- ``decode``: image bodies decoded within a fixed memory and CPU budget;
- ``tfserving``: TensorFlow Serving's API semantics (requests, answers, errors);
- ``http``: the Starlette app (TF Serving's REST API and the draw-a-digit ``page``) on uvicorn;
- ``grpc``: TensorFlow Serving's gRPC API (the ``grpc`` extra);
- ``server``: the process: both faces on one event loop, signals and the graceful drain.
"""
