"""dense1's input gradient computed the faster way round, for the CNN's training step.

TensorFlow's gradient of ``x @ w`` for ``x`` is ``g w^T``: ``matmul(g, w, transpose_b=True)``, which
for dense1 at batch 50 ([50, 1024] by the transposed [3136, 1024] kernel) oneDNN's AVX-512 kernels
run in 2.79 ms and Eigen in 4.47, against 1.44 and 1.27 for the same products as ``(w g^T)^T``
(``input_gradient``). Capped at AVX2, oneDNN is faster TensorFlow's way (1.52 against 1.74 ms), and in
bfloat16 neither way wins: ``applies`` chooses (docs/performance.md, "Where the rest of a step goes").
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf

from mnist_cnn import cpu


def input_gradient(g, w):
    """``g w^T`` as ``(w g^T)^T``: the gradient of ``x @ w`` for ``x``."""
    return tf.transpose(tf.matmul(w, g, transpose_b=True))


@tf.custom_gradient
def matmul_lean_gradient(x, w):
    """``x @ w`` whose gradient for ``x`` is ``input_gradient``; for ``w`` TensorFlow's own."""

    def gradient(g):
        return input_gradient(g, w), tf.matmul(x, g, transpose_a=True)

    return tf.matmul(x, w), gradient


def dense_call(layer: keras.layers.Dense, x):
    """``layer(x)`` written out as Keras' ``Dense.call`` computes it, around ``matmul_lean_gradient``."""
    y = matmul_lean_gradient(x, tf.convert_to_tensor(layer.kernel))
    if layer.bias is not None:
        y = keras.ops.add(y, layer.bias)
    return layer.activation(y) if layer.activation is not None else y


def applies(layer: keras.layers.Dense, choice: bool | None) -> bool:
    """Whether ``dense_call`` is the layer's training forward pass: as ``choice`` says, or (None) in
    float32 on a CPU where ``cpu.slow_transposed_matmul``; never for a layer with LoRA or quantized
    weights (Keras' own ``Dense.call`` then) or off the TensorFlow backend."""
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return False
    if keras.backend.backend() != "tensorflow" or layer.compute_dtype != "float32":
        return False
    if choice is not None:
        return choice
    return _faster_here()


@functools.cache
def _faster_here() -> bool:
    """Once a process (it asks for every eager training call): no GPU, and a CPU whose kernels run
    TensorFlow's way slower -- the CPU and oneDNN's switches as TensorFlow read them at its start."""
    return not tf.config.list_logical_devices("GPU") and cpu.slow_transposed_matmul()
