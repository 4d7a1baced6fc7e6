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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from mnist_cnn import data
from mnist_cnn.callbacks import make_callbacks, read_history, write_atomic, write_json_atomic
from mnist_cnn.errors import InputError, ModelFileError, TrainingDiverged, UsageError
from mnist_cnn.model import CNN, load_cnn

log = logging.getLogger(__name__)

JIT_CHOICES = {"auto": "auto", "on": True, "off": False}
# Config fields that name the run rather than shape the training; --resume may set them.
RUN_IDENTITY = ("logdir", "run_name")


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
    init_from: str | None = None  # start from the weights of this .keras file

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


class Interrupted(Exception):
    """Ctrl-C during training; the run folder can be resumed."""

    def __init__(self, run_dir: Path):
        super().__init__(f"interrupted; resume with: python scripts/fit.py --resume {run_dir}")
        self.run_dir = run_dir


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


def init_weights(model: CNN, source: CNN, path: str) -> None:
    """Copy the weights of ``source`` (loaded from ``path``) into ``model``."""
    try:
        model.set_weights(source.get_weights())
    except ValueError:
        raise ModelFileError(f"{path}: a CNN of another size ({source.get_config()}); cannot start from it") from None


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run was started with (its ``config.json``)."""
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
        return TrainConfig(**saved)
    except FileNotFoundError:
        raise UsageError(f"--resume {run_dir}: not a run folder (no config.json)") from None
    except (ValueError, TypeError) as e:
        raise UsageError(f"--resume {run_dir}: unreadable config.json ({e})") from None


def backed_up_epochs(run_dir: Path) -> int:
    """How many epochs the run's backup holds (what BackupAndRestore will restore)."""
    try:
        return int(json.loads((run_dir / "backup" / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def open_run_dir(config: TrainConfig, resume: bool) -> tuple[Path, TrainConfig]:
    """The run folder: a new one (with config.json), or the existing one to resume."""
    if resume:
        run_dir = Path(config.logdir) / config.run_name
        if (run_dir / "metrics.json").exists():
            raise UsageError(f"--resume {run_dir}: this run already finished ({run_dir / 'metrics.json'})")
        log.info("Resuming %s after epoch %d of %d", run_dir, backed_up_epochs(run_dir), config.epochs)
        return run_dir, config
    run_dir = make_run_dir(config.logdir, config.run_name)
    config = dataclasses.replace(config, run_name=run_dir.name)
    write_json_atomic(run_dir / "config.json", dataclasses.asdict(config))
    return run_dir, config


def train_model(model: CNN, datasets: data.Datasets, config: TrainConfig, run_dir: Path, verbose) -> None:
    """model.fit with the run's callbacks; a resumed run restarts from its backup."""
    try:
        model.fit(
            datasets.train,
            epochs=config.epochs,
            steps_per_epoch=config.steps_per_epoch,
            validation_data=datasets.test,
            shuffle=False,  # the pipeline shuffles, seeded
            callbacks=make_callbacks(run_dir),
            verbose=verbose,
        )
    except KeyboardInterrupt:
        raise Interrupted(run_dir) from None
    except TrainingDiverged as e:
        kept = sorted((run_dir / "checkpoints").glob("epoch-*.keras"))
        where = f"the last good checkpoint is {kept[-1]}" if kept else "no epoch had finished, so no checkpoint"
        raise TrainingDiverged(f"{e}; {where}") from None


def finish_run(model: CNN, datasets: data.Datasets, config: TrainConfig, run_dir: Path, start: float) -> RunResult:
    """Evaluate on the test split; write model.keras and metrics.json (atomically)."""
    scores = model.evaluate(datasets.test, return_dict=True, verbose=0)
    model_path = run_dir / "model.keras"
    write_atomic(model_path, model.save)
    epochs = read_history(run_dir)
    result = RunResult(
        run_dir=run_dir,
        model_path=model_path,
        test_loss=float(scores["loss"]),
        test_accuracy=float(scores["accuracy"]),
        history={k: [e[k] for e in epochs] for k in epochs[-1] if k != "epoch"},
        data=datasets.info,
        seconds=time.perf_counter() - start,
    )
    write_json_atomic(
        run_dir / "metrics.json",
        {
            "test_loss": result.test_loss,
            "test_accuracy": result.test_accuracy,
            "epochs_run": len(epochs),
            "history": result.history,
            "seconds": round(result.seconds, 2),  # of this process (a resumed run: since the resume)
            "config": dataclasses.asdict(config),
            "data": dataclasses.asdict(datasets.info),
            "device": describe_devices(),
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        },
    )
    return result


def fit(config: TrainConfig, verbose="auto", resume: bool = False) -> RunResult:
    """Train the CNN as ``config`` says; write the run folder; return the result.

    ``resume``: continue the run ``<logdir>/<run_name>`` from its last finished
    epoch (its backup), appending to its logs. Ctrl-C leaves a resumable run.
    Everything that can be wrong with the input is checked before the run folder
    is created.
    """
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
    model = build_model(config)
    if config.init_from and not resume:
        init_weights(model, load_cnn(config.init_from), config.init_from)

    run_dir, config = open_run_dir(config, resume)
    log.info("Device: %s", describe_devices())
    log.info("Data: %s", datasets.info.describe())
    log.info("Run folder: %s", run_dir)
    train_model(model, datasets, config, run_dir, verbose)
    return finish_run(model, datasets, config, run_dir, start)


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


def build_parser(defaults: TrainConfig | None = None) -> argparse.ArgumentParser:
    defaults = defaults or TrainConfig()
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
    p.add_argument("--init-from", default=defaults.init_from, metavar="MODEL.keras",
                   help="start from the weights of a saved CNN")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue a killed or interrupted run (RUN_DIR, or --run-name in --logdir) "
                   "with its saved config")
    p.add_argument("--dry-run", action="store_true", help="1 epoch of 2 steps: check that everything runs")
    return p


def parse_args(argv=None) -> tuple[TrainConfig, bool]:
    """The config from the command line, and whether to resume.

    With --resume the config is the run's own (config.json); flags given explicitly
    must agree with it.
    """
    args = vars(build_parser().parse_args(argv))
    resume, dry_run = args.pop("resume"), args.pop("dry_run")
    if dry_run:
        if resume is not None:
            raise UsageError("--dry-run cannot be combined with --resume")
        args.update(epochs=1, steps_per_epoch=2)
    if resume is None:
        return TrainConfig(**args), False

    if resume == "":
        if not args["run_name"]:
            raise UsageError("--resume without RUN_DIR needs --run-name")
        run_dir = Path(args["logdir"]) / args["run_name"]
    else:
        run_dir = Path(resume)
    saved = load_run_config(run_dir)
    # Which flags were typed: parse again with every default suppressed.
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    typed = vars(quiet.parse_args(argv))
    for name in typed.keys() - {"resume", "dry_run", *RUN_IDENTITY}:
        if typed[name] != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} {typed[name]} conflicts with the resumed run's {name}={getattr(saved, name)!r}")
    return dataclasses.replace(saved, logdir=str(run_dir.parent), run_name=run_dir.name), True


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
    """The command line: 0 done, 1 training diverged, 2 bad input, 130 interrupted."""
    _setup_logging()
    try:
        config, resume = parse_args(argv)
        result = fit(config, resume=resume)
    except InputError as e:
        print(f"fit.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"\nfit.py: stopped: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\nfit.py: {e}", file=sys.stderr)
        return 130
    print("test accuracy: %f" % result.test_accuracy)
    print(f"run folder: {result.run_dir}  ({result.seconds:.0f} s)")
    return 0
