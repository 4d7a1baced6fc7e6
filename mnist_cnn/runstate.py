"""The run's state, in one place: open a run folder (new, or the one to resume), restore its
last committed epoch, keep its TensorBoard session, and finish it.

``rundir.RunDir`` owns the files (layout, lock, resume.json and its digests, rollback);
``callbacks.EpochCommit`` records each finished epoch through it; this module is the life of a
run around them, as ``train.fit`` uses it::

    run_dir, config = open_run(config, resume, chief)        # locked; swept; leftovers of a finished run gone
    state = resume_state(run_dir, config)                    # every check that can refuse a resume
    initial_epoch = resume_from(model, run_dir, config, state)
    with session(run_dir.path):                              # success / failure / interrupted
        ... epochs ...
        finish(run_dir, metrics)                             # metrics.json last, then the resume state goes
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from pathlib import Path

from mnist_cnn import distribute
from mnist_cnn.callbacks import write_session_end
from mnist_cnn.config import TrainConfig
from mnist_cnn.errors import Interrupted, ModelFileError, StorageError, TrainingDiverged, UsageError
from mnist_cnn.export import check_export_dir
from mnist_cnn.files import write_json
from mnist_cnn.keras_file import load_weights_strict
from mnist_cnn.model import CNN, build_optimizer, restore_random_state
from mnist_cnn.rundir import ResumeState, RunDir

log = logging.getLogger(__name__)


def open_run(config: TrainConfig, resume: bool, chief: bool = True) -> tuple[RunDir, TrainConfig]:
    """The run folder, locked: a new one (with config.json), or the existing one to
    resume, swept of a killed process's temporary files. A non-chief worker of a
    multi-worker cluster gets a scratch folder seeded with the chief's resume state."""
    if not chief:
        run_dir = RunDir(distribute.worker_run_dir(Path(config.logdir) / config.run_name))
        if not run_dir.config.exists():  # a new run: the worker's commits record a config of their own
            write_json(run_dir.config, dataclasses.asdict(config))
        return run_dir, config
    if not resume:
        run_dir = RunDir.create(config.logdir, config.run_name)
        config = dataclasses.replace(config, run_name=run_dir.path.name)
        try:
            write_json(run_dir.config, dataclasses.asdict(config))
        except StorageError as e:
            run_dir.unlock()
            shutil.rmtree(run_dir.path, ignore_errors=True)
            raise UsageError(str(e)) from None
        return run_dir, config
    run_dir = RunDir(Path(config.logdir) / config.run_name).lock()
    try:
        if run_dir.finished:
            run_dir.close_resume_state()  # a kill between metrics.json and this clean-up left it
            raise UsageError(f"--resume {run_dir.path}: this run already finished ({run_dir.metrics})")
        run_dir.check_no_links()
        run_dir.check_writable()
        run_dir.sweep()
        return run_dir, config
    except BaseException:
        run_dir.unlock()
        raise


def restore(model: CNN, run_dir: RunDir, state: ResumeState) -> None:
    """Load the committed epoch's weights, optimizer state and random generator states into ``model``."""
    build_optimizer(model)
    path = run_dir.path / state.checkpoint
    load_weights_strict(model, path)
    steps = int(model.optimizer.iterations.numpy())
    if steps != state.steps:
        raise ModelFileError(
            f"{path}: holds the optimizer state of step {steps}, {run_dir.resume_file} says {state.steps}"
        )
    try:
        restore_random_state(model, state.random)
    except ValueError as e:
        raise ModelFileError(f"{run_dir.resume_file}: {e}") from None


def resume_state(run_dir: RunDir, config: TrainConfig) -> ResumeState | None:
    """A resumed run's committed state, every check that can refuse the resume done (its files
    agree with each other, an ``--export`` folder is free): called before the run's start lines,
    so that a refused resume prints only its one-line error."""
    state = run_dir.read_resume_state(max_epochs=config.epochs)
    if config.export and not (state and state.exported):
        check_export_dir(config.export)
    return state


def resume_from(model: CNN, run_dir: RunDir, config: TrainConfig, state: ResumeState | None) -> int:
    """Restore a resumed run's last finished epoch (``resume_state``) into ``model``, roll the
    folder back to it, and return the epoch to continue from."""
    if state is None:
        run_dir.rollback(0, 0)
        log.info("Resuming %s after epoch 0 of %d (no epoch had finished)", run_dir.path, config.epochs)
        return 0
    restore(model, run_dir, state)
    run_dir.rollback(state.epochs, state.steps)
    done = ": every epoch is trained, evaluating and saving" if state.epochs >= config.epochs else ""
    log.info("Resuming %s after epoch %d of %d%s", run_dir.path, state.epochs, config.epochs, done)
    return state.epochs


@contextlib.contextmanager
def session(run_dir: Path):
    """The run's HParams session for the block: ``success`` when it ends, ``interrupted`` on
    Ctrl-C (raised as ``Interrupted``, naming the run to resume), ``failure`` on a storage fault
    (re-raised naming the run) or a diverged loss."""
    try:
        yield
    except KeyboardInterrupt:
        write_session_end(run_dir, "interrupted")
        raise Interrupted(run_dir) from None
    except StorageError as e:
        write_session_end(run_dir, "failure")
        raise StorageError(str(e), run_dir=run_dir) from None
    except TrainingDiverged:
        write_session_end(run_dir, "failure")
        raise
    write_session_end(run_dir, "success")


def finish(run_dir: RunDir, metrics: dict) -> None:
    """Mark the run finished: metrics.json, written last, then the resume state it no longer needs."""
    write_json(run_dir.metrics, metrics)
    run_dir.close_resume_state()
