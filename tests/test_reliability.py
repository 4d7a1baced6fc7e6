"""Resume after a kill, clear errors for bad input, runs that never collide."""

import json
import os
import re
import signal
import subprocess
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    FIT,
    RESUME_HINT,
    committed_epochs,
    fit_here,
    quick,
    read_events,
    session_statuses,
    snapshot,
    start_fit,
    wait_for_epochs,
    write_folder,
)

from mnist_cnn import CNN, idx, train
from mnist_cnn.cli import fit as fit_cli
from mnist_cnn.errors import ModelFileError, TrainingDiverged, UsageError
from mnist_cnn.keras_file import load_cnn


def check_resumed_run(run_dir, epochs, steps):
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history] == list(range(epochs))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == epochs and len(metrics["history"]["loss"]) == epochs
    for split in ("train", "validation"):
        scalars, _ = read_events(run_dir / split)
        assert [step for step, _ in scalars["epoch_loss"]] == list(range(epochs)), split
    # step curves continue from the optimizer's count; TensorBoard drops the killed
    # process's partial steps when the resumed process rewrites them (out-of-order purge)
    steps_logged = {step for step, _ in read_events(run_dir / "train")[0]["batch_loss"]}
    assert steps_logged == set(range(1, epochs * steps + 1))
    assert not (run_dir / "resume.json").exists()  # removed once the run finished
    assert not list(run_dir.rglob(".*"))  # no temporary or lock file left
    assert metrics["optimizer_steps"] == epochs * steps  # no epoch trained twice


@pytest.mark.slow
def test_sigkill_in_epoch_2_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    steps = 60
    args = ["--data", "sample", "--epochs", 2, "--steps-per-epoch", steps, "--logdir", tmp_path, "--run-name", "run"]
    proc = start_fit(*args)
    wait_for_epochs(proc, run_dir, epochs=1)
    time.sleep(0.4)  # into epoch 2 (60 steps take well over a second on any CPU)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert committed_epochs(run_dir) == 1, "killed too late"
    assert not (run_dir / "metrics.json").exists()

    resumed = fit_here("--resume", run_dir)  # after the real kill: in this process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming {run_dir} after epoch 1 of 2" in resumed.stdout
    assert "Epoch 1/2" not in resumed.stdout and "Epoch 2/2" in resumed.stdout  # epoch 1 not retrained
    check_resumed_run(run_dir, epochs=2, steps=steps)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    # three epochs, so that a late look at resume.json (a busy machine) still finds the run training
    args = ["--data", "sample", "--epochs", 3, "--steps-per-epoch", 40, "--logdir", tmp_path, "--run-name", "run"]
    proc = start_fit(*args)
    wait_for_epochs(proc, run_dir, epochs=1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (committed_epochs(run_dir), out[-1500:], err[-2000:])
    assert f"interrupted; {RESUME_HINT} {run_dir}" in err
    assert "Traceback" not in err
    assert session_statuses(run_dir) == ["STATUS_FAILURE"]  # not "unknown" in TensorBoard
    resumed = fit_here("--resume", run_dir)  # after the real kill: in this process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_resumed_run(run_dir, epochs=3, steps=40)
    assert session_statuses(run_dir) == ["STATUS_SUCCESS"]  # the resumed run ended the session anew


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run (seed 7) that the resume tests only read."""
    return train.fit(quick(tmp_path_factory.mktemp("finished"), epochs=1, steps_per_epoch=2, run_name="r"), verbose=0)


def test_resume_refuses_conflicting_flags_and_finished_runs(finished, tmp_path, capsys):
    run = finished
    before = snapshot(run.run_dir)
    assert fit_cli.main(["--resume", str(run.run_dir), "--epochs", "9"]) == 2
    assert "--epochs 9 conflicts with the resumed run's epochs=1" in capsys.readouterr().err
    assert fit_cli.main(["--resume", str(run.run_dir), "--epochs", "1"]) == 2  # agreeing flags are fine ...
    assert "this run already finished" in capsys.readouterr().err  # ... but it is done
    assert fit_cli.main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run folder (no config.json)" in capsys.readouterr().err
    assert fit_cli.main(["--resume", "--logdir", str(tmp_path / "logs")]) == 2
    assert "--resume without RUN_DIR needs --run-name" in capsys.readouterr().err
    assert snapshot(run.run_dir) == before


def idx_damage():
    """name -> function(folder) that breaks an IDX folder one way; and the expected message."""

    def rewrite(name, fn):
        def damage(folder):
            path = folder / name
            path.write_bytes(fn(path.read_bytes()))

        return damage

    return {
        "truncated": (rewrite("train-images-idx3-ubyte", lambda b: b[:-10]), "train-images-idx3-ubyte: truncated"),
        "magic": (rewrite("t10k-images-idx3-ubyte", lambda b: b"\x12\x34\x08\x03" + b[4:]), "wrong magic number"),
        "dims": (
            lambda f: idx.write_idx(f / "train-images-idx3-ubyte", np.zeros((12, 20, 20))),
            "images are 20x20, expected 28x28",
        ),
        "count": (
            lambda f: idx.write_idx(f / "train-labels-idx1-ubyte", np.zeros(3)),
            "has 12 images but",
        ),
        "label": (
            lambda f: idx.write_idx(f / "t10k-labels-idx1-ubyte", np.full(5, 11)),
            "label 11 at index 0 is outside 0-9",
        ),
        "not-gzip": (
            lambda f: (f / "t10k-labels-idx1-ubyte").rename(f / "t10k-labels-idx1-ubyte.gz"),
            "t10k-labels-idx1-ubyte.gz: not a valid gzip file",
        ),
        "missing": (lambda f: (f / "t10k-labels-idx1-ubyte").unlink(), "missing t10k-labels-idx1-ubyte"),
    }


@pytest.mark.parametrize("kind", list(idx_damage()))
def test_bad_idx_data_one_line_exit_2_nothing_touched(kind, tmp_path, capsys):
    folder, logs = tmp_path / "data", tmp_path / "logs"
    write_folder(folder)
    damage, message = idx_damage()[kind]
    damage(folder)
    logs.mkdir()
    (logs / "earlier-run").mkdir()
    (logs / "earlier-run" / "metrics.json").write_text("{}")
    before = snapshot(folder, logs)
    assert fit_cli.main(["--data", str(folder), "--logdir", str(logs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fit.py: error: ") and err.count("\n") == 1 and message in err, err
    assert snapshot(folder, logs) == before
    assert sorted(p.name for p in logs.iterdir()) == ["earlier-run"]


def test_bad_idx_data_through_the_script_has_no_traceback(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03")
    proc = subprocess.run([*FIT, "--data", str(tmp_path), "--logdir", str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fit.py: error: ")
    assert "Traceback" not in proc.stderr


def test_logdir_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert fit_cli.main(["--data", "sample", "--dry-run", "--logdir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fit.py: error: --logdir {blocker}: cannot create a run folder there")
    assert err.count("\n") == 1
    assert blocker.read_text() == "not a folder"


def test_existing_run_name_is_refused_and_kept(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model.keras").write_bytes(b"precious")
    assert fit_cli.main(["--data", "sample", "--dry-run", "--logdir", str(tmp_path), "--run-name", "mine"]) == 2
    assert "--run-name mine: " in capsys.readouterr().err
    assert (tmp_path / "mine" / "model.keras").read_bytes() == b"precious"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    cnn = CNN(dense_units=16)
    cnn.build()
    cnn.save(folder / "small.keras")
    inputs = keras.Input((28, 28, 1))
    keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs)).save(folder / "lambda.keras")
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]).save(
        folder / "dense.keras"
    )
    (folder / "corrupt.keras").write_bytes(os.urandom(500))
    return folder


@pytest.mark.parametrize(
    "name, message",
    [
        ("absent.keras", "model file not found"),
        ("corrupt.keras", "not a .keras model file"),
        ("dense.keras", "holds a Sequential, not a mnist_cnn CNN"),
        ("lambda.keras", "it contains Python code (a Lambda layer), refused in safe mode"),
    ],
)
def test_bad_model_files_are_refused(model_files, name, message, capsys):
    with pytest.raises(ModelFileError, match=re.escape(message)):
        load_cnn(model_files / name)
    before = snapshot(model_files)
    assert fit_cli.main(["--data", "sample", "--dry-run", "--init-from", str(model_files / name),
                       "--logdir", str(model_files / "logs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(model_files / name) in err and message in err
    assert snapshot(model_files) == before  # nothing written, not even a run folder


def test_init_from_another_size_is_refused(model_files, capsys):
    assert fit_cli.main(["--data", "sample", "--dry-run", "--init-from", str(model_files / "small.keras"),
                       "--logdir", str(model_files / "logs2")]) == 2
    assert "a CNN of another size" in capsys.readouterr().err
    assert not (model_files / "logs2").exists()


def test_init_from_starts_where_the_saved_model_was(tmp_path, exported_run):
    """One step from the shared trained run's weights starts far below one step from scratch."""
    second = train.fit(quick(tmp_path, epochs=1, steps_per_epoch=1, init_from=str(exported_run.model_path)),
                       verbose=0)
    fresh = train.fit(quick(tmp_path, epochs=1, steps_per_epoch=1), verbose=0)
    assert second.history["loss"][0] < 0.5 * fresh.history["loss"][0]


def test_nan_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = CNN.gradient_step

    def diverging(self, x, y, sample_weight=None):
        loss, y_pred = original(self, x, y, sample_weight)
        # from the 5th step on (epoch 2 of 3-step epochs) report a NaN loss
        return tf.where(self.optimizer.iterations > 4, tf.constant(np.nan, loss.dtype), loss), y_pred

    monkeypatch.setattr(CNN, "gradient_step", diverging)
    expected = r"the loss became nan at epoch 2, batch 2; the last good checkpoint is .*epoch-01.keras"
    with pytest.raises(TrainingDiverged, match=expected):
        train.fit(quick(tmp_path, epochs=3, run_name="nan"), verbose=0)
    run_dir = tmp_path / "logs" / "nan"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.keras", "epoch-01.keras",
                                                                           "resume-01.keras"]
    assert committed_epochs(run_dir) == 1
    assert not (run_dir / "model.keras").exists() and not (run_dir / "metrics.json").exists()
    assert len(json.loads((run_dir / "history.json").read_text())) == 1
    assert session_statuses(run_dir) == ["STATUS_FAILURE"]
    good = keras.saving.load_model(run_dir / "checkpoints" / "epoch-01.keras")
    assert all(np.isfinite(w).all() for w in good.get_weights())


def test_divergent_learning_rate_exits_non_zero(tmp_path):
    proc = fit_here("--data", "sample", "--epochs", "1", "--steps-per-epoch", "5", "--learning-rate", "1e9",
                    "--logdir", tmp_path)
    assert proc.returncode == 1
    assert "fit.py: stopped: the loss became nan at epoch 1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resume_takes_the_flags_that_do_not_change_the_training(finished):
    """--progress and --steps-per-execution only change how a run is shown and called:
    a resume applies them (they were silently ignored); other flags must still agree."""
    run = finished
    config, resume = fit_cli.parse_args(["--resume", str(run.run_dir), "--progress", "none",
                                         "--steps-per-execution", "4"])
    assert resume and (config.progress, config.steps_per_execution) == ("none", 4)
    assert (config.epochs, config.seed, config.run_name) == (1, 7, "r")
    with pytest.raises(UsageError, match="--batch-size 7 conflicts with the resumed run's batch_size=50"):
        fit_cli.parse_args(["--resume", str(run.run_dir), "--batch-size", "7"])
