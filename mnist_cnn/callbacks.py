"""The callbacks every training run gets, all writing through the run folder (``RunDir``).

- ``StopRequested``   -- first: raises Ctrl-C again at the end of the batch in which a
                          Ctrl-C/SIGTERM arrived whose exception Python dropped (``interrupts``);
- ``StopOnNaN``        -- raises ``TrainingDiverged`` at the first NaN/inf loss, before
                          anything of that batch is saved;
- ``WeightHistograms`` -- Keras' TensorBoard callback: per-epoch scalars (``train/epoch_*``,
                          ``validation/epoch_*``) and weight histograms (binned in NumPy),
                          steps = epoch numbers;
- ``StepScalars``      -- per-step ``train/batch_*`` scalars at the optimizer's step count,
                          so a resumed run continues its curves instead of restarting them;
- ``HParams``          -- the run's hyperparameters for TensorBoard's HParams table;
- ``EpochCommit``       -- last: everything a finished epoch leaves, in one sequence in code
                          order (``on_epoch_end``): ``history.json``; the checkpoints
                          ``resume-NN.keras`` (model + optimizer) and ``epoch-NN.keras``
                          (the model); ``best.keras`` when the monitored score improved;
                          the scored split's pictures in ``images/``; and, last, the commit
                          to ``resume.json`` -- so an epoch counts as finished (and a killed
                          run resumes after it) only once everything else for it was written.
                          It replaces Keras' ``BackupAndRestore``, which deletes its backup
                          when ``fit`` returns, before the run's final files exist.

Every file is written atomically (``files.write_atomic``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.hparams import api as hparams_api
from tensorboard.util import tensor_util

from mnist_cnn import interrupts, pictures
from mnist_cnn.errors import TrainingDiverged
from mnist_cnn.evaluate import Scores, score
from mnist_cnn.events import SAMPLES_TAG, STEP_TAG_PREFIX
from mnist_cnn.files import write_atomic
from mnist_cnn.keras_file import inference_copy, model_bytes
from mnist_cnn.model import CNN, random_state
from mnist_cnn.rundir import RunDir

log = logging.getLogger(__name__)


class StopRequested(keras.callbacks.Callback):
    """``interrupts.check()`` after every training and validation batch: a signal whose
    ``KeyboardInterrupt`` a finalizer swallowed stops the run there, as Ctrl-C does."""

    def on_train_batch_end(self, batch, logs=None):
        interrupts.check()

    def on_test_batch_end(self, batch, logs=None):
        interrupts.check()


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """TerminateOnNaN that stops at once: Keras' own finishes the epoch's callbacks
    (checkpoints of NaN weights included); this raises before any of them run."""

    epoch = 0

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(f"the loss became {float(loss)} at epoch {self.epoch + 1}, batch {batch + 1}")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


def histogram_buckets(values, bucket_count: int = 30) -> np.ndarray:
    """(left edge, right edge, count) per bucket, as TensorBoard's ``histogram_pb`` bins ``values``
    (the same float64 arithmetic, so the same buckets), counted with ``np.bincount`` instead of its
    (size x buckets) one-hot matrix (30 bytes a weight)."""
    data = np.asarray(values).reshape(-1).astype(float)
    low, high = data.min(), data.max()
    if low == high:  # histogram_pb: every bucket's edges at the value, all counts in the last
        edges, counts = np.full(bucket_count + 1, low), np.zeros(bucket_count)
        counts[-1] = data.size
        return np.stack([edges[:-1], edges[1:], counts], axis=1)
    index = np.minimum(np.floor((data - low) / ((high - low) / bucket_count)).astype(int), bucket_count - 1)
    edges = np.linspace(low, high, bucket_count + 1)
    return np.stack([edges[:-1], edges[1:], np.bincount(index, minlength=bucket_count)], axis=1).astype(float)


class WeightHistograms(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback with its weight histograms binned in NumPy as TensorBoard's own
    ``histogram_pb`` bins them (``histogram_buckets``): the same tags and the same buckets (checked
    against both), without Keras' dozens of eager TensorFlow ops per weight (~1 CPU-s an epoch for the
    3.2M-weight dense kernel) or ``histogram_pb``'s one-hot matrix (~0.8)."""

    def _log_weights(self, epoch):  # Keras' hook, as in keras.callbacks.TensorBoard
        with self._train_writer.as_default():
            for layer in self.model.layers:
                for weight in layer.weights:
                    summary = summary_pb2.Summary()
                    summary.value.add(tag=f"{weight.path.replace(':', '_')}/histogram",
                                      metadata=histogram_metadata.create_summary_metadata(None, None),
                                      tensor=tensor_util.make_tensor_proto(
                                          histogram_buckets(keras.ops.convert_to_numpy(weight)), dtype=np.float64))
                    tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=epoch)
            self._train_writer.flush()


class StepScalars(keras.callbacks.Callback):
    """``batch_<metric>`` scalars after every training step, at step = optimizer.iterations.
    With several steps per call (``--steps-per-execution``), where Keras calls back once a call,
    the training step itself writes them, in the graph (``CNN.step_scalars``): still a point a step."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.log_dir = Path(log_dir)
        self.writer = None
        self.in_graph = False

    def on_train_begin(self, logs=None):
        self.writer = tf.summary.create_file_writer(str(self.log_dir / "train"))
        self.in_graph = self.model.steps_per_execution > 1 and isinstance(self.model, CNN)
        if self.in_graph:
            self.model.step_scalars = self.write
            self.model.make_train_function(force=True)  # traced again, with the writes (Keras calls it anew)

    def write(self, logs: dict, step) -> None:
        """In the training step: each of its ``logs`` at the optimizer's step count."""
        with self.writer.as_default():
            for name, value in logs.items():
                tf.summary.scalar(f"{STEP_TAG_PREFIX}{name}", value, step=step)

    def on_train_batch_end(self, batch, logs=None):
        if not self.in_graph:
            self.write(logs or {}, int(self.model.optimizer.iterations.numpy()))

    def on_train_end(self, logs=None):
        forget_step_scalars(self.model)
        self.writer.close()


def forget_step_scalars(model) -> None:
    """The training step without ``StepScalars``' writes (at the end of a fit, also an interrupted one)."""
    if isinstance(model, CNN) and model.step_scalars is not None:
        model.step_scalars = None
        model.train_function = None  # traced with the writes: traced again by the next fit


def write_split_pictures(writer, split: str, scores: Scores, step: int, shown: int = 25) -> None:
    """``<split>/misclassified`` (the first ``shown`` mistakes, titled ``#index: true as
    predicted``) and ``<split>/confusion_matrix`` pictures at ``step``."""
    labels, predicted = scores.labels, scores.predicted
    wrong = np.flatnonzero(predicted != labels)[:shown]
    titles = [f"#{i}: {labels[i]} as {predicted[i]}" for i in wrong]
    drawn = {"misclassified": pictures.digit_grid(scores.images[wrong], titles),
             "confusion_matrix": pictures.confusion_matrix(scores.confusion())}
    with writer.as_default():
        for name, picture in drawn.items():
            tf.summary.image(f"{split}/{name}", picture[None], step=step)
    writer.flush()


class EpochCommit(keras.callbacks.Callback):
    """Everything a finished epoch leaves in the run folder, in this order (one sequence,
    one object; it runs after the other callbacks):

    1. ``history.json`` gains the epoch's logs (across resumes: ``RunDir.rollback`` has
       removed what a killed process wrote past its last commit);
    2. ``checkpoints/resume-NN.keras`` (model + optimizer: what a resume loads) and
       ``checkpoints/epoch-NN.keras`` (the model alone);
    3. ``checkpoints/best.keras`` -- the epoch's model file again -- when ``monitor`` beat
       the best so far (``best`` carries a resumed run's record); replaced atomically
       (Keras' ModelCheckpoint overwrites in place: a kill mid-write destroyed the best);
    4. ``images/``: the scored split's misclassified digits and confusion matrix (and, at
       the start of a new run, ``train/samples``: the first training digits);
    5. the commit: ``resume.json`` records the epoch (epochs, optimizer steps, checkpoint)
       and older checkpoints beyond ``keep`` are pruned.
    """

    def __init__(self, run_dir: RunDir, split: str, dataset: tf.data.Dataset,
                 preview: tuple[np.ndarray, np.ndarray], keep: int = 1, monitor: str = "val_accuracy",
                 best: float | None = None, shown: int = 25):
        super().__init__()
        self.run_dir, self.split, self.dataset, self.preview = run_dir, split, dataset, preview
        self.keep, self.monitor, self.best, self.shown = keep, monitor, best, shown
        self.history: list[dict] = []
        self.writer, self.batches = None, None

    def on_train_begin(self, logs=None):
        self.history = self.run_dir.read_history()
        folder = self.run_dir.path / "images"
        first_time = not folder.exists()
        self.writer = tf.summary.create_file_writer(str(folder))
        if first_time:
            images, labels = self.preview
            picture = pictures.digit_grid(images[: self.shown], [f"label {y}" for y in labels[: self.shown]])
            with self.writer.as_default():
                tf.summary.image(SAMPLES_TAG, picture[None], step=0)

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.write_history(epoch, logs)
        user_model = inference_copy(self.model)  # the weights a user gets (the moving average with --ema)
        model_file = self.write_checkpoints(epoch, user_model)
        self.keep_if_best(logs, model_file)
        self.draw_pictures(epoch, user_model)
        self.run_dir.commit_epoch(epoch + 1, int(self.model.optimizer.iterations.numpy()), self.keep,
                                  random=random_state(self.model))

    def on_train_end(self, logs=None):
        self.writer.close()

    def write_history(self, epoch: int, logs: dict) -> None:
        self.history.append({"epoch": epoch, **logs})
        self.run_dir.write_history(self.history)

    def write_checkpoints(self, epoch: int, user_model) -> bytes:
        """Both checkpoints of the epoch; returns the model file's bytes."""
        self.run_dir.checkpoints.mkdir(exist_ok=True)
        resume = model_bytes(self.model, self.run_dir.resume_checkpoint(epoch + 1))
        model_file = model_bytes(user_model, self.run_dir.epoch_checkpoint(epoch + 1))
        write_atomic(self.run_dir.epoch_checkpoint(epoch + 1), model_file)
        write_atomic(self.run_dir.resume_checkpoint(epoch + 1), resume)
        return model_file

    def keep_if_best(self, logs: dict, model_file: bytes) -> None:
        value = logs.get(self.monitor)
        if value is not None and (self.best is None or value > self.best):
            write_atomic(self.run_dir.best_checkpoint, model_file)
            self.best = value

    def draw_pictures(self, epoch: int, user_model) -> None:
        if self.batches is None:  # read the split once, not every epoch
            self.batches = [(x.numpy(), y.numpy()) for x, y in self.dataset]
        write_split_pictures(self.writer, self.split, score(user_model, self.batches), epoch, self.shown)


class HParams(keras.callbacks.Callback):
    """Writes the run's hyperparameters once, so TensorBoard's HParams dashboard lists
    the run with its validation metrics next to other runs."""

    def __init__(self, run_dir: Path, hparams: dict):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.hparams = {k: ("none" if v is None else v) for k, v in hparams.items()}

    def on_train_begin(self, logs=None):
        if any(self.run_dir.glob("events.out.tfevents.*")):
            return  # a resumed run: its first process wrote them
        with tf.summary.create_file_writer(str(self.run_dir)).as_default():
            hparams_api.hparams(self.hparams, trial_id=self.run_dir.name)


class EpochLines(keras.callbacks.Callback):
    """One log line per epoch (``--progress epoch``, and the default when stdout is not a
    terminal): no progress bar, no terminal escape codes in a log file."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        scores = " - ".join(f"{name}: {value:.4f}" for name, value in sorted((logs or {}).items()))
        log.info("Epoch %d/%d - %.0fs - %s", epoch + 1, self.params["epochs"], time.perf_counter() - self.start, scores)


def write_session_end(run_dir: Path, status: str) -> None:
    """Close the run's HParams session: ``success``, ``failure`` (diverged, a storage
    fault) or ``interrupted`` -- otherwise TensorBoard lists every run as "unknown"."""
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import summary as hparams_summary

    code = {"success": api_pb2.STATUS_SUCCESS, "failure": api_pb2.STATUS_FAILURE,
            "interrupted": api_pb2.STATUS_FAILURE}[status]  # the hparams API has no 'aborted'; a resume rewrites it
    pb = hparams_summary.session_end_pb(code)
    try:
        with tf.summary.create_file_writer(str(run_dir)).as_default():
            tf.summary.experimental.write_raw_pb(pb.SerializeToString(), step=0)
    except (OSError, tf.errors.OpError):  # e.g. the disk that stopped the run is still full
        log.warning("could not record the HParams session end (%s) in %s", status, run_dir)


class GraphTrace(keras.callbacks.Callback):
    """The graph of one training step in ``train/``, for TensorBoard's Graphs tab (Keras
    writes none for subclassed models): traced while the first step compiles."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.log_dir, self.tracing, self.traced = Path(log_dir), False, False

    def on_train_batch_begin(self, batch, logs=None):
        if not self.traced:
            tf.summary.trace_on(graph=True, profiler=False)
            self.tracing = self.traced = True

    def on_train_batch_end(self, batch, logs=None):
        if self.tracing:
            with tf.summary.create_file_writer(str(self.log_dir / "train")).as_default():
                tf.summary.trace_export(name="train_step", step=0)
            self.tracing = False


def make_callbacks(
    run_dir: RunDir,
    epoch_lines: bool,
    split: str,
    validation: tf.data.Dataset,
    preview: tuple[np.ndarray, np.ndarray],
    hparams: dict,
    keep_checkpoints: int = 1,
    profile_batch=0,
) -> list[keras.callbacks.Callback]:
    """The callbacks of a run in ``run_dir`` (new or resumed), in the order they run."""
    history = run_dir.read_history()
    best_so_far = max((e["val_accuracy"] for e in history if "val_accuracy" in e), default=None)
    return [
        StopRequested(),
        *([EpochLines()] if epoch_lines else []),
        *([] if history else [GraphTrace(run_dir.path)]),  # once per run: by its first process
        StopOnNaN(),
        WeightHistograms(
            log_dir=str(run_dir.path), update_freq="epoch", histogram_freq=1, profile_batch=profile_batch
        ),
        StepScalars(run_dir.path),
        HParams(run_dir.path, hparams),
        EpochCommit(run_dir, split, validation, preview, keep=keep_checkpoints, best=best_so_far),
    ]
