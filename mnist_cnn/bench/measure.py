"""Speed and accuracy, measured as ratios in one run (``mnist-cnn-bench``, ``python scripts/bench.py``).

Training throughput: the contenders take turns (round-robin, one timed window each
per round) so that drift of a shared machine hits all of them alike; each window's
time runs from the end of its first step to the end of its last, so one-off costs
(tracing, iterator start) stay out; the figure is the median over rounds.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from mnist_cnn import as_command, console, cpu, data, idx, train, tutorial
from mnist_cnn.bench import levers, torch_peer
from mnist_cnn.bench.profile import (
    ProfileUnavailable,
    ceilings,
    contender_precision,
    kernel_floor,
    layer_flops,
    op_class_profile,
)
from mnist_cnn.config import NOT_PASSED_ON
from mnist_cnn.model import CNN
from mnist_cnn.optimizers import FusedAdam

# a full-size IDX set for the pipeline and one-epoch rows: Debian's dataset-fashion-mnist, or FASHION_MNIST_DIR
FASHION_MNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


# -- what the model costs ----------------------------------------------------------------


def forward_flops(model: CNN) -> int:
    """Multiply-adds x 2 of one image's forward pass, from the layer shapes."""
    flops, shape = 0, (1, 28, 28, 1)
    for layer in model.layers_in_order():
        out = layer.compute_output_shape(shape)
        flops += layer_flops(layer, shape, out)
        shape = out
    return flops


# -- timing --------------------------------------------------------------------------------


class StepClock(keras.callbacks.Callback):
    """perf_counter() at the end of every call into TensorFlow (every ``steps_per_execution`` steps,
    or fewer at an epoch's end); the optimizer's step count read only when training starts and ends,
    so that the timed steps carry no extra read."""

    def __init__(self):
        super().__init__()
        self.times = []
        self.first_step = self.last_step = 0

    def on_train_begin(self, logs=None):
        self.first_step = int(self.model.optimizer.iterations)

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())

    def on_train_end(self, logs=None):
        self.last_step = int(self.model.optimizer.iterations)

    def seconds_per_step(self) -> float:
        """From the end of the first call to the end of the last (the first holds the wait for the
        first batch)."""
        steps = self.last_step - self.first_step
        return (self.times[-1] - self.times[0]) / (steps - min(self.model.steps_per_execution, steps))


def loop_window(step: Callable, loader: tutorial.MNISTLoader, batch_size: int) -> Callable[[int], float]:
    """A window of the tutorial loop: get_batch + step, ``n`` steps; returns seconds."""

    def run(n: int) -> float:
        marks = []
        for _ in range(n + 1):
            x, y = loader.get_batch(batch_size)
            loss, _ = step(tf.convert_to_tensor(x), tf.convert_to_tensor(y))
            float(loss)  # wait for the step, as the tutorial's print did
            marks.append(time.perf_counter())
        return marks[-1] - marks[0]

    return run


def fit_window(model: CNN, dataset: tf.data.Dataset) -> Callable[[int], float]:
    """A window of model.fit on a tf.data pipeline, ``n`` steps (after a first call that is not
    timed), at the model's steps per execution; returns seconds."""

    def run(n: int) -> float:
        clock = StepClock()
        model.fit(dataset, epochs=1, steps_per_epoch=n + model.steps_per_execution, verbose=0, callbacks=[clock],
                  shuffle=False)
        return n * clock.seconds_per_step()

    return run


def compiled_cnn(jit_compile=False, mixed_precision=False, learning_rate=1e-3, optimizer="FusedAdam") -> CNN:
    """The CNN compiled as fit() compiles it (FusedAdam), or with Keras' own Adam."""
    config = train.TrainConfig(learning_rate=learning_rate, jit_compile={True: "on", False: "off"}[jit_compile],
                               mixed_precision=mixed_precision)
    if optimizer == "FusedAdam":
        return train.build_model(config, steps_per_epoch=1)
    model = CNN(dtype=train.precision_policy(mixed_precision))
    return train.compile_model(model, config, steps_per_epoch=1, optimizer=keras.optimizers.Adam)


def loop_model(optimizer: str) -> CNN:
    """The tutorial loop's model: the notebook's Keras Adam, or FusedAdam as fit() uses."""
    model = tutorial.tutorial_model()
    if optimizer == "FusedAdam":
        model.compile(optimizer=FusedAdam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy())
    return model


NOTEBOOK = "notebook's eager loop"  # the baseline: the seed's loop as the notebook wrote it (Keras' Adam)
# (contender, optimizer): each way of training is timed with the optimizer it is compared with;
# fit()'s own step is model.fit with FusedAdam (bench_report.FIT_ROW)
CONTENDERS = ((NOTEBOOK, "Adam"), ("tutorial loop, tf.function", "Adam"), ("model.fit", "Adam"),
              ("tutorial loop, tf.function", "FusedAdam"), ("model.fit", "FusedAdam"),
              ("model.fit, XLA", "FusedAdam"), ("model.fit, mixed precision", "FusedAdam"))


def row_key(contender: str, optimizer: str) -> str:
    return f"{contender} [{optimizer}]"


def _window(contender: str, optimizer: str, loader, pipeline, batch_size: int) -> Callable[[int], float]:
    if contender.startswith("tutorial loop") or contender == NOTEBOOK:
        step = loop_model(optimizer).gradient_step
        return loop_window(step if contender == NOTEBOOK else tf.function(step), loader, batch_size)
    model = compiled_cnn(jit_compile="XLA" in contender, mixed_precision="mixed" in contender, optimizer=optimizer)
    return fit_window(model, pipeline)


def training_throughput(batch_size: int, rounds: int, window: int, log, contenders=CONTENDERS,
                        with_torch: bool = False) -> dict:
    """images/s and ms/step of the training contenders at one batch size, each against the
    notebook's eager loop (the first contender); ``with_torch``: and the PyTorch peer's."""
    keras.utils.set_random_seed(0)
    loader = tutorial.MNISTLoader("sample", seed=0)
    pipeline = data.endless("sample", batch_size)
    runs = {row_key(*c): _window(*c, loader, pipeline, batch_size) for c in contenders}
    for run in runs.values():  # warm-up: tracing, XLA compilation, cache fill
        run(3)
    seconds = {key: [] for key in runs}
    for r in range(rounds):
        for key, run in runs.items():
            seconds[key].append(run(window) / window)
        log(f"  batch {batch_size}: round {r + 1}/{rounds} done")
    if with_torch:  # in a process of its own, after the others (see torch_peer)
        (images, labels), _, _ = data.load_arrays("sample", with_test=False)
        contenders = (*contenders, (torch_peer.CONTENDER, torch_peer.OPTIMIZER))
        seconds[row_key(*contenders[-1])] = torch_peer.measure(images, labels, batch_size, rounds, window)
        log(f"  batch {batch_size}: the PyTorch peer done")
    flops = 3 * forward_flops(CNN()) * batch_size  # training step = forward + backward (~2x forward)
    baseline = statistics.median(seconds[row_key(*contenders[0])])
    results = {}
    for (contender, optimizer), (key, per_step) in zip(contenders, seconds.items(), strict=True):
        median = statistics.median(per_step)
        results[key] = {
            "contender": contender,
            "optimizer": optimizer,
            "ms_per_step": 1000 * median,
            "images_per_s": batch_size / median,
            "vs_notebook": baseline / median,
            "gflop_per_s": flops / median / 1e9,
            "spread_pct": 100 * (max(per_step) - min(per_step)) / median,
        }
    return results


def evaluation_speed(rounds: int, official: Path | None, log) -> dict:
    """model.evaluate on a tf.data pipeline vs the tutorial's batch-wise predict, on the
    official test set (or Fashion-MNIST's, or the sample's) -- 10,000 images where there are."""
    folder = next((f for f in (official, FASHION_MNIST) if f and (f / "t10k-labels-idx1-ubyte.gz").exists()), None)
    x, y = idx.read_split(folder, "test") if folder else data.sample_arrays()[1]
    loader = tutorial.MNISTLoader("sample")  # the tutorial's evaluation reads loader.test_*
    loader.test_data, loader.test_label, loader.num_test_data = data.to_float(x), y.astype(np.int32), len(y)
    model = compiled_cnn()
    pipeline = data.pipeline(x, y, batch_size=data.EVAL_BATCH)  # as fit() evaluates
    model.evaluate(pipeline, verbose=0)  # warm-up and cache fill
    tutorial.evaluate_batchwise(model, loader)
    times = {"model.evaluate": [], "tutorial batch-wise predict": []}
    for _ in range(rounds):
        start = time.perf_counter()
        model.evaluate(pipeline, verbose=0)
        times["model.evaluate"].append(time.perf_counter() - start)
        start = time.perf_counter()
        tutorial.evaluate_batchwise(model, loader)
        times["tutorial batch-wise predict"].append(time.perf_counter() - start)
    log(f"  evaluation of {loader.num_test_data} images done")
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "images": loader.num_test_data,
        "source": str(folder or "sample"),
        "seconds": median,
        "speedup": median["tutorial batch-wise predict"] / median["model.evaluate"],
    }


def pipeline_overhead(steps: int, log) -> dict | None:
    """Training on the full-size IDX pipeline vs the same steps on one in-memory batch."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        log(f"  skipped: {FASHION_MNIST} not found (apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR)")
        return None
    start = time.perf_counter()
    (train_images, train_labels), (test_images, test_labels), _ = data.load_arrays(str(FASHION_MNIST))
    read_seconds = time.perf_counter() - start
    stream = data.training_stream(train_images, train_labels, 50)
    x, y = next(iter(data.pipeline(test_images[:50], test_labels[:50], 50)))
    in_memory = tf.data.Dataset.from_tensors((x, y)).repeat()  # one training-size batch
    model = compiled_cnn()
    results = {}
    fit_window(model, in_memory)(3)  # trace once, outside the timing
    for name, dataset in (("in-memory batch", in_memory), ("IDX pipeline, first epoch", stream)):
        clock = StepClock()
        begin = time.perf_counter()
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[clock], shuffle=False)
        results[name] = clock.times[-1] - begin  # includes the wait for the first batch
    log(f"  {steps} full-size steps done")
    return {
        "train_images": len(train_labels),
        "steps": steps,
        "read_idx_seconds": read_seconds,
        "seconds": results,
        "overhead_pct": 100 * (results["IDX pipeline, first epoch"] / results["in-memory batch"] - 1),
    }


FIRST_STEP_CHILD = """
import os, sys, time
t0 = float(sys.argv[1])
import keras
from mnist_cnn import train

class FirstStep(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        print("FIRST_STEP", time.time() - t0, flush=True)
        os._exit(0)

train.fit(train.TrainConfig(data="auto", logdir=sys.argv[2]), verbose=0, callbacks=[FirstStep()])
"""


def offline_start(log) -> dict:
    """Seconds from process start to the first finished training step with --data auto."""
    with tempfile.TemporaryDirectory() as logdir:
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", as_command(FIRST_STEP_CHILD), str(t0), logdir],
                              capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FIRST_STEP")), None)
    if line is None:
        raise RuntimeError(f"the offline-start child failed: {proc.stderr[-2000:]}")
    chose_sample = "using the 5,000-digit sample" in proc.stderr
    log("  offline start done")
    return {"seconds": float(line.split()[1]), "source": "sample (offline fallback)" if chose_sample else "tfds"}


def run_overhead(config: train.TrainConfig, log, label: str) -> dict:
    """A whole ``fit()`` run (data, model, every callback, checkpoints, the final test
    score and files) over its steps x the bare model.fit step time on the same training
    pipeline, measured in the same process right after it."""
    start = time.perf_counter()
    result = train.fit(config, verbose=0)
    whole = time.perf_counter() - start
    steps = result.history and len(result.history["loss"]) * (
        config.steps_per_epoch or math.ceil(result.data_info.num_train / config.batch_size))
    pipeline = data.endless(config.data, config.batch_size)
    window = fit_window(compiled_cnn(), pipeline)
    window(3)  # tracing
    bare = statistics.median(window(50) / 50 for _ in range(3))
    log(f"  run overhead ({label}) done")
    return {"label": label, "seconds": whole, "steps": steps, "bare_ms_per_step": 1000 * bare,
            "ratio": whole / (steps * bare)}


ACCURACY_RECIPES = ("tutorial", "fast", "best")


def accuracy(runs: int, official: Path | None, log, contenders: dict | None = None) -> dict:
    """Test accuracy and wall time of each recipe trained on the 5k sample, tested on
    ``official`` (an IDX folder with the official t10k files) when given; ``runs``
    rounds with seeds 0, 1, 2, ... (one seed gives one result: the spread is the seeds'),
    the recipes taking turns. ``contenders`` (name: fit options, a recipe's name among them)
    replaces the recipes (``--versus``). ``fast_vs_tutorial``: the ratio of median times."""
    test = str(official) if official else None
    contenders = contenders or {f"--recipe {recipe}": {"recipe": recipe} for recipe in ACCURACY_RECIPES}
    results = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as logdir:
        for round_ in range(runs):
            for recipe, options in contenders.items():
                options = {k: v for k, v in options.items() if k not in NOT_PASSED_ON}
                config = train.TrainConfig.from_recipe(options.pop("recipe", "tutorial"), **{
                    **options, "data": "sample", "test_data": test, "logdir": logdir, "keep_checkpoints": 0,
                    "seed": round_})
                start = time.perf_counter()
                result = train.fit(config, verbose=0)
                seconds = time.perf_counter() - start
                results[recipe].append({"test_accuracy": result.test_accuracy, "seconds": seconds,
                                        "epochs": config.epochs, "mixed_precision": config.mixed_precision,
                                        "train_images": result.data_info.num_train})
                log(f"  round {round_ + 1}: {recipe}: {result.test_accuracy:.4f} in {seconds:.0f} s")
    median = {recipe: statistics.median(r["seconds"] for r in rs) for recipe, rs in results.items()}
    ratio = {"fast_vs_tutorial": median["--recipe fast"] / median["--recipe tutorial"]} if {
        "--recipe fast", "--recipe tutorial"} <= median.keys() else {}
    return {"test_set": test or "sample's own 1,000 held-out digits", "recipes": results, **ratio}


def run_all(*, quick: bool, rounds: int | None, large_batch: int, official_test: Path | None,
            accuracy_runs: int | None, with_levers: bool, log: Callable[[str], None]) -> dict:
    """Everything ``mnist-cnn-bench`` measures, as one dict (``report.report`` prints it).
    ``accuracy_runs=None`` skips the recipes' accuracy; ``quick`` the minutes-long parts."""
    rounds = rounds or (3 if quick else 7)
    results = {
        "machine": {"cpus": os.cpu_count(), "gpus": len(tf.config.list_physical_devices("GPU")),
                    "cpu": cpu.describe_path(), "onednn": cpu.onednn_enabled(),
                    "onednn_tensorflow_default": cpu.onednn_default(),
                    "tensorflow": tf.__version__, "keras": keras.__version__},
        "forward_mflop": forward_flops(CNN()) / 1e6,
        "training": {},
    }
    log("matmul ceilings ...")
    results["peak"] = ceilings(log)
    log("training throughput ...")
    torch_absent = torch_peer.unavailable()
    if torch_absent:
        log(torch_absent)
        results["torch"] = torch_absent
    for batch, window in ((50, 8 if quick else 25), (large_batch, 2 if quick else 6)):
        results["training"][batch] = training_throughput(batch, rounds, window, log, with_torch=not torch_absent)
        for name, row in results["training"][batch].items():  # each against its own precision's ceiling
            row["peak_fraction"] = row["gflop_per_s"] / results["peak"][contender_precision(name, results["peak"])]
    log("evaluation ...")
    results["evaluation"] = evaluation_speed(rounds, official_test, log)
    if not quick:  # minutes each: the full bench only
        log("full-size pipeline ...")
        results["pipeline"] = pipeline_overhead(1200, log)
        log("op profile ...")
        try:
            results["op_profile"] = op_class_profile()
        except ProfileUnavailable as e:
            log(f"op profile: {e}")
        results["kernel_floor"] = kernel_floor(50, rounds=5)
    if with_levers:
        log("speed levers ...")
        results["levers"] = levers.measure(rounds, 10 if quick else 30, log)
    log("run overhead ...")
    with tempfile.TemporaryDirectory() as logdir, console.hidden():
        first = train.TrainConfig(data="sample", logdir=logdir, epochs=1 if quick else 5)
        overhead = [run_overhead(first, log, f"default sample run{', 1 epoch' if quick else ''}")]
        if (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists() and not quick:
            full = train.TrainConfig(data=str(FASHION_MNIST), epochs=1, logdir=logdir)
            overhead.append(run_overhead(full, log, "one full-size epoch (Fashion-MNIST IDX, 55,000 train)"))
    results["run_overhead"] = overhead
    log("offline start ...")
    results["offline_start"] = offline_start(log)
    if accuracy_runs:
        log(f"accuracy ({len(ACCURACY_RECIPES)} recipes x {accuracy_runs} rounds) ...")
        with console.hidden():
            results["accuracy"] = accuracy(accuracy_runs, official_test, log)
    return results
