"""Training: ``fit(config)`` reads top to bottom -- strategy, data, model, run folder,
epochs, final evaluation and files.

    mnist-cnn-fit --epochs 5 --batch-size 50 --learning-rate 1e-3   (or python scripts/fit.py ...)

The options are ``config.TrainConfig``; the command line around ``fit`` is ``cli``;
the run folder's files are ``rundir.RunDir``'s. Each run gets its own folder
``<logdir>/<run-name or timestamp>/`` (docs/run-folder.md draws the layout).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from mnist_cnn import augment, console, cpu, data, distribute, interrupts
from mnist_cnn.callbacks import forget_step_scalars, make_callbacks, write_split_pictures
from mnist_cnn.config import JIT_CHOICES, TrainConfig, native_mixed_precision
from mnist_cnn.errors import ModelFileError, TrainingDiverged, UsageError
from mnist_cnn.evaluate import score
from mnist_cnn.export import check_export_dir, export_savedmodel, serving_commands
from mnist_cnn.keras_file import load_cnn, save_model
from mnist_cnn.model import CNN, build_optimizer, require_tensorflow
from mnist_cnn.optimizers import FusedAdam
from mnist_cnn.rundir import RunDir
from mnist_cnn.runstate import finish, open_run, resume_from, resume_state, session

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    model_path: Path
    test_loss: float | None  # None: the run did not read the test split (a tuning trial)
    test_accuracy: float | None
    history: dict[str, list[float]]
    data_info: data.DataInfo
    seconds: float


# -- the steps of a run --------------------------------------------------------


def describe_devices() -> str:
    """'GPU: <names>' for the GPUs TensorFlow sees, or the CPU path: 'CPU (AVX2 FMA), oneDNN on'."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return cpu.describe_path()
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
    return "GPU: " + ", ".join(names)


def precision_policy(mixed: bool) -> str:
    """float32, or the mixed policy this machine runs fast: float16 on GPUs, bfloat16 on CPUs."""
    if not mixed:
        return "float32"
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    blocked = cpu.bfloat16_blocked()
    if blocked:
        raise UsageError(f"--mixed-precision: {blocked}")
    return "mixed_bfloat16"


def learning_rate(config: TrainConfig, steps_per_epoch: int):
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=config.epochs * steps_per_epoch)
    return config.learning_rate


def build_model(config: TrainConfig, steps_per_epoch: int) -> CNN:
    """The CNN compiled as the config says (Adam; loss and accuracy as in the tutorial).
    Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer, whose
    scale_loss CNN.gradient_step applies."""
    return compile_model(CNN(dropout=config.dropout, dtype=precision_policy(config.mixed_precision)),
                         config, steps_per_epoch)


def compile_model(model: keras.Model, config: TrainConfig, steps_per_epoch: int,
                  optimizer: type[keras.optimizers.Optimizer] = FusedAdam) -> keras.Model:
    """``model`` compiled with the config's optimizer, loss, metric, XLA and steps per call
    (``optimizer``: FusedAdam, Keras' Adam in one kernel per update; bench.py also times Keras' Adam),
    its optimizer's variables made now: created in the first step instead, they make tf.function trace
    the training step twice (~0.3 CPU-s a run). Call it in the strategy's scope."""
    model.compile(
        optimizer=optimizer(learning_rate(config, steps_per_epoch), use_ema=config.ema is not None,
                            ema_momentum=config.ema or 0.99),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=JIT_CHOICES[config.jit_compile],
        steps_per_execution=config.steps_per_execution,
    )
    if config.label_smoothing:  # (CNN's own: Keras' sparse cross-entropy has no smoothing)
        if not isinstance(model, CNN):
            raise ValueError(f"label smoothing is CNN's; {type(model).__name__} has none")
        model.label_smoothing = config.label_smoothing
    build_optimizer(model)
    return model


def init_weights(model: CNN, source: CNN, path: str) -> None:
    """Copy the weights of ``source`` (loaded from ``path``) into ``model``."""
    try:
        model.set_weights(source.get_weights())
    except ValueError:
        raise ModelFileError(f"{path}: a CNN of another size ({source.get_config()}); cannot start from it") from None


class StreamPosition(keras.callbacks.Callback):
    """Points the training stream at the optimizer's step count when an epoch starts, so that
    epoch k trains on batches of the stream that depend on (seed, step) alone -- the same
    after a resume as in an uninterrupted run (``data.epoch_batches``)."""

    def __init__(self, position: tf.Variable):
        super().__init__()
        self.position = position

    def on_epoch_begin(self, epoch, logs=None):
        self.position.assign(int(self.model.optimizer.iterations.numpy()))


def train_epochs(
    model: CNN,
    datasets: data.Datasets,
    config: TrainConfig,
    run_dir: RunDir,
    verbose,
    extra=(),
    initial_epoch: int = 0,
    epoch_lines: bool = False,
    trial: dict | None = None,
) -> None:
    """model.fit from ``initial_epoch`` with the run's callbacks (and ``extra`` ones)."""
    if initial_epoch >= config.epochs:
        return
    try:
        model.fit(
            datasets.train,
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            # one epoch of the training stream each time (data.epoch_batches), from the step it starts at
            steps_per_epoch=None,
            validation_data=datasets.validation,
            shuffle=False,  # the pipeline shuffles, seeded
            callbacks=[
                StreamPosition(datasets.position),
                # validation scores the moving average, as the saved models are
                *([keras.callbacks.SwapEMAWeights()] if model.optimizer.use_ema else []),
                *make_callbacks(
                    run_dir,
                    epoch_lines=epoch_lines,
                    split="validation" if datasets.info.num_validation else "test",
                    validation=datasets.validation,
                    preview=datasets.preview,
                    # what auto chose; a tuning trial's number, study and objective
                    hparams={**dataclasses.asdict(config), "data": datasets.info.source, **(trial or {})},
                    keep_checkpoints=config.keep_checkpoints,
                    profile_batch=config.profile_range(),
                ),
                *extra,
            ],
            verbose=verbose,
        )
    except TrainingDiverged as e:
        kept = run_dir.read_resume_state()
        where = (f"the last good checkpoint is {run_dir.epoch_checkpoint(kept.epochs)} "
                 f"(with its optimizer state: {run_dir.path / kept.checkpoint})" if kept
                 else "no epoch had finished, so no checkpoint")
        raise TrainingDiverged(f"{e}; {where}") from None
    finally:
        forget_step_scalars(model)  # (fit ended by an exception calls no on_train_end)


def score_test(model: CNN, datasets: data.Datasets, run_dir: RunDir, step: int) -> tuple[float, float]:
    """Test loss and accuracy, from the one pass over the test split a run makes; its
    pictures (``test/misclassified``, ``test/confusion_matrix``) from the same pass."""
    scores = score(model, datasets.test)
    with tf.summary.create_file_writer(str(run_dir.path / "images")).as_default() as writer:
        write_split_pictures(writer, "test", scores, step)
    return scores.loss, scores.accuracy


def finish_run(
    model: CNN, datasets: data.Datasets, config: TrainConfig, run_dir: RunDir, start: float, strategy: str = "",
    trial: dict | None = None,
) -> RunResult:
    """After the last epoch: score the test split (once; not in a tuning ``trial``), write model.keras,
    the export (if asked) and, last, metrics.json -- the mark of a finished run. Until then the
    resume state stays, so a run killed in here resumes at this step, not from scratch."""
    if model.optimizer.use_ema:  # (fit already did, unless this resume had no epoch left to train)
        model.optimizer.finalize_variable_values(model.trainable_variables)
    epochs = run_dir.read_history()
    test_loss, test_accuracy = (None, None) if trial is not None else score_test(model, datasets, run_dir,
                                                                                   step=len(epochs))
    save_model(run_dir.model, model)
    state = run_dir.read_resume_state()
    if config.export and not (state and state.exported):
        log.info("SavedModel for serving: %s", export_savedmodel(model, config.export))
        for command in serving_commands(config.export):
            log.info("serve it with: %s", command)
        if state:
            run_dir.mark_exported(state)
    result = RunResult(
        run_dir=run_dir.path,
        model_path=run_dir.model,
        test_loss=test_loss,
        test_accuracy=test_accuracy,
        history={k: [e[k] for e in epochs] for k in epochs[-1] if k != "epoch"},
        data_info=datasets.info,
        seconds=time.perf_counter() - start,
    )
    interrupts.check()  # a Ctrl-C/SIGTERM dropped since the last batch: not finished, resumable
    finish(run_dir, {
        "test_loss": result.test_loss,
        "test_accuracy": result.test_accuracy,
        "validation_loss": result.history["val_loss"][-1],  # the last epoch's
        "validation_accuracy": result.history["val_accuracy"][-1],
        "model_selection": "validation split" if datasets.info.num_validation else "test split",
        "epochs_run": len(epochs),
        "optimizer_steps": int(model.optimizer.iterations.numpy()),
        "history": result.history,
        "seconds": round(result.seconds, 2),  # of this process (a resumed run: since the resume)
        "config": dataclasses.asdict(config),
        "data": dataclasses.asdict(datasets.info),
        "device": describe_devices(),
        "strategy": strategy,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        **({"trial": trial} if trial is not None else {}),
    })
    return result


def load_data(config: TrainConfig, global_batch: int, with_test: bool = True) -> data.Datasets:
    """The config's data as pipelines of ``global_batch`` (the strategy splits it); ``with_test=False``:
    without the test split (``data.load``)."""
    datasets = data.load(
        config.data,
        batch_size=global_batch,
        seed=config.seed,
        data_dir=config.tfds_dir,
        augment=config.augment,
        elastic=config.elastic,
        strengths=augment.Strengths(config.augment_rotation, config.augment_shift, config.augment_zoom,
                                    config.elastic_alpha, config.elastic_sigma),
        steps_per_epoch=config.steps_per_epoch,
        test_source=config.test_data,
        validation=config.validation_split,
        with_test=with_test,
    )
    datasets.train, datasets.validation, datasets.test = (
        distribute.shard_by_data(d) for d in (datasets.train, datasets.validation, datasets.test)
    )
    if not datasets.info.num_validation:
        log.warning("--validation-split 0: per-epoch scores and the best checkpoint use the test split")
    return datasets


def progress_mode(progress: str) -> str:
    """--progress resolved: auto is the bar on a terminal, one line per epoch otherwise."""
    if progress == "auto":
        return "bar" if sys.stdout.isatty() else "epoch"
    return progress


def log_start(config: TrainConfig, strategy, datasets: data.Datasets, run_dir: RunDir, global_batch: int) -> None:
    """The lines a run starts with: where it trains, on what, how, and into which folder."""
    log.info("Device: %s", describe_devices())
    hint = None if tf.config.list_physical_devices("GPU") else cpu.slow_path_hint()
    if hint:
        log.warning(hint)
    log.info("Strategy: %s, global batch %d", distribute.describe(strategy), global_batch)
    log.info("Data: %s", datasets.info.describe())
    why = ""
    if config.recipe == "fast":  # what the recipe chose by, whatever a typed flag then chose
        why = f" (recipe fast: mixed precision is {'' if native_mixed_precision() else 'not '}native on this machine)"
    log.info("Precision: %s%s", precision_policy(config.mixed_precision), why)
    log.info("Run folder: %s", run_dir.path)


def fit(config: TrainConfig, verbose=None, resume: bool = False, callbacks=(), trial: dict | None = None
        ) -> RunResult:
    """Train the CNN as ``config`` says; write the run folder; return the result.

    ``resume``: continue the run ``<logdir>/<run_name>`` after its last finished
    epoch (``resume.json``), appending to its logs; a run whose epochs all finished
    is only evaluated and saved. Ctrl-C or a storage failure leaves a resumable run.
    ``callbacks`` are added to the run's own; ``verbose`` (Keras' fit verbosity) replaces
    what ``config.progress`` would print, and ``verbose=0`` also silences the run's own lines
    (Device:, Data:, Run folder:, warnings), which otherwise reach the console even when the
    caller configured no logging. Everything that can be wrong with the input is checked
    before the run folder is created.

    Like Keras' reproducibility recipe, ``fit`` seeds Python's ``random``, NumPy's global
    generator and TensorFlow with ``config.seed`` (``keras.utils.set_random_seed``): code that
    draws from those generators after ``fit`` draws a seeded sequence.

    ``trial``: the run is a tuning trial (``mnist_cnn.tune``): its entries (number, study, objective)
    join the HParams, and the test split is never read (``RunResult.test_*`` are None); the dict is
    written into metrics.json when the run ends, with what its callbacks added (``pruned_at_epoch``).
    """
    with console.lines_shown(silent=verbose == 0):
        return _fit(config, verbose, resume, callbacks, trial)


def _fit(config: TrainConfig, verbose, resume: bool, callbacks, trial: dict | None = None) -> RunResult:
    require_tensorflow("train.fit")
    config.validate()
    start = time.perf_counter()
    strategy = distribute.make_strategy(config.strategy)  # first: multi-worker setup precedes other TF work
    distribute.check_steps_per_execution(strategy, config.steps_per_execution)
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    keras.utils.set_random_seed(config.seed)
    datasets = load_data(config, global_batch, with_test=trial is None)
    with strategy.scope():
        model = build_model(config, config.steps_per_epoch or math.ceil(datasets.info.num_train / global_batch))
        if config.init_from and not resume:
            init_weights(model, load_cnn(config.init_from), config.init_from)
    distribute.prepare_model(model, strategy)
    if config.export and not resume:
        check_export_dir(config.export)

    chief = distribute.is_chief(strategy)
    run_dir, config = open_run(config, resume, chief)
    try:
        state = resume_state(run_dir, config) if resume else None
        log_start(config, strategy, datasets, run_dir, global_batch)
        with strategy.scope():
            initial_epoch = resume_from(model, run_dir, config, state) if resume else 0
            with session(run_dir.path):
                mode = progress_mode(config.progress) if verbose is None else "keras"
                keras_verbose = {"bar": 1, "epoch": 0, "none": 0}.get(mode, verbose)
                train_epochs(model, datasets, config, run_dir, keras_verbose, callbacks, initial_epoch,
                             epoch_lines=mode == "epoch", trial=trial)
                result = finish_run(model, datasets, config, run_dir, start, distribute.describe(strategy), trial)
            return result
    finally:
        run_dir.unlock()
        if not chief:
            shutil.rmtree(run_dir.path, ignore_errors=True)
