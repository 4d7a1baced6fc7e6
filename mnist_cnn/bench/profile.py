"""How fast this machine can go, and where a training step's time goes (used by bench.py).

- ``matmul_peak`` / ``ceilings``: GFLOP/s of a large matmul per precision -- the ceiling
  each training contender is measured against;
- ``op_class_profile``: milliseconds per training step by op class, from TensorFlow's
  profiler (the data of TensorBoard's Profile tab);
- ``kernel_floor``: each kernel of a training step timed alone at its own shapes -- the
  least time TensorFlow's kernels need for one step on this machine.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import keras
import tensorflow as tf

from mnist_cnn import data, dense_gradient, train
from mnist_cnn.model import CNN


def best_seconds(kernel, rounds: int = 5, per_window: int = 8) -> float:
    """Seconds per call of a no-argument tf.function: the best of ``rounds`` windows
    (a ceiling, so the best, not the median)."""
    tf.nest.flatten(kernel())[0].numpy()  # tracing and warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_window):
            result = kernel()
        tf.nest.flatten(result)[0].numpy()
        best = min(best, (time.perf_counter() - start) / per_window)
    return best


def matmul_peak(dtype: str, n: int = 2048, rounds: int = 5, per_window: int = 8) -> float:
    """GFLOP/s of an n x n matmul in ``dtype`` on this machine."""
    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)
    return 2 * n**3 / best_seconds(tf.function(lambda: tf.matmul(a, b)), rounds, per_window) / 1e9


def ceilings(log) -> dict[str, float]:
    """The matmul peak of each precision the contenders use: float32, and the mixed one
    (bfloat16 on a CPU, float16 on a GPU)."""
    mixed = "float16" if tf.config.list_physical_devices("GPU") else "bfloat16"
    peaks = {precision: matmul_peak(precision) for precision in ("float32", mixed)}
    log(f"  matmul peaks: {', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in peaks.items())}")
    return peaks


def contender_precision(name: str, peaks: dict[str, float]) -> str:
    return next(p for p in peaks if p != "float32") if "mixed precision" in name else "float32"


OP_CLASSES = {  # TensorFlow op types of one training step, by what they do: oneDNN's (_Mkl*) and Eigen's
    "conv forward": ("Conv2D", "_FusedConv2D", "_MklNativeFusedConv2D", "_MklFusedConv2D", "_MklNativeConv2D"),
    "conv backward-input": ("Conv2DBackpropInput", "_MklNativeConv2DBackpropInput"),
    "conv backward-filter": ("Conv2DBackpropFilter", "_MklNativeConv2DBackpropFilterWithBias",
                             "_MklNativeConv2DBackpropFilter", "BiasAddGrad"),
    "dense (forward and backward)": ("MatMul", "_FusedMatMul", "_MklMatMul", "_MklNativeFusedMatMul",
                                     "_MklFusedMatMul"),
    "pooling": ("MaxPool", "MaxPoolGrad", "_MklNativeMaxPool", "_MklNativeMaxPoolGrad"),
    "optimizer update": ("ResourceApplyAdam", "Sub", "Mul", "Square", "Sqrt", "RealDiv", "AddV2",
                         "AssignAddVariableOp", "AssignSubVariableOp", "AssignVariableOp"),
}


class ProfileUnavailable(RuntimeError):
    """This TensorFlow cannot turn a profiler trace into op statistics."""


def op_stats_converter():
    """TensorFlow's own converter from a profiler trace (xplane) to the op statistics
    TensorBoard's Profile tab shows. TensorFlow offers no public API for it (TensorBoard's
    profile plugin calls this same function), so this is the package's one import of a
    private TensorFlow module, kept here: it may move in any release, and a TensorFlow
    without it makes the bench's op profile unavailable, not the bench fail."""
    try:
        from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

        return plugin.xspace_to_tools_data
    except (ImportError, AttributeError) as e:
        raise ProfileUnavailable(f"this TensorFlow has no profiler op-statistics converter ({e})") from None


def op_class_profile(steps: int = 40, batch_size: int = 50) -> dict[str, float]:
    """Milliseconds per training step by op class (``OP_CLASSES``; the rest is "other"),
    from TensorFlow's profiler: the same xplane trace TensorBoard's Profile tab reads,
    turned into op statistics by TensorFlow's own converter (``op_stats_converter``).
    Idle time is left out; op times are summed over threads, so they can add up to more
    than the wall time. ``ProfileUnavailable`` when this TensorFlow has no converter."""
    convert = op_stats_converter()
    model = train.build_model(train.TrainConfig(jit_compile="off"), steps_per_epoch=1)  # as fit() builds it
    pipeline = data.endless("sample", batch_size)
    model.fit(pipeline, epochs=1, steps_per_epoch=5, verbose=0, shuffle=False)  # tracing outside the profile
    with tempfile.TemporaryDirectory() as folder:
        tf.profiler.experimental.start(folder)
        model.fit(pipeline, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        tf.profiler.experimental.stop()
        traces = [str(p) for p in Path(folder).rglob("*.xplane.pb")]
        stats, ok = convert(traces, "framework_op_stats", {})
    if not ok:
        raise ProfileUnavailable(f"the profiler's op statistics are unavailable: {stats[:200]!r}")
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




def layer_flops(layer: keras.layers.Layer, shape: tuple, out: tuple) -> int:
    """Multiply-adds x 2 of a conv or dense layer's forward pass over a ``shape`` batch
    (0 for the others: bias, ReLU, pooling and softmax are negligible)."""
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        return 2 * kh * kw * shape[-1] * out[-1] * out[1] * out[2] * shape[0]
    if isinstance(layer, keras.layers.Dense):
        return 2 * shape[0] * shape[-1] * out[-1]
    return 0


def _conv_kernels(layer: keras.layers.Conv2D, shape: tuple, out: tuple, first: bool) -> dict:
    x, g = tf.random.normal(shape), tf.random.normal(out)
    w = tf.random.normal((*layer.kernel_size, shape[-1], layer.filters))
    strides, padding = [1, *layer.strides, 1], layer.padding.upper()
    flops = layer_flops(layer, shape, out)
    kernels = {
        "forward": lambda: tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, w, strides, padding), tf.zeros(layer.filters))),
        "backward-filter": lambda: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=w.shape, out_backprop=g, strides=strides, padding=padding),
    }
    if not first:  # the first layer's input needs no gradient
        kernels["backward-input"] = lambda: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=shape, filter=w, out_backprop=g, strides=strides, padding=padding)
    return {f"{layer.name} {kind}": (kernel, flops) for kind, kernel in kernels.items()}


def _dense_kernels(layer: keras.layers.Dense, shape: tuple, out: tuple, first: bool, lean: bool = False) -> dict:
    """``lean``: the input gradient as the lean step computes it (``dense_gradient.input_gradient``)."""
    x, g = tf.random.normal(shape), tf.random.normal(out)
    w = tf.random.normal((shape[-1], out[-1]))
    flops = layer_flops(layer, shape, out)
    kernels = {
        "forward": lambda: tf.nn.relu(tf.nn.bias_add(tf.matmul(x, w), tf.zeros(out[-1]))),
        "backward-weights": lambda: tf.matmul(x, g, transpose_a=True),
    }
    if not first:
        kernels["backward-input"] = ((lambda: dense_gradient.input_gradient(g, w)) if lean
                                     else (lambda: tf.matmul(g, w, transpose_b=True)))
    return {f"{layer.name} {kind}": (kernel, flops) for kind, kernel in kernels.items()}


def _pool_kernels(layer: keras.layers.MaxPooling2D, shape: tuple, out: tuple) -> dict:
    """Pooling forward and backward together: oneDNN pairs MaxPool with its gradient
    (a workspace) only when both are in one graph, as they are in a training step."""
    x, g = tf.random.normal(shape), tf.random.normal(out)

    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            pooled = tf.nn.max_pool2d(x, [1, *layer.pool_size, 1], [1, *layer.strides, 1], "VALID")
        return tape.gradient(pooled, x, output_gradients=g)

    return {f"{layer.name} forward and backward": (forward_backward, 0)}


def _adam_kernel(model: CNN) -> dict:
    """One fused Adam update (ResourceApplyAdam, as FusedAdam applies it) of every weight."""
    slots = [[tf.Variable(tf.zeros(w.shape)) for _ in range(3)] for w in model.trainable_weights]
    grads = [tf.random.normal(w.shape) for w in model.trainable_weights]

    def update():
        for (var, m, v), grad in zip(slots, grads, strict=True):
            tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=0.9, beta2_power=0.999,
                                         lr=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-7, grad=grad)
        return tf.constant(0.0)

    return {"Adam update (all weights)": (update, 0)}


def step_kernels(model: CNN, batch_size: int) -> dict[str, tuple]:
    """The kernels of one float32 training step at their shapes, as ``model``'s step computes them:
    name -> (function, FLOPs)."""
    kernels, shape = {}, (batch_size, 28, 28, 1)
    for index, layer in enumerate(model.layers_in_order()):
        out = tuple(layer.compute_output_shape(shape))
        if isinstance(layer, keras.layers.Conv2D):
            kernels.update(_conv_kernels(layer, shape, out, first=index == 0))
        elif isinstance(layer, keras.layers.Dense):
            lean = layer is model.dense1 and model.uses_lean_dense_gradient()
            kernels.update(_dense_kernels(layer, shape, out, first=index == 0, lean=lean))
        elif isinstance(layer, keras.layers.MaxPooling2D):
            kernels.update(_pool_kernels(layer, shape, out))
        shape = out
    kernels.update(_adam_kernel(model))
    return kernels


RESOLUTION = 20e-6  # seconds: a kernel faster than this is within the noise of a call's cost


def kernel_floor(batch_size: int = 50, rounds: int = 5) -> dict:
    """Every kernel of a training step timed alone (best of ``rounds``), with both cores,
    less the cost of calling a tf.function that does nothing (``call_ms``): ms and
    GFLOP/s each (None without FLOPs or within ``RESOLUTION`` of that cost), and their
    sum -- the step time the kernels themselves allow. Softmax, the loss, bias gradients
    and the metric are left out, so the floor is, if anything, too low."""
    nothing = tf.constant(0.0)
    call = best_seconds(tf.function(lambda: nothing + 0.0), rounds, per_window=20)
    rows = {}
    for name, (kernel, flops) in step_kernels(CNN(), batch_size).items():
        seconds = best_seconds(tf.function(kernel), rounds, per_window=20) - call
        seconds = max(seconds, 0.0)
        fast = seconds < RESOLUTION  # lost in the call's own cost: no speed to report
        rows[name] = {"ms": 1000 * seconds, "gflop_per_s": None if fast or not flops else flops / seconds / 1e9}
    return {"batch_size": batch_size, "call_ms": 1000 * call, "kernels": rows,
            "ms": sum(r["ms"] for r in rows.values())}
