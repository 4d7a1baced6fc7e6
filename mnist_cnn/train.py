"""Training: the config, ``fit(config)``, the run folder, and the command line.

    python scripts/fit.py --epochs 5 --batch-size 50 --learning-rate 1e-3

Each run gets its own folder ``<logdir>/<run-name or timestamp>/`` holding its
``config.json``, TensorBoard event files, ``history.json``, checkpoints, the final
``model.keras`` and ``metrics.json`` (see the README for the layout).

``fit(config)`` reads top to bottom: strategy, data, model, run folder, training,
final evaluation and files. ``main()`` is the command line around it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from mnist_cnn import data, distribute
from mnist_cnn.callbacks import make_callbacks
from mnist_cnn.errors import InputError, ModelFileError, StorageError, TrainingDiverged, UsageError
from mnist_cnn.export import check_export_dir, export_savedmodel
from mnist_cnn.model import CNN, load_cnn, load_weights_strict
from mnist_cnn.rundir import ResumeState, RunDir, check_name, write_json, write_model

log = logging.getLogger(__name__)

JIT_CHOICES = {"auto": "auto", "on": True, "off": False}
LR_SCHEDULES = ("constant", "cosine")
# Named presets: each sets defaults for the fields it names (explicit flags still win).
RECIPES = {
    "seed": {},  # the tutorial: 5 epochs, batch 50, Adam 1e-3, no augmentation, no dropout
    "best": {"epochs": 20, "augment": True, "lr_schedule": "cosine", "dropout": 0.5},
}
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
    test_data: str | None = None  # test split from this IDX folder (the sample then trains on all 5,000)
    augment: bool = False  # random rotation/shift/zoom of training batches
    lr_schedule: str = "constant"  # constant, or cosine decay to 0 over the run
    dropout: float = 0.0  # before the last dense layer; 0 = the tutorial's CNN
    mixed_precision: bool = False  # mixed_float16 on GPU, mixed_bfloat16 on CPU
    profile_batch: str | None = None  # "A,B": profile steps A to B into TensorBoard
    export: str | None = None  # also write a serving SavedModel into this new folder
    strategy: str = "auto"  # auto, one, mirrored, multiworker (batch_size is per replica)
    recipe: str = "seed"  # the preset the other fields started from

    def profile_range(self) -> tuple[int, int] | int:
        """--profile-batch as the TensorBoard callback takes it (0 = off)."""
        if self.profile_batch is None:
            return 0
        try:
            bounds = [int(part) for part in self.profile_batch.split(",")]
        except ValueError:
            bounds = []
        if len(bounds) not in (1, 2) or bounds[0] < 1 or bounds[-1] < bounds[0]:
            raise UsageError(f"--profile-batch must be A or A,B with 1 <= A <= B, got {self.profile_batch!r}")
        return (bounds[0], bounds[-1])

    @classmethod
    def from_recipe(cls, recipe: str = "seed", **overrides) -> TrainConfig:
        if recipe not in RECIPES:
            raise UsageError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        return cls(**{**RECIPES[recipe], **overrides, "recipe": recipe})

    def validate(self) -> TrainConfig:
        for flag, value in (
            ("epochs", self.epochs),
            ("batch-size", self.batch_size),
            ("learning-rate", self.learning_rate),
            ("steps-per-epoch", self.steps_per_epoch),
        ):
            if value is not None and not value > 0:
                raise UsageError(f"--{flag} must be positive, got {value}")
        if self.profile_batch is not None:
            self.profile_range()
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UsageError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.strategy not in distribute.STRATEGIES:
            raise UsageError(f"--strategy must be one of {', '.join(distribute.STRATEGIES)}, got {self.strategy!r}")
        if self.strategy == "multiworker" and not self.run_name:
            raise UsageError("--strategy multiworker needs --run-name, so that every worker names the same run")
        if self.strategy == "multiworker" and self.export:
            raise UsageError("--export is not available with --strategy multiworker; "
                             "run scripts/export.py on the chief's model.keras afterwards")
        if self.jit_compile not in JIT_CHOICES:
            raise UsageError(f"--jit-compile must be one of auto, on, off, got {self.jit_compile!r}")
        if self.run_name is not None and (not self.run_name or Path(self.run_name).name != self.run_name):
            raise UsageError(f"--run-name must be a plain folder name, got {self.run_name!r}")
        if self.run_name:
            check_name("--run-name", self.run_name)
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must be in 0..{2**32 - 1} (numpy's range), got {self.seed}")
        if not self.data:
            raise UsageError("--data must be auto, tfds, sample or a folder of IDX files, got ''")
        return self

    @classmethod
    def from_dict(cls, values: dict, where: str) -> TrainConfig:
        """A config from saved JSON, each value checked against its field's type."""
        if not isinstance(values, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = values.keys() - hints.keys()
        if unknown:
            raise UsageError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        for name, value in values.items():
            allowed = typing.get_args(hints[name]) or (hints[name],)
            ok = any(
                value is None if kind is type(None)
                else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
                else isinstance(value, kind) and not (kind is int and isinstance(value, bool))
                for kind in allowed
            )
            if not ok:
                expected = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
                raise UsageError(f"{where}: {name} must be {expected}, got {value!r}")
        config = cls(**values)
        return config.validate()


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


def precision_policy(mixed: bool) -> str:
    """float32, or the mixed policy this machine runs fast: float16 on GPUs, bfloat16 on CPUs."""
    if not mixed:
        return "float32"
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


def learning_rate(config: TrainConfig, steps_per_epoch: int):
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=config.epochs * steps_per_epoch)
    return config.learning_rate


def build_model(config: TrainConfig, steps_per_epoch: int) -> CNN:
    """The CNN compiled as the config says (Adam; loss and accuracy as in the tutorial).
    Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer, whose
    scale_loss CNN.gradient_step applies."""
    model = CNN(dropout=config.dropout, dtype=precision_policy(config.mixed_precision))
    model.build()
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(config, steps_per_epoch)),
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
    """The config a run was started with (its ``config.json``), type-checked."""
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--resume {run_dir}: not a run folder (no config.json)") from None
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise UsageError(f"--resume {run_dir}: unreadable config.json ({reason})") from None
    return TrainConfig.from_dict(saved, f"--resume {run_dir}: config.json")


def open_run_dir(config: TrainConfig, resume: bool) -> tuple[RunDir, TrainConfig, ResumeState | None]:
    """The run folder, locked: a new one (with config.json), or the existing one to
    resume, swept of a killed process's temporary files, with its resume state."""
    if not resume:
        run_dir = RunDir.create(config.logdir, config.run_name)
        config = dataclasses.replace(config, run_name=run_dir.path.name)
        try:
            write_json(run_dir.config, dataclasses.asdict(config))
        except StorageError as e:
            run_dir.unlock()
            shutil.rmtree(run_dir.path, ignore_errors=True)
            raise UsageError(str(e)) from None
        return run_dir, config, None
    run_dir = RunDir(Path(config.logdir) / config.run_name).lock()
    try:
        if run_dir.finished:
            raise UsageError(f"--resume {run_dir.path}: this run already finished ({run_dir.metrics})")
        run_dir.check_writable()
        run_dir.sweep()
        return run_dir, config, run_dir.read_resume_state()
    except BaseException:
        run_dir.unlock()
        raise


def restore(model: CNN, run_dir: RunDir, state: ResumeState) -> None:
    """Load the committed epoch's weights and optimizer state into ``model``."""
    model.optimizer.build(model.trainable_variables)
    path = run_dir.path / state.checkpoint
    load_weights_strict(model, path)
    steps = int(model.optimizer.iterations.numpy())
    if steps != state.steps:
        raise ModelFileError(
            f"{path}: holds the optimizer state of step {steps}, {run_dir.resume_file} says {state.steps}"
        )


def train_model(
    model: CNN,
    datasets: data.Datasets,
    config: TrainConfig,
    run_dir: RunDir,
    verbose,
    extra=(),
    initial_epoch: int = 0,
) -> None:
    """model.fit from ``initial_epoch`` with the run's callbacks (and ``extra`` ones)."""
    if initial_epoch >= config.epochs:
        return
    try:
        model.fit(
            datasets.train,
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=config.steps_per_epoch,
            validation_data=datasets.test,
            shuffle=False,  # the pipeline shuffles, seeded
            callbacks=[
                *make_callbacks(
                    run_dir,
                    test=datasets.test,
                    preview=datasets.preview,
                    hparams=dataclasses.asdict(config),
                    profile_batch=config.profile_range(),
                ),
                *extra,
            ],
            verbose=verbose,
        )
    except TrainingDiverged as e:
        kept = run_dir.read_resume_state()
        where = (f"the last good checkpoint is {run_dir.path / kept.checkpoint}" if kept
                 else "no epoch had finished, so no checkpoint")
        raise TrainingDiverged(f"{e}; {where}") from None


def finish_run(
    model: CNN, datasets: data.Datasets, config: TrainConfig, run_dir: RunDir, start: float, strategy: str = ""
) -> RunResult:
    """After the last epoch: evaluate on the test split, write model.keras, the export
    (if asked) and, last, metrics.json -- the mark of a finished run. Until then the
    resume state stays, so a run killed in here resumes at this step, not from scratch."""
    scores = model.evaluate(datasets.test, return_dict=True, verbose=0)
    write_model(run_dir.model, model)
    state = run_dir.read_resume_state()
    if config.export and not (state and state.exported):
        log.info("SavedModel for serving: %s", export_savedmodel(model, config.export))
        if state:
            run_dir.mark_exported(state)
    epochs = run_dir.read_history()
    result = RunResult(
        run_dir=run_dir.path,
        model_path=run_dir.model,
        test_loss=float(scores["loss"]),
        test_accuracy=float(scores["accuracy"]),
        history={k: [e[k] for e in epochs] for k in epochs[-1] if k != "epoch"},
        data=datasets.info,
        seconds=time.perf_counter() - start,
    )
    write_json(
        run_dir.metrics,
        {
            "test_loss": result.test_loss,
            "test_accuracy": result.test_accuracy,
            "epochs_run": len(epochs),
            "history": result.history,
            "seconds": round(result.seconds, 2),  # of this process (a resumed run: since the resume)
            "config": dataclasses.asdict(config),
            "data": dataclasses.asdict(datasets.info),
            "device": describe_devices(),
            "strategy": strategy,
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        },
    )
    run_dir.close_resume_state()
    return result


def fit(config: TrainConfig, verbose="auto", resume: bool = False, callbacks=()) -> RunResult:
    """Train the CNN as ``config`` says; write the run folder; return the result.

    ``resume``: continue the run ``<logdir>/<run_name>`` after its last finished
    epoch (``resume.json``), appending to its logs; a run whose epochs all finished
    is only evaluated and saved. Ctrl-C or a storage failure leaves a resumable run.
    ``callbacks`` are added to the run's own. Everything that can be wrong with the
    input is checked before the run folder is created.
    """
    config.validate()
    start = time.perf_counter()
    strategy = distribute.make_strategy(config.strategy)  # first: multi-worker setup precedes other TF work
    replicas = strategy.num_replicas_in_sync
    keras.utils.set_random_seed(config.seed)
    datasets = data.load(
        config.data,
        batch_size=config.batch_size * replicas,  # the global batch; the strategy splits it
        seed=config.seed,
        data_dir=config.tfds_dir,
        repeat=config.steps_per_epoch is not None,
        augment=config.augment,
        test_source=config.test_data,
    )
    datasets.train, datasets.test = distribute.shard_by_data(datasets.train), distribute.shard_by_data(datasets.test)
    steps_per_epoch = config.steps_per_epoch or math.ceil(datasets.info.num_train / (config.batch_size * replicas))
    with strategy.scope():
        model = build_model(config, steps_per_epoch)
        if config.init_from and not resume:
            init_weights(model, load_cnn(config.init_from), config.init_from)
    distribute.prepare_model(model, strategy)
    if config.export and not resume:
        check_export_dir(config.export)

    chief = distribute.is_chief(strategy)
    if chief:
        run_dir, config, state = open_run_dir(config, resume)
    else:
        run_dir = RunDir(distribute.worker_run_dir(Path(config.logdir) / config.run_name))
        state = run_dir.read_resume_state()
    try:
        if config.export and resume and not (state and state.exported):
            check_export_dir(config.export)
        log.info("Device: %s", describe_devices())
        log.info("Strategy: %s, global batch %d", distribute.describe(strategy), config.batch_size * replicas)
        log.info("Data: %s", datasets.info.describe())
        log.info("Run folder: %s", run_dir.path)
        with strategy.scope():
            if state:
                restore(model, run_dir, state)
                run_dir.rollback(state.epochs, state.steps)
                log.info("Resuming %s after epoch %d of %d%s", run_dir.path, state.epochs, config.epochs,
                         ": every epoch is trained, evaluating and saving" if state.epochs >= config.epochs else "")
            elif resume:
                run_dir.rollback(0, 0)
                log.info("Resuming %s after epoch 0 of %d (no epoch had finished)", run_dir.path, config.epochs)
            try:
                train_model(model, datasets, config, run_dir, verbose, callbacks, state.epochs if state else 0)
                result = finish_run(model, datasets, config, run_dir, start, distribute.describe(strategy))
            except KeyboardInterrupt:
                raise Interrupted(run_dir.path) from None
            except StorageError as e:
                raise StorageError(f"{e}; resume with: python scripts/fit.py --resume {run_dir.path}") from None
    finally:
        run_dir.unlock()
        if not chief:
            shutil.rmtree(run_dir.path, ignore_errors=True)
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


def build_parser(defaults: TrainConfig | None = None) -> argparse.ArgumentParser:
    defaults = defaults or TrainConfig()
    p = _Parser(prog="fit.py", description="Train the MNIST CNN and write a run folder under --logdir.")
    p.add_argument("--epochs", type=_positive(int), default=defaults.epochs)
    p.add_argument("--batch-size", type=_positive(int), default=defaults.batch_size,
                   help="per replica: each step uses batch-size x replicas images")
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
    p.add_argument("--test-data", default=defaults.test_data, metavar="PATH",
                   help="take the test split from this IDX folder (the sample then trains on all 5,000 digits)")
    p.add_argument("--recipe", choices=list(RECIPES), default=defaults.recipe,
                   help="preset: seed = the tutorial's; best = 20 epochs, augmentation, cosine decay, dropout 0.5")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=defaults.augment,
                   help="random rotation/shift/zoom of training images")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=defaults.lr_schedule)
    p.add_argument("--dropout", type=float, default=defaults.dropout, help="before the last dense layer")
    p.add_argument("--profile-batch", default=defaults.profile_batch, metavar="A,B",
                   help="profile training steps A to B (TensorBoard's Profile tab; needs tensorboard-plugin-profile)")
    p.add_argument("--export", default=defaults.export, metavar="DIR",
                   help="after training, write a serving SavedModel into this new folder")
    p.add_argument("--strategy", choices=distribute.STRATEGIES, default=defaults.strategy,
                   help="auto: all GPUs if more than one, else one device; multiworker: from TF_CONFIG")
    p.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=defaults.mixed_precision,
                   help="mixed_float16 on GPU, mixed_bfloat16 on CPU")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue a killed or interrupted run (RUN_DIR, or --run-name in --logdir) "
                   "with its saved config")
    p.add_argument("--dry-run", action="store_true", help="1 epoch of 2 steps: check that everything runs")
    return p


def typed_flags(argv) -> dict:
    """The flags actually given on the command line (not defaulted), by config field."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def parse_args(argv=None) -> tuple[TrainConfig, bool]:
    """The config from the command line, and whether to resume.

    A ``--recipe`` supplies defaults for the fields it names; typed flags win. With
    --resume the config is the run's own (config.json); typed flags must agree with it.
    """
    args = vars(build_parser().parse_args(argv))
    typed = typed_flags(argv)
    resume, dry_run, recipe = args.pop("resume"), args.pop("dry_run"), args.pop("recipe")
    if resume is None:
        fields = {k: v for k, v in args.items() if k in typed or k not in RECIPES[recipe]}
        config = TrainConfig.from_recipe(recipe, **fields)
        if dry_run:
            config = dataclasses.replace(config, epochs=1, steps_per_epoch=2)
        return config, False
    if dry_run:
        raise UsageError("--dry-run cannot be combined with --resume")

    if resume == "":
        if not args["run_name"]:
            raise UsageError("--resume without RUN_DIR needs --run-name")
        run_dir = Path(args["logdir"]) / args["run_name"]
    else:
        run_dir = Path(resume)
    saved = load_run_config(run_dir)
    for name in typed.keys() - {"resume", *RUN_IDENTITY}:
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
    except (TrainingDiverged, StorageError) as e:
        print(f"\nfit.py: stopped: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\nfit.py: {e}", file=sys.stderr)
        return 130
    print("test accuracy: %f" % result.test_accuracy)
    print(f"run folder: {result.run_dir}  ({result.seconds:.0f} s)")
    return 0
