"""A speed lever's worker process (``levers.Worker`` starts one per lever, with the lever's
environment set before TensorFlow loads): builds the model and pipeline as fit() does, with
the lever's options, then times windows of training steps on request."""

from __future__ import annotations

import json
import os
import sys

import keras
import tensorflow as tf

from mnist_cnn import data, train
from mnist_cnn.bench import measure
from mnist_cnn.bench.levers import Lever, unavailable
from mnist_cnn.model import CNN


def build(lever: Lever):
    """The CNN built and compiled as ``train.build_model`` does it, with the lever's options."""
    spe = {} if lever.steps_per_execution is None else {"steps_per_execution": lever.steps_per_execution}
    config = train.TrainConfig(jit_compile="on" if lever.jit else "off", **spe)
    if not lever.channels_first:
        model = train.build_model(config, steps_per_epoch=1)
        model.lean_dense_gradient = lever.lean_dense_gradient
        return model
    # the same layers on NCHW tensors (the CNN itself is NHWC-only, so it is built first)
    layers = CNN().layers_in_order()
    keras.config.set_image_data_format("channels_first")
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Permute((3, 1, 2))] + [
        type(layer).from_config({**layer.get_config(), "data_format": "channels_first"})
        if "data_format" in layer.get_config() else type(layer).from_config(layer.get_config())
        for layer in layers] + [keras.layers.Softmax()])
    return train.compile_model(model, config, steps_per_epoch=1)


def dataset(lever: Lever, batch_size: int):
    if lever.pipeline == "fit":
        return data.endless("sample", batch_size)
    (images, labels), _ = data.sample_arrays()
    x, y = tf.constant(data.to_float(images)), tf.constant(labels.astype("int32"))
    if lever.pipeline == "fixed":
        return tf.data.Dataset.from_tensors((x[:batch_size], y[:batch_size])).repeat()
    ds = tf.data.Dataset.range(len(labels)).shuffle(len(labels), seed=0).batch(batch_size)
    gather = ds.map(lambda i: (tf.gather(x, i), tf.gather(y, i)), num_parallel_calls=tf.data.AUTOTUNE)
    return gather.repeat().prefetch(tf.data.AUTOTUNE)


def worker(lever: Lever, batch_size: int) -> None:
    """Build the model and pipeline, then answer each ``N`` read on stdin with the
    seconds of an N-step window (or say at once that this CPU cannot run the lever)."""
    reason = unavailable(lever)
    if reason:
        print("UNAVAILABLE", reason, flush=True)
        return
    if lever.intra_threads or lever.inter_threads:
        tf.config.threading.set_intra_op_parallelism_threads(lever.intra_threads)
        tf.config.threading.set_inter_op_parallelism_threads(lever.inter_threads)
    keras.utils.set_random_seed(0)
    model, pipeline = build(lever), dataset(lever, batch_size)
    window = measure.fit_window(model, pipeline)
    window(3 * model.steps_per_execution)  # tracing (and XLA compilation) outside the timing
    applied = {"intra_threads": tf.config.threading.get_intra_op_parallelism_threads(),
               "inter_threads": tf.config.threading.get_inter_op_parallelism_threads(),
               "steps_per_execution": model.steps_per_execution, "jit": bool(model.jit_compile),
               "lean_dense_gradient": isinstance(model, CNN) and model.uses_lean_dense_gradient(),
               "data_format": keras.config.image_data_format(),
               "env": {name: os.environ.get(name) for name in lever.env}}
    print("READY", json.dumps(applied), flush=True)
    for line in sys.stdin:
        steps = int(line)
        print(f"SECONDS_PER_STEP {window(steps) / steps}", flush=True)


def main(spec: dict, batch_size: str) -> None:
    """The worker process's entry (see ``Worker``)."""
    worker(Lever(**spec), int(batch_size))


