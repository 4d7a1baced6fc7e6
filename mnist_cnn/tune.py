"""Sweeps on Optuna: ``mnist-cnn-tune`` / ``scripts/tune.py``, or from Python::

    from mnist_cnn import tune
    from mnist_cnn.config import TrainConfig
    outcome = tune.run(tune.Sweep(study="lr", trials=20), TrainConfig(data="sample", epochs=10))

A study lives in its storage (default: the SQLite file ``<logdir>/<study>/study.db``); every
trial is an ordinary run folder ``<logdir>/<study>/trial-NNNN/`` trained by ``train.fit`` with
the base config and the options the trial drew (``space``), its HParams carrying the trial's
number, study and objective. The objective is a validation metric of the last epoch, reported
every epoch so that the pruner can stop a hopeless trial at once; the test split is never read.

Kill safety: a trial is claimed, and its run folder created and locked, under the study's lock
(``tune.lock``), so a RUNNING trial whose folder nobody holds was left by a process that died:
the next ``tune`` on that study resumes it through the run folder's own resume (bit for bit), or
takes its result if the run had finished, or, if the folder never got a config, trains it anew.
``--trials`` counts every trial the study holds, across restarts and processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import optuna
import sqlalchemy
import tensorflow as tf
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tensorboard.plugins.hparams import api as hp

from mnist_cnn import console, interrupts, train
from mnist_cnn import space as spaces
from mnist_cnn.config import NOT_PASSED_ON, RESUME_MAY_CHANGE, RUN_IDENTITY, TrainConfig
from mnist_cnn.errors import InputError, TrainingDiverged, UsageError
from mnist_cnn.files import read_json, write_json
from mnist_cnn.rundir import RunDir
from mnist_cnn.space import OBJECTIVES, Sweep, check
from mnist_cnn.sweep_report import Outcome, line

# not the study's business: where the trials' folders are, how they show progress, how many checkpoints they keep
NOT_COMPARED = (*RUN_IDENTITY, *RESUME_MAY_CHANGE, "keep_checkpoints", "tfds_dir")
HOST = socket.gethostname()
RECORDED = {"space": "search space", "base": "base options", "objective": "objective"}  # what a study keeps


def storage_url(sweep: Sweep, base: TrainConfig) -> str:
    return sweep.storage or f"sqlite:///{(sweep.folder(base) / 'study.db').resolve()}"


def shown(url: str) -> str:
    """A storage URL as printed: its password as ***."""
    if url.startswith("journal:"):
        return url
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 -- not a URL SQLAlchemy can read: nothing in it is known to be a password
        return url


def open_storage(url: str):
    """Optuna's storage for ``url``: journal:PATH (a journal file, e.g. on a shared file system) or
    an SQLAlchemy URL (sqlite:///PATH, postgresql+psycopg2://..., mysql+pymysql://...)."""
    try:
        if url.startswith("journal:"):
            path = Path(url[len("journal:"):])
            if not path.parent.is_dir():
                raise OSError(f"no folder {path.parent}")
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {}  # waits out other writers
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # noqa: BLE001 -- SQLAlchemy and its drivers fail in many ways (bad URL, no driver, ...)
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise UsageError(f"--storage {shown(url)}: cannot open it ({type(e).__name__}: {reason})") from None


def pruner(sweep: Sweep):
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.prune_after_trials,
                                           n_warmup_steps=sweep.prune_after_epochs)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=sweep.prune_after_epochs)
    return optuna.pruners.NopPruner()


def compared(base: TrainConfig) -> dict:
    """The base config as a study records it: what makes two studies' trials comparable."""
    return {k: v for k, v in dataclasses.asdict(base).items() if k not in NOT_COMPARED}


def open_study(sweep: Sweep, base: TrainConfig, space):
    """The study (created, or continued when its space, base config and objective are the same)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check(sweep, base)
    try:
        sweep.folder(base).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--logdir {base.logdir}: cannot create the study folder ({e.strerror or e})") from None
    url = storage_url(sweep, base)
    study = optuna.create_study(study_name=sweep.study, storage=open_storage(url), load_if_exists=True,
                                direction=OBJECTIVES[sweep.objective], pruner=pruner(sweep))
    recorded = {"space": spaces.as_json(space), "base": json.dumps(compared(base), sort_keys=True),
                "objective": sweep.objective}
    for key, value in recorded.items():
        before = study.user_attrs.get(key)
        if before is None:
            study.set_user_attr(key, value)
        elif before != value:
            raise UsageError(f"--study {sweep.study}: {_difference(key, before, value)}; a study keeps its "
                             f"{RECORDED[key]} (start another with a new --study, or run it as it was)")
    write_experiment(sweep.folder(base), space)
    return study


def write_experiment(folder: Path, space) -> None:
    """The sweep's columns for TensorBoard's HParams dashboard (as its HParams tutorial declares them):
    the trial number, the options the space varies, and the validation loss and accuracy; without it
    the dashboard lists every option of every run, constant or not. Written once, in the study folder."""
    if any(folder.glob("events.out.tfevents.*")):
        return
    columns = [hp.HParam("trial", hp.IntInterval(0, 2**31 - 1))]
    for d in space:
        domain = None
        if d.choices is not None and len({type(c) for c in d.choices}) == 1:
            domain = hp.Discrete(list(d.choices))
        elif d.choices is None:
            domain = hp.IntInterval(int(d.low), int(d.high)) if d.kind is int else hp.RealInterval(float(d.low),
                                                                                                    float(d.high))
        columns.append(hp.HParam(d.name, domain))
    metrics = [hp.Metric("epoch_accuracy", group="validation", display_name="val_accuracy"),
               hp.Metric("epoch_loss", group="validation", display_name="val_loss")]
    with tf.summary.create_file_writer(str(folder)).as_default():
        hp.hparams_config(hparams=columns, metrics=metrics)


def _difference(key: str, before: str, now: str) -> str:
    if key == "objective":
        return f"it selects on {before}, not {now}"
    old, new = json.loads(before), json.loads(now)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "absent") != new.get(k, "absent"))
    return f"its {RECORDED[key]} changed ({', '.join(changed)})"


# -- claiming a trial ---------------------------------------------------------------------------


def trial_name(number: int) -> str:
    return f"trial-{number:04d}"


def stored(study, number: int):
    """Trial ``number`` as the storage holds it now (``study.trials`` would deep-copy every trial)."""
    return study.get_trials(deepcopy=False)[number]  # a study's trials are numbered 0, 1, 2, ... in order


@contextlib.contextmanager
def study_lock(folder: Path):
    """The study's lock on this file system, held while a trial is claimed and until its run folder
    is locked (``release`` may end it early; the with-block's end does in any case)."""
    fd = os.open(folder / "tune.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    held = [fd]

    def release():
        if held:
            os.close(held.pop())  # closing releases the flock

    try:
        yield release
    finally:
        release()


@dataclass
class Claim:
    """A trial this process trains now: new, or one a killed process left (``resumed``)."""

    trial: object  # optuna.trial.Trial
    config: TrainConfig
    resume: bool = False
    note: str = ""


def counted(trials) -> int:
    """The trials --trials counts: all the study holds, but those that stopped on bad input."""
    return sum(1 for t in trials if t.state != TrialState.WAITING and "input_error" not in t.user_attrs)


def claim(study, sweep: Sweep, base: TrainConfig, space, say) -> Claim | None:
    """Under the study lock: a trial a dead process left, else a new one while the study holds
    fewer than ``sweep.trials``; None when it is full."""
    folder = sweep.folder(base)
    trials = study.get_trials(deepcopy=False)
    seed = int(np.random.SeedSequence([base.seed, sweep.worker or 0, len(trials)]).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(seed=seed)  # a function of the seed and the study so far
    for frozen in trials:
        if frozen.state != TrialState.RUNNING:
            continue
        trial = optuna.trial.Trial(study, frozen._trial_id)  # (Optuna has no public accessor)
        run_dir = RunDir(folder / trial_name(frozen.number))
        if not run_dir.path.exists():
            if frozen.user_attrs.get("host", HOST) != HOST:
                continue  # another machine's trial, logged there
            return Claim(trial, _config_of(trial, space, base), note="trained anew: its process died first")
        try:
            run_dir.lock().unlock()
        except UsageError:
            continue  # a live process trains it
        if run_dir.finished:
            _tell_finished(study, frozen, run_dir, sweep, say)
            continue
        if not run_dir.config.exists():  # killed between its mkdir and its config
            run_dir.path.rename(run_dir.path.with_name(f"{run_dir.path.name}.incomplete-{time.time_ns()}"))
            return Claim(trial, _config_of(trial, space, base), note="trained anew: no epoch had started")
        state = run_dir.read_resume_state()
        return Claim(trial, run_dir.read_config(), True, f"resumed after epoch {state.epochs if state else 0}")
    if counted(trials) >= sweep.trials:
        return None
    trial = study.ask()
    trial.set_user_attr("host", HOST)
    trial.set_user_attr("worker", sweep.worker or 0)
    trial.set_user_attr("run_dir", str(folder / trial_name(trial.number)))
    return Claim(trial, _config_of(trial, space, base))


def _config_of(trial, space, base: TrainConfig) -> TrainConfig:
    """The trial's config: its options drawn (those it drew before a kill kept, as Optuna keeps them)."""
    folder = Path(base.logdir) / trial.study.study_name
    return dataclasses.replace(base, **spaces.suggest(trial, space, base), logdir=str(folder),
                               run_name=trial_name(trial.number), progress="none")


def _tell_finished(study, frozen, run_dir: RunDir, sweep: Sweep, say) -> None:
    """A trial whose run finished before its process could report it: its result, from the run folder."""
    metrics = read_json(run_dir.metrics, "run metrics")
    value = metrics["history"][sweep.objective][-1]
    pruned = "pruned_at_epoch" in metrics.get("trial", {})
    study.tell(frozen.number, state=TrialState.PRUNED if pruned else None, values=None if pruned else value)
    say(line(stored(study, frozen.number), sweep.objective, "taken from its finished run"))


# -- training it -----------------------------------------------------------------------------


class Report(keras.callbacks.Callback):
    """The per-epoch report a pruner decides on (after the run's own callbacks, so each epoch is
    committed first); a pruned trial stops at the end of that epoch, ``info`` saying when."""

    def __init__(self, trial: optuna.trial.Trial, objective: str, info: dict, run_dir: RunDir, release):
        super().__init__()
        self.trial, self.objective, self.info, self.run_dir, self.release = trial, objective, info, run_dir, release
        self.known: set[int] = set()

    def on_train_begin(self, logs=None):
        self.release()  # the run folder is locked now: other processes may claim again
        self.known = set(stored(self.trial.study, self.trial.number).intermediate_values)
        for entry in self.run_dir.read_history():  # a resumed trial's epochs its killed process did not report
            if entry["epoch"] not in self.known and self.objective in entry:
                self.trial.report(float(entry[self.objective]), entry["epoch"])

    def on_epoch_end(self, epoch, logs=None):
        if epoch not in self.known:  # (a resumed run trains again what its killed process had not committed)
            self.trial.report(float(logs[self.objective]), epoch)
        if self.trial.should_prune():
            self.info["pruned_at_epoch"] = epoch + 1
            self.model.stop_training = True


def train_trial(study, claimed: Claim, sweep: Sweep, release, say) -> None:
    """Train the claimed trial and tell the study how it ended."""
    trial, number = claimed.trial, claimed.trial.number
    run_dir = RunDir(Path(claimed.config.logdir) / claimed.config.run_name)
    info = {"trial": number, "study": sweep.study, "objective": sweep.objective}
    report = Report(trial, sweep.objective, info, run_dir, release)
    try:
        with console.hidden():  # a trial is one line; its warnings still show
            result = train.fit(claimed.config, verbose=0, resume=claimed.resume, callbacks=[report], trial=info)
    except TrainingDiverged as e:
        trial.set_user_attr("error", str(e)[:500])
        study.tell(trial, state=TrialState.FAIL)
        say(line(stored(study, number), sweep.objective, "diverged"))
        return
    except InputError as e:
        trial.set_user_attr("input_error", str(e)[:500])
        study.tell(trial, state=TrialState.FAIL)
        raise
    finally:
        release()
    if "pruned_at_epoch" in info:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, result.history[sweep.objective][-1])
    say(line(stored(study, number), sweep.objective, claimed.note))


def work(study, sweep: Sweep, base: TrainConfig, space, say=print, started: float | None = None) -> None:
    """This process's share of the study: claim, train, tell, until it is full or ``sweep.timeout``
    seconds have passed since ``started`` (a ``time.monotonic()``; default: now)."""
    started = time.monotonic() if started is None else started
    folder, deadline = sweep.folder(base), None if sweep.timeout is None else started + sweep.timeout
    while deadline is None or time.monotonic() < deadline:
        interrupts.check()  # a Ctrl-C/SIGTERM whose exception was dropped between two trials
        with study_lock(folder) as release:
            claimed = claim(study, sweep, base, space, say)
            if claimed is None:
                return
            train_trial(study, claimed, sweep, release, say)


# -- the best trial ------------------------------------------------------------------------


def best_trial(study):
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = 1 if OBJECTIVES[study.user_attrs.get("objective", "val_accuracy")] == "maximize" else -1
    return max(complete, key=lambda t: (sign * t.value, -t.number))  # ties: the earlier trial


def write_best(study, sweep: Sweep, base: TrainConfig) -> Path | None:
    """``best.json`` in the study folder: the best complete trial's config, as ``mnist-cnn-fit
    --config`` takes it (without the trial's folder and progress, so that it trains a new run)."""
    best = best_trial(study)
    if best is None:
        return None
    config = RunDir(sweep.folder(base) / trial_name(best.number)).read_config()
    path = sweep.folder(base) / "best.json"
    write_json(path, {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_PASSED_ON})
    return path


def run(sweep: Sweep, base: TrainConfig, say=print, work_here: bool = True) -> Outcome:
    """Open (or continue) the study, train trials until it holds ``sweep.trials`` (or the time is up),
    then write best.json. ``work_here=False``: only the summary (``--best``, or other processes trained)."""
    started = time.monotonic()
    space = spaces.read(sweep.space, sweep.fixed)
    study = open_study(sweep, base, space)
    if work_here:
        work(study, sweep, base, space, say, started)
    best_config = write_best(study, sweep, base)
    return Outcome(sweep.study, shown(storage_url(sweep, base)), sweep.objective, study.get_trials(deepcopy=False),
                   best_trial(study), best_config)
