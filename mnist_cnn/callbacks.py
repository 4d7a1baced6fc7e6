"""The callbacks every training run gets, all writing through the run folder (``RunDir``).

- ``StopOnNaN``        -- raises ``TrainingDiverged`` at the first NaN/inf loss, before
                          anything of that batch is saved;
- ``TensorBoard``      -- per-epoch scalars (``train/epoch_*``, ``validation/epoch_*``)
                          and weight histograms, steps = epoch numbers;
- ``StepScalars``      -- per-step ``train/batch_*`` scalars at the optimizer's step count,
                          so a resumed run continues its curves instead of restarting them;
- ``EpochCheckpoint``  -- ``checkpoints/epoch-NN.keras`` (the model) and ``resume-NN.keras``
                          (model + optimizer) after every epoch;
- ``BestCheckpoint``   -- ``checkpoints/best.keras``, the best validation accuracy so far;
- ``HistoryFile``      -- ``history.json``, every finished epoch's logs, across resumes;
- ``EpochPictures``    -- ``images/``: sample training digits (once); per epoch the
                          validation split's misclassified digits and confusion matrix;
- ``HParams``          -- the run's hyperparameters for TensorBoard's HParams table;
- ``CommitEpoch``      -- ``resume.json``: runs last, so an epoch counts as finished (and a
                          killed run resumes after it) only once everything else for it
                          was written. It replaces Keras' ``BackupAndRestore``, which
                          deletes its backup when ``fit`` returns -- before the run's final
                          evaluation and files exist.

Every file is written atomically (``rundir.write_atomic``).
"""

from __future__ import annotations

import io
import logging
import math
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from mnist_cnn.errors import TrainingDiverged
from mnist_cnn.rundir import RunDir, model_bytes, without_training_state, write_atomic

log = logging.getLogger(__name__)


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


class StepScalars(keras.callbacks.Callback):
    """``batch_<metric>`` scalars after every training step, at step = optimizer.iterations."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.log_dir = Path(log_dir)
        self.writer = None

    def on_train_begin(self, logs=None):
        self.writer = tf.summary.create_file_writer(str(self.log_dir / "train"))

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        with self.writer.as_default():
            for name, value in (logs or {}).items():
                tf.summary.scalar(f"batch_{name}", value, step=step)

    def on_train_end(self, logs=None):
        self.writer.close()


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: ``checkpoints/resume-NN.keras`` (model + optimizer: what a resume
    loads) and ``checkpoints/epoch-NN.keras`` (the model alone), both written atomically
    from one serialisation. Old ones are pruned when the epoch is committed (``CommitEpoch``)."""

    def __init__(self, run_dir: RunDir):
        super().__init__()
        self.run_dir = run_dir
        self.model_file: bytes | None = None  # this epoch's model alone, for BestCheckpoint

    def on_epoch_end(self, epoch, logs=None):
        self.run_dir.checkpoints.mkdir(exist_ok=True)
        full = model_bytes(self.model, self.run_dir.resume_checkpoint(epoch + 1))
        self.model_file = without_training_state(full)
        write_atomic(self.run_dir.epoch_checkpoint(epoch + 1), self.model_file)
        write_atomic(self.run_dir.resume_checkpoint(epoch + 1), full)


class BestCheckpoint(keras.callbacks.Callback):
    """``checkpoints/best.keras``: the model of the epoch with the highest ``monitor``,
    replaced atomically (Keras' ModelCheckpoint overwrites it in place, so a kill
    during a rewrite destroyed the earlier best). ``best`` carries a resumed run's record;
    the bytes are the ones ``epoch`` (an EpochCheckpoint that ran before) just wrote."""

    def __init__(self, run_dir: RunDir, epoch: EpochCheckpoint, monitor: str = "val_accuracy",
                 best: float | None = None):
        super().__init__()
        self.run_dir, self.epoch, self.monitor, self.best = run_dir, epoch, monitor, best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or (self.best is not None and not float(value) > self.best):
            return
        write_atomic(self.run_dir.best_checkpoint, self.epoch.model_file)
        self.best = float(value)


class HistoryFile(keras.callbacks.Callback):
    """Keeps ``history.json``: one entry of logs per finished epoch, across resumes
    (``RunDir.rollback`` has removed what a killed process wrote past its last commit)."""

    def __init__(self, run_dir: RunDir):
        super().__init__()
        self.run_dir = run_dir
        self.entries: list[dict] = []

    def on_train_begin(self, logs=None):
        self.entries = self.run_dir.read_history()

    def on_epoch_end(self, epoch, logs=None):
        self.entries.append({"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}})
        self.run_dir.write_history(self.entries)


class CommitEpoch(keras.callbacks.Callback):
    """The last callback of an epoch: records it in ``resume.json`` (epochs, optimizer
    steps, checkpoint), which is what ``--resume`` starts from."""

    def __init__(self, run_dir: RunDir, keep: int):
        super().__init__()
        self.run_dir, self.keep = run_dir, keep

    def on_epoch_end(self, epoch, logs=None):
        steps = int(self.model.optimizer.iterations.numpy())
        self.run_dir.commit_epoch(epoch + 1, steps, self.keep)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported when first drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_to_image(figure) -> tf.Tensor:
    """A matplotlib figure as a [1, H, W, 4] uint8 tensor for tf.summary.image."""
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return tf.image.decode_png(buffer.getvalue(), channels=4)[None]


def digit_grid(images: np.ndarray, titles: list[str], columns: int = 5):
    """Digits in a grid, each under its title: one mosaic on one axes (a subplot per digit
    took half a second per picture)."""
    plt = _pyplot()
    rows = max(1, math.ceil(len(images) / columns))
    cell_w, cell_h, top = 32, 42, 12  # a 28x28 digit with a margin, and room for its title above
    mosaic = np.ones((rows * cell_h, columns * cell_w), np.float32) * 0.85  # light grey between digits
    figure, ax = plt.subplots(figsize=(columns * 1.3, rows * 1.5))
    for i, (image, title) in enumerate(zip(images, titles, strict=False)):
        y, x = (i // columns) * cell_h + top, (i % columns) * cell_w + 2
        mosaic[y : y + 28, x : x + 28] = image.reshape(28, 28)
        ax.text(x + 14, y - 2, title, ha="center", va="bottom", fontsize=8)
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    figure.tight_layout(pad=0.2)
    return figure


def confusion_figure(matrix: np.ndarray):
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(np.log1p(matrix), cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > matrix.max() / 2 else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit")
    figure.tight_layout()
    return figure


def write_split_pictures(writer, split: str, images: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                         step: int, shown: int = 25) -> None:
    """``<split>/misclassified`` (the first ``shown`` mistakes, titled ``#index: true as
    predicted``) and ``<split>/confusion_matrix`` pictures at ``step``."""
    wrong = np.flatnonzero(predicted != labels)[:shown]
    titles = [f"#{i}: {labels[i]} as {predicted[i]}" for i in wrong]
    matrix = tf.math.confusion_matrix(labels, predicted, num_classes=10).numpy()
    with writer.as_default():
        tf.summary.image(f"{split}/misclassified", figure_to_image(digit_grid(images[wrong], titles)), step=step)
        tf.summary.image(f"{split}/confusion_matrix", figure_to_image(confusion_figure(matrix)), step=step)
    writer.flush()


class EpochPictures(keras.callbacks.Callback):
    """TensorBoard pictures in ``<run>/images``.

    ``train/samples`` (once): the first training digits with their labels; after
    every epoch the misclassified digits and the confusion matrix of the split that
    scores epochs (``validation``, or ``test`` when there is no validation split).
    """

    def __init__(self, run_dir: Path, split: str, dataset: tf.data.Dataset,
                 preview: tuple[np.ndarray, np.ndarray], shown: int = 25):
        super().__init__()
        self.log_dir = Path(run_dir) / "images"
        self.split, self.dataset, self.preview, self.shown = split, dataset, preview, shown
        self.writer, self.batches = None, None

    def on_train_begin(self, logs=None):
        first_time = not self.log_dir.exists()
        self.writer = tf.summary.create_file_writer(str(self.log_dir))
        if first_time:
            images, labels = self.preview
            figure = digit_grid(images[: self.shown], [f"label {y}" for y in labels[: self.shown]])
            with self.writer.as_default():
                tf.summary.image("train/samples", figure_to_image(figure), step=0)

    def on_epoch_end(self, epoch, logs=None):
        if self.batches is None:  # read the split once, not every epoch
            self.batches = [(x.numpy(), y.numpy()) for x, y in self.dataset]
        predicted = np.concatenate([self.model(x, training=False).numpy().argmax(axis=1) for x, _ in self.batches])
        images = np.concatenate([x for x, _ in self.batches])
        labels = np.concatenate([y for _, y in self.batches])
        write_split_pictures(self.writer, self.split, images, labels, predicted, epoch, self.shown)

    def on_train_end(self, logs=None):
        self.writer.close()


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
        *([EpochLines()] if epoch_lines else []),
        *([] if history else [GraphTrace(run_dir.path)]),  # once per run: by its first process
        StopOnNaN(),
        keras.callbacks.TensorBoard(
            log_dir=str(run_dir.path), update_freq="epoch", histogram_freq=1, profile_batch=profile_batch
        ),
        StepScalars(run_dir.path),
        epoch_checkpoint := EpochCheckpoint(run_dir),
        BestCheckpoint(run_dir, epoch_checkpoint, best=best_so_far),
        HistoryFile(run_dir),
        EpochPictures(run_dir.path, split, validation, preview),
        HParams(run_dir.path, hparams),
        CommitEpoch(run_dir, keep_checkpoints),
    ]
