"""How fast this machine can go, and where a training step's time goes (used by bench.py).

- ``matmul_peak`` / ``ceilings``: GFLOP/s of a large matmul per precision -- the ceiling
  each training contender is measured against;
- ``op_class_profile``: milliseconds per training step by op class, from TensorFlow's
  profiler (the data of TensorBoard's Profile tab).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import tensorflow as tf

from mnist_cnn import data, train


def matmul_peak(dtype: str, n: int = 2048, rounds: int = 5, per_window: int = 8) -> float:
    """GFLOP/s of an n x n matmul in ``dtype`` on this machine: the best of ``rounds``
    windows (a ceiling, so the best, not the median)."""
    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)
    matmul = tf.function(lambda: tf.matmul(a, b))
    matmul().numpy()  # tracing and warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_window):
            result = matmul()
        result.numpy()
        best = min(best, (time.perf_counter() - start) / per_window)
    return 2 * n**3 / best / 1e9


def ceilings(log) -> dict[str, float]:
    """The matmul peak of each precision the contenders use: float32, and the mixed one
    (bfloat16 on a CPU, float16 on a GPU)."""
    mixed = "float16" if tf.config.list_physical_devices("GPU") else "bfloat16"
    peaks = {precision: matmul_peak(precision) for precision in ("float32", mixed)}
    log(f"  matmul peaks: {', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in peaks.items())}")
    return peaks


def contender_precision(name: str, peaks: dict[str, float]) -> str:
    return next(p for p in peaks if p != "float32") if "mixed precision" in name else "float32"


OP_CLASSES = {  # TensorFlow (oneDNN) op types of one training step, by what they do
    "conv forward": ("Conv2D", "_MklNativeFusedConv2D", "_MklFusedConv2D", "_MklNativeConv2D"),
    "conv backward-input": ("Conv2DBackpropInput", "_MklNativeConv2DBackpropInput"),
    "conv backward-filter": ("Conv2DBackpropFilter", "_MklNativeConv2DBackpropFilterWithBias",
                             "_MklNativeConv2DBackpropFilter", "BiasAddGrad"),
    "dense (forward and backward)": ("MatMul", "_MklMatMul", "_MklNativeFusedMatMul", "_MklFusedMatMul"),
    "pooling": ("MaxPool", "MaxPoolGrad", "_MklNativeMaxPool", "_MklNativeMaxPoolGrad"),
    "optimizer update": ("ResourceApplyAdam", "Sub", "Mul", "Square", "Sqrt", "RealDiv", "AddV2",
                         "AssignAddVariableOp", "AssignSubVariableOp", "AssignVariableOp"),
}


def op_class_profile(steps: int = 40, batch_size: int = 50) -> dict[str, float]:
    """Milliseconds per training step by op class (``OP_CLASSES``; the rest is "other"),
    from TensorFlow's profiler: the same xplane trace TensorBoard's Profile tab reads,
    turned into op statistics by TensorFlow's own converter (``framework_op_stats``;
    a private module in TF 2.21, hence the import here). Idle time is left out; op
    times are summed over threads, so they can add up to more than the wall time."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    model = train.build_model(train.TrainConfig(jit_compile="off"), steps_per_epoch=1)  # as fit() builds it
    pipeline = data.load("sample", batch_size=batch_size, seed=0, repeat=True).train
    model.fit(pipeline, epochs=1, steps_per_epoch=5, verbose=0)  # tracing outside the profile
    with tempfile.TemporaryDirectory() as folder:
        tf.profiler.experimental.start(folder)
        model.fit(pipeline, epochs=1, steps_per_epoch=steps, verbose=0)
        tf.profiler.experimental.stop()
        traces = [str(p) for p in Path(folder).rglob("*.xplane.pb")]
        stats, ok = plugin.xspace_to_tools_data(traces, "framework_op_stats", {})
    if not ok:
        raise RuntimeError(f"the profiler's op statistics are unavailable: {stats[:200]!r}")
    table = json.loads(stats)[0]
    columns = [c["id"] for c in table["cols"]]
    ms = dict.fromkeys([*OP_CLASSES, "other"], 0.0)
    for row in table["rows"]:
        record = dict(zip(columns, (c["v"] if isinstance(c, dict) else c for c in row["c"]), strict=False))
        if record["type"] == "IDLE":
            continue
        kind = next((name for name, types in OP_CLASSES.items() if record["type"] in types), "other")
        ms[kind] += record["total_self_time"] / 1000 / steps
    return ms


