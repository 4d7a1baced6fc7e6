"""Training: the config, ``fit(config)``, the run folder, and the command line.

    python scripts/fit.py --epochs 5 --batch-size 50 --learning-rate 1e-3

Each run gets its own folder ``<logdir>/<run-name or timestamp>/`` holding the
TensorBoard event files, ``checkpoints/best.keras``, the final ``model.keras``
and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from mnist_cnn import data
from mnist_cnn.callbacks import make_callbacks
from mnist_cnn.idx import DataError
from mnist_cnn.model import CNN

log = logging.getLogger(__name__)

JIT_CHOICES = {"auto": "auto", "on": True, "off": False}


class UsageError(ValueError):
    """A flag or config value that cannot be used; the message names the flag."""


@dataclass
class TrainConfig:
    """Every knob of a run. The defaults are the tutorial's numbers."""

    epochs: int = 5
    batch_size: int = 50
    learning_rate: float = 1e-3
    data: str = "auto"  # auto, tfds, sample, or a folder of IDX files
    tfds_dir: str | None = None  # tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)
    logdir: str = "logs"
    run_name: str | None = None  # default: a timestamp
    seed: int = 0
    steps_per_epoch: int | None = None  # None: one pass over the training set
    jit_compile: str = "auto"  # auto (XLA on GPU only), on, off

    def validate(self) -> TrainConfig:
        for flag, value in (
            ("epochs", self.epochs),
            ("batch-size", self.batch_size),
            ("learning-rate", self.learning_rate),
            ("steps-per-epoch", self.steps_per_epoch),
        ):
            if value is not None and not value > 0:
                raise UsageError(f"--{flag} must be positive, got {value}")
        if self.jit_compile not in JIT_CHOICES:
            raise UsageError(f"--jit-compile must be one of auto, on, off, got {self.jit_compile!r}")
        if self.run_name is not None and (not self.run_name or Path(self.run_name).name != self.run_name):
            raise UsageError(f"--run-name must be a plain folder name, got {self.run_name!r}")
        return self


@dataclass
class RunResult:
    run_dir: Path
    model_path: Path
    test_loss: float
    test_accuracy: float
    history: dict[str, list[float]]
    data: data.DataInfo
    seconds: float


# -- the steps of a run --------------------------------------------------------


def describe_devices() -> str:
    """'GPU: <names>' for the GPUs TensorFlow sees, or 'CPU only'."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU only"
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    return "GPU: " + ", ".join(names)


def make_run_dir(logdir: str, run_name: str | None) -> Path:
    """Create a new, empty run folder; never reuse an existing one.

    Without a name the folder is a timestamp, with -2, -3, ... appended when
    another run took that second (mkdir is atomic, so concurrent runs never share).
    """
    root = Path(logdir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if run_name:
            path = root / run_name
            try:
                path.mkdir()
            except FileExistsError:
                raise UsageError(
                    f"--run-name {run_name}: {path} already exists; choose another name"
                ) from None
            return path
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1, 10_000):
            path = root / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise UsageError(f"--logdir {logdir}: cannot create a run folder there ({e.strerror or e})") from None
    raise UsageError(f"--logdir {logdir}: no free run folder name for {stamp}")


def build_model(config: TrainConfig) -> CNN:
    model = CNN()
    model.build()
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=JIT_CHOICES[config.jit_compile],
    )
    return model


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def save_model_atomic(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.keras")  # save() wants .keras
    model.save(tmp)
    os.replace(tmp, path)


def fit(config: TrainConfig, verbose="auto") -> RunResult:
    """Train the CNN as ``config`` says; write the run folder; return the result."""
    config.validate()
    start = time.perf_counter()
    keras.utils.set_random_seed(config.seed)

    datasets = data.load(
        config.data,
        batch_size=config.batch_size,
        seed=config.seed,
        data_dir=config.tfds_dir,
        repeat=config.steps_per_epoch is not None,
    )
    run_dir = make_run_dir(config.logdir, config.run_name)
    log.info("Device: %s", describe_devices())
    log.info("Data: %s", datasets.info.describe())
    log.info("Run folder: %s", run_dir)

    model = build_model(config)
    history = model.fit(
        datasets.train,
        epochs=config.epochs,
        steps_per_epoch=config.steps_per_epoch,
        validation_data=datasets.test,
        shuffle=False,  # the pipeline shuffles, seeded
        callbacks=make_callbacks(run_dir),
        verbose=verbose,
    )
    scores = model.evaluate(datasets.test, return_dict=True, verbose=0)

    model_path = run_dir / "model.keras"
    save_model_atomic(model, model_path)
    result = RunResult(
        run_dir=run_dir,
        model_path=model_path,
        test_loss=float(scores["loss"]),
        test_accuracy=float(scores["accuracy"]),
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        data=datasets.info,
        seconds=time.perf_counter() - start,
    )
    write_json_atomic(
        run_dir / "metrics.json",
        {
            "test_loss": result.test_loss,
            "test_accuracy": result.test_accuracy,
            "epochs_run": len(history.epoch),
            "history": result.history,
            "seconds": round(result.seconds, 2),
            "config": dataclasses.asdict(config),
            "data": dataclasses.asdict(datasets.info),
            "device": describe_devices(),
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        },
    )
    return result


# -- command line ----------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def parse_args(argv=None) -> TrainConfig:
    defaults = TrainConfig()
    p = _Parser(prog="fit.py", description="Train the MNIST CNN and write a run folder under --logdir.")
    p.add_argument("--epochs", type=_positive(int), default=defaults.epochs)
    p.add_argument("--batch-size", type=_positive(int), default=defaults.batch_size)
    p.add_argument("--learning-rate", type=_positive(float), default=defaults.learning_rate)
    p.add_argument(
        "--data",
        default=defaults.data,
        metavar="{auto,tfds,sample,PATH}",
        help="auto: tfds if reachable, else the bundled 5k sample; PATH: a folder of MNIST IDX files",
    )
    p.add_argument("--tfds-dir", default=defaults.tfds_dir, help="TensorFlow Datasets data dir")
    p.add_argument("--logdir", default=defaults.logdir, help="parent folder of the run folders")
    p.add_argument("--run-name", default=defaults.run_name, help="run folder name (default: timestamp)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--steps-per-epoch", type=_positive(int), default=defaults.steps_per_epoch,
        help="train this many batches per epoch (default: one pass over the data)",
    )
    p.add_argument("--jit-compile", choices=list(JIT_CHOICES), default=defaults.jit_compile,
                   help="XLA compilation; auto = on with a GPU, off on CPU")
    p.add_argument("--dry-run", action="store_true", help="1 epoch of 2 steps: check that everything runs")
    args = vars(p.parse_args(argv))
    if args.pop("dry_run"):
        args.update(epochs=1, steps_per_epoch=2)
    return TrainConfig(**args)


def _setup_logging() -> None:
    """Package INFO lines on stdout, warnings and errors on stderr, unadorned."""
    logger = logging.getLogger("mnist_cnn")
    logger.setLevel(logging.INFO)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.handlers[:] = [out, err]
    logger.propagate = False


def main(argv=None) -> int:
    config = parse_args(argv)
    _setup_logging()
    try:
        result = fit(config)
    except (UsageError, DataError) as e:
        print(f"fit.py: error: {e}", file=sys.stderr)
        return 2
    print("test accuracy: %f" % result.test_accuracy)
    print(f"run folder: {result.run_dir}  ({result.seconds:.0f} s)")
    return 0
