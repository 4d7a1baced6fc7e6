"""Ctrl-C and SIGTERM are not lost when Python swallows their exception (``mnist_cnn.interrupts``).

Python raises a signal's ``KeyboardInterrupt`` at the next bytecode of the main thread; inside a
finalizer or a garbage-collector callback (JAX registers one) it is printed as "Exception ignored"
and dropped. CI lost a sweep's SIGTERM that way (the study trained on and exited 0). Here the signal
is sent from inside a finalizer, so that its exception is swallowed every time, not by chance.
"""

import json
import os
import signal
import sys

import keras
import pytest
from conftest import RESUME_HINT, read_summaries, session_statuses, start_fit, wait_for_epochs

from mnist_cnn import interrupts, train
from mnist_cnn.cli import tune as tune_cli
from mnist_cnn.config import TrainConfig
from mnist_cnn.errors import Interrupted


class _SignalsWhenCollected:
    """Sends ``signum`` to this process from its finalizer, where the handler's exception is swallowed."""

    def __init__(self, signum):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        for _ in range(100):  # backward jumps: Python runs the pending handler here, inside __del__
            pass


def lose_a_signal(signum=signal.SIGINT):
    _SignalsWhenCollected(signum)  # collected at once: the signal's exception is raised and dropped


@pytest.fixture
def swallowed(monkeypatch):
    """What Python dropped as "Exception ignored" (sys.unraisablehook)."""
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    return dropped


def test_a_dropped_interrupt_is_raised_again_by_check(swallowed):
    with interrupts.stopping_on(signal.SIGINT, signal.SIGTERM):
        interrupts.check()  # nothing received yet
        lose_a_signal(signal.SIGTERM)
        assert swallowed == [KeyboardInterrupt]  # Python dropped it ...
        assert interrupts.received() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # ... and check raises it again
            interrupts.check()
    assert interrupts.received() is None  # the block's end forgets it, and restores the handlers
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class LoseASignalAt(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            lose_a_signal()


def test_training_stops_at_the_batch_after_a_dropped_ctrl_c(tmp_path, swallowed):
    """Ctrl-C whose exception a finalizer dropped at step 4 of 2×5 (in a callback after the run's own
    check of that step): the run stops at the end of step 5, before anything of it is logged, as an
    interrupted, resumable run (before, it trained all 10 steps and ended as a success)."""
    config = TrainConfig(data="sample", epochs=2, steps_per_epoch=5, validation_split="100", logdir=str(tmp_path),
                         run_name="run", progress="none")
    with interrupts.stopping_on(signal.SIGINT), pytest.raises(Interrupted):
        train.fit(config, verbose=0, callbacks=[LoseASignalAt(4)])
    assert swallowed == [KeyboardInterrupt]
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists()
    steps = [step for step, _, _ in read_summaries(run / "train")["batch_loss"]]
    assert steps == [1, 2, 3, 4], steps  # not 5 to 10
    assert session_statuses(run) == ["STATUS_FAILURE"]  # interrupted (the HParams API has no "aborted")


def test_a_study_stops_before_its_next_trial_after_a_dropped_signal(tmp_path, capsys, monkeypatch, swallowed):
    """SIGTERM dropped between two trials: the sweep stops (exit 130, the line to continue it)
    instead of training the second trial."""
    real_fit = train.fit

    def fit_then_lose_a_signal(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        lose_a_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(train, "fit", fit_then_lose_a_signal)
    code = tune_cli.main(["--study", "s", "--trials", "2", "--logdir", str(tmp_path), "--data", "sample",
                          "--epochs", "1", "--steps-per-epoch", "2", "--validation-split", "100"])
    err = capsys.readouterr().err
    assert code == 130, err
    assert "interrupted; the study continues" in err
    assert swallowed == [KeyboardInterrupt]
    assert sorted(p.name for p in (tmp_path / "s").glob("trial-*")) == ["trial-0000"]


@pytest.mark.slow
def test_sigterm_stops_fit_as_ctrl_c_does(tmp_path):
    """An operator's SIGTERM (Kubernetes, Slurm, systemd) ends a training run as Ctrl-C does: status
    130, the resume line, the epochs already committed kept."""
    proc = start_fit("--data", "sample", "--epochs", "50", "--steps-per-epoch", "3", "--validation-split", "100",
                     "--logdir", tmp_path, "--run-name", "run")
    wait_for_epochs(proc, tmp_path / "run", 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"interrupted; {RESUME_HINT} {tmp_path / 'run'}" in err
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert session_statuses(tmp_path / "run") == ["STATUS_FAILURE"]  # interrupted (the HParams API has no "aborted")


def test_a_signal_dropped_after_the_last_epoch_leaves_the_run_unfinished_and_resumable(tmp_path, monkeypatch,
                                                                                       swallowed):
    """Dropped while model.keras is written (after every epoch trained): no metrics.json, so the run
    is not marked finished; the resume trains nothing and finishes it."""
    config = TrainConfig(data="sample", epochs=1, steps_per_epoch=3, validation_split="100", logdir=str(tmp_path),
                         run_name="run", progress="none")
    real_save = train.save_model

    def save_then_lose_a_signal(*args):
        real_save(*args)
        lose_a_signal()

    monkeypatch.setattr(train, "save_model", save_then_lose_a_signal)
    with interrupts.stopping_on(signal.SIGINT), pytest.raises(Interrupted):
        train.fit(config, verbose=0)
    assert swallowed == [KeyboardInterrupt]
    assert not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.setattr(train, "save_model", real_save)
    result = train.fit(config, verbose=0, resume=True)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["optimizer_steps"] == 3  # nothing trained again
    assert result.test_accuracy is not None
