"""The speed levers of a float32 training step, each measured against fit()'s own
setting in one run (``python scripts/bench.py --levers``).

Some levers only take effect when TensorFlow starts (oneDNN, thread pools, XLA
flags), so every lever trains in its own worker process; the workers stay alive and
take turns, one timed window each per round (as bench.py's contenders do), so the
drift of a shared machine hits all of them alike. A window runs from the end of its
first step to the end of its last; the figure is the median over rounds and the
ratio is the default's time per step over the lever's (> 1: the lever is faster).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from mnist_cnn import cpu, quiet


@dataclass(frozen=True)
class Lever:
    name: str
    env: dict = field(default_factory=dict)  # set before TensorFlow starts
    intra_threads: int = 0  # tf.config.threading; 0 = TensorFlow's default (one per core)
    inter_threads: int = 0
    steps_per_execution: int = 1
    jit: bool = False
    pipeline: str = "fit"  # "fit": data.pipeline as fit() builds it
    channels_first: bool = False


LEVERS = (
    Lever("default (as fit() trains)"),
    Lever("oneDNN on (TF_ENABLE_ONEDNN_OPTS=1)", env={"TF_ENABLE_ONEDNN_OPTS": "1"}),
    Lever("oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)", env={"TF_ENABLE_ONEDNN_OPTS": "0"}),
    Lever("threads: intra-op 2, inter-op 1", intra_threads=2, inter_threads=1),
    Lever("threads: intra-op 1, inter-op 2", intra_threads=1, inter_threads=2),
    Lever("steps_per_execution 10", steps_per_execution=10),
    Lever("pipeline: parallel gather, then prefetch", pipeline="parallel"),
    Lever("pipeline: one fixed batch (no input work)", pipeline="fixed"),
    Lever("data layout: channels_first", channels_first=True),
    Lever("XLA", jit=True),
    Lever("XLA + fast math", jit=True, env={"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}),
    Lever("XLA + oneDNN", jit=True, env={"XLA_FLAGS": "--xla_cpu_use_onednn=true"}),
    Lever("XLA + 512-bit vectors", jit=True, env={"XLA_FLAGS": "--xla_cpu_prefer_vector_width=512"}),
)


# -- the worker (a child process per lever) ----------------------------------------------------


def _model(lever: Lever):
    """The CNN built and compiled as ``train.build_model`` does it, with the lever's options."""
    import keras

    from mnist_cnn import train
    from mnist_cnn.model import CNN

    config = train.TrainConfig(jit_compile="on" if lever.jit else "off", steps_per_execution=lever.steps_per_execution)
    if not lever.channels_first:
        return train.build_model(config, steps_per_epoch=1)
    # the same layers on NCHW tensors (the CNN itself is NHWC-only, so it is built first)
    layers = CNN().layers_in_order()
    keras.config.set_image_data_format("channels_first")
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Permute((3, 1, 2))] + [
        type(layer).from_config({**layer.get_config(), "data_format": "channels_first"})
        if "data_format" in layer.get_config() else type(layer).from_config(layer.get_config())
        for layer in layers] + [keras.layers.Softmax()])
    return train.compile_model(model, config, steps_per_epoch=1)


def _dataset(lever: Lever, batch_size: int):
    import tensorflow as tf

    from mnist_cnn import data

    if lever.pipeline == "fit":
        return data.load("sample", batch_size=batch_size, seed=0, repeat=True).train
    (images, labels), _ = data.sample_arrays()
    x, y = tf.constant(data.to_float(images)), tf.constant(labels.astype("int32"))
    if lever.pipeline == "fixed":
        return tf.data.Dataset.from_tensors((x[:batch_size], y[:batch_size])).repeat()
    ds = tf.data.Dataset.range(len(labels)).shuffle(len(labels), seed=0).batch(batch_size)
    gather = ds.map(lambda i: (tf.gather(x, i), tf.gather(y, i)), num_parallel_calls=tf.data.AUTOTUNE)
    return gather.repeat().prefetch(tf.data.AUTOTUNE)


def unavailable(lever: Lever, environ=None) -> str | None:
    """Why this CPU cannot run ``lever`` (None if it can)."""
    if lever.channels_first and not cpu.onednn_enabled({**(os.environ if environ is None else environ), **lever.env}):
        return "TensorFlow's CPU convolutions take NCHW only with oneDNN on"
    return None


def worker(lever: Lever, batch_size: int) -> None:
    """Build the model and pipeline, then answer each ``N`` read on stdin with the
    seconds of an N-step window (or say at once that this CPU cannot run the lever)."""
    reason = unavailable(lever)
    if reason:
        print("UNAVAILABLE", reason, flush=True)
        return
    import keras
    import tensorflow as tf

    if lever.intra_threads or lever.inter_threads:
        tf.config.threading.set_intra_op_parallelism_threads(lever.intra_threads)
        tf.config.threading.set_inter_op_parallelism_threads(lever.inter_threads)
    keras.utils.set_random_seed(0)
    model, dataset = _model(lever), _dataset(lever, batch_size)
    k = lever.steps_per_execution

    class Clock(keras.callbacks.Callback):  # called after each call: every k steps or fewer
        def on_train_batch_end(self, batch, logs=None):
            marks.append((time.perf_counter(), int(self.model.optimizer.iterations)))

    def window(n: int) -> float:
        marks.clear()
        model.fit(dataset, epochs=1, steps_per_epoch=n + k, verbose=0, callbacks=[Clock()], shuffle=False)
        (start, first), (end, last) = marks[0], marks[-1]
        return (end - start) / (last - first)

    marks: list[tuple[float, int]] = []
    window(3 * k)  # tracing (and XLA compilation) outside the timing
    applied = {"intra_threads": tf.config.threading.get_intra_op_parallelism_threads(),
               "inter_threads": tf.config.threading.get_inter_op_parallelism_threads(),
               "steps_per_execution": model.steps_per_execution, "jit": bool(model.jit_compile),
               "data_format": keras.config.image_data_format(),
               "env": {name: os.environ.get(name) for name in lever.env}}
    print("READY", json.dumps(applied), flush=True)
    for line in sys.stdin:
        print(f"SECONDS_PER_STEP {window(int(line))}", flush=True)


def main(spec: dict, batch_size: str) -> None:
    """The worker process's entry (see ``Worker``)."""
    worker(Lever(**spec), int(batch_size))


# -- the conductor --------------------------------------------------------------------------


class Worker:
    def __init__(self, lever: Lever, batch_size: int, stderr):
        env = {**os.environ, **lever.env, "PYTHONUNBUFFERED": "1"}
        code = "import sys, json; from mnist_cnn import levers; levers.main(json.loads(sys.argv[1]), sys.argv[2])"
        spec = json.dumps(dataclasses.asdict(lever))
        self.lever, self.stderr = lever, stderr
        self.proc = subprocess.Popen([sys.executable, "-c", code, spec, str(batch_size)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        first = self._expect("READY", "UNAVAILABLE")
        self.unavailable = first.split(" ", 1)[1].strip() if first.startswith("UNAVAILABLE") else None
        self.applied = None if self.unavailable else json.loads(first.split(" ", 1)[1])  # what the worker runs with

    def _expect(self, *words: str) -> str:
        line = self.proc.stdout.readline()
        if not line.startswith(words):
            self.stderr.seek(0)
            said = [ln for ln in self.stderr.read().splitlines() if ln.strip() and not quiet.is_known(ln)]
            raise RuntimeError(f"lever {self.lever.name!r}: the worker failed: {' | '.join(said[-3:])}")
        return line

    def window(self, steps: int) -> float | None:
        if self.unavailable:
            return None
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return float(self._expect("SECONDS_PER_STEP").split()[1])

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(rounds: int, steps: int, log, batch_size: int = 50, levers=LEVERS) -> dict:
    """ms per step of every lever, its ratio to the default and its spread over rounds.
    The workers are started one after another (each warms up alone) and then take turns."""
    workers = []
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [w.close() for w in workers])
        for lever in levers:
            workers.append(Worker(lever, batch_size, stack.enter_context(tempfile.TemporaryFile("w+"))))
        seconds = {w.lever.name: [] for w in workers}
        for r in range(rounds):
            for w in workers:
                seconds[w.lever.name].append(w.window(steps))
            log(f"  levers: round {r + 1}/{rounds} done")
    baseline = statistics.median(seconds[levers[0].name])
    rows = {}
    for w in workers:
        s = seconds[w.lever.name]
        if w.unavailable:
            rows[w.lever.name] = {"unavailable": w.unavailable}
            continue
        rows[w.lever.name] = {"ms_per_step": 1000 * statistics.median(s), "vs_default": baseline / statistics.median(s),
                              "spread_pct": 100 * (max(s) - min(s)) / statistics.median(s), "applied": w.applied}
    return rows


def lines(rows: dict, batch_size: int = 50, default_onednn: bool | None = None) -> list[str]:
    """The levers for bench.py's report; ``default_onednn``: whether the default runs oneDNN."""
    state = "" if default_onednn is None else f"; the default runs with oneDNN {'on' if default_onednn else 'off'}"
    out = [f"speed levers, batch {batch_size}, float32 (each in its own process, taking turns{state}):",
           f"  {'lever':<44} {'ms/step':>8} {'vs default':>10} {'spread':>7}"]
    for name, row in rows.items():
        if "unavailable" in row:
            out.append(f"  {name:<44} {'-':>8} {'-':>10} {'':>7}  not on this CPU: {row['unavailable']}")
            continue
        out.append(f"  {name:<44} {row['ms_per_step']:8.1f} {row['vs_default']:9.2f}x {row['spread_pct']:6.0f}%")
    return out
