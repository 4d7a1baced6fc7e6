"""Where training runs: one device, all local GPUs, or several machines (tf.distribute).

``--strategy``:
- ``auto``        -- MirroredStrategy when more than one GPU is visible, else the default;
- ``one``         -- OneDeviceStrategy on the first GPU, or the CPU;
- ``mirrored``    -- MirroredStrategy over the visible GPUs (or, without GPUs, the logical CPUs);
- ``multiworker`` -- MultiWorkerMirroredStrategy configured from ``TF_CONFIG``.

``--batch-size`` is per replica; each step consumes ``batch_size x replicas`` images.
With several workers only the chief writes the run folder; the others train
into a temporary folder that is deleted at the end (see ``worker_run_dir``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

from mnist_cnn.config import STRATEGIES
from mnist_cnn.errors import UsageError
from mnist_cnn.rundir import RunDir


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy for ``--strategy name``. Create it before any other TensorFlow work:
    MultiWorkerMirroredStrategy must be set up at program start."""
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise UsageError("--strategy multiworker needs the TF_CONFIG environment variable (see docs/scaling.md)")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError as e:
            raise UsageError(f"TF_CONFIG is not valid JSON ({e})") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "one":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run folder: always, except for the non-chief
    workers of a multi-worker cluster (the chief is task "chief", or worker 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def worker_run_dir(chief_run_dir: Path) -> Path:
    """A non-chief worker's scratch run folder, seeded with the chief's resume state.

    Every worker runs the same callbacks (saving creates variables, and under
    MultiWorkerMirroredStrategy that is a collective operation all workers must
    join), but only the chief's files are kept. To resume, each worker starts from
    a copy of the chief's resume state and checkpoint (the run folder must be on a
    shared filesystem).
    """
    scratch, chief = RunDir(tempfile.mkdtemp(prefix="mnist_cnn-worker-")), RunDir(chief_run_dir)
    state = chief.read_resume_state()
    if state:
        (scratch.path / state.checkpoint).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(chief.path / state.checkpoint, scratch.path / state.checkpoint)
        for kept in ("resume_file", "config", "history"):  # what the resume state is checked against
            shutil.copy2(getattr(chief, kept), getattr(scratch, kept))
    return scratch.path


def check_steps_per_execution(strategy: tf.distribute.Strategy, steps_per_execution: int) -> None:
    """Keras 3 cannot run several steps per call under the mirrored strategies: its multi-step loop fails
    at the first call ("You must feed a value for placeholder tensor", keras-team/keras#19246; Keras
    3.15 here). Refused before anything is written, with what to type instead."""
    mirrored = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    if steps_per_execution > 1 and isinstance(strategy, mirrored):
        raise UsageError(f"--steps-per-execution {steps_per_execution} does not run under {describe(strategy)}: "
                         "Keras 3 fails at the first step (keras-team/keras#19246); use --steps-per-execution 1")


def describe(strategy: tf.distribute.Strategy) -> str:
    replicas = strategy.num_replicas_in_sync
    name = type(strategy).__name__.lstrip("_").replace("DefaultDistributionStrategy", "default (one device)")
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        name = "MultiWorkerMirroredStrategy"  # TF's class is CollectiveAllReduceStrategy
    resolver = getattr(strategy, "cluster_resolver", None)
    where = f", task {resolver.task_type} {resolver.task_id}" if resolver is not None and resolver.task_type else ""
    return f"{name}, {replicas} replica{'s' if replicas != 1 else ''}{where}"


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """In-memory sources have no files to shard by: split by elements explicitly."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def prepare_model(model, strategy: tf.distribute.Strategy) -> None:
    """Let Keras 3's fit run under MultiWorkerMirroredStrategy: the package's one use of a
    private Keras attribute, because Keras leaves no public way.

    keras-team/keras#20585: a model created under a strategy remembers it
    (``model._distribute_strategy``), and ``fit`` then reduces the first data batch across
    workers to build it (``_maybe_symbolic_build``); under MultiWorkerMirroredStrategy that
    fails: ``ValueError: Attempt to convert a value (PerReplica:{...})``. Seen with Keras
    3.6.0 + TensorFlow 2.16.1 (the floors) and Keras 3.15.1 + TensorFlow 2.21.0.
    Our model is built before fit, so the step is not needed: forget the captured strategy,
    and run fit/evaluate inside ``strategy.scope()``, where Keras picks the strategy up
    again for every step. ``tests/test_distribute.py::test_keras_20585_still_needs_the_workaround``
    fails once a Keras no longer needs this: then delete this function.
    """
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        model._distribute_strategy = None
