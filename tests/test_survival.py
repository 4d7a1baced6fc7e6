"""Runs that survive kills and storage faults: each case killed, filled or limited for real.

Every test here starts a real ``scripts/fit.py`` process and interrupts it at the
moment named by polling the run folder for the file that marks that moment; the resume
that follows runs in the test's own process (``fit_here``), as the tests of resume itself do.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import (
    FIT,
    RESUME_HINT,
    committed_epochs,
    fit_here,
    mount_tmpfs,
    read_events,
    read_summaries,
    snapshot,
    start_fit,
    wait_for_epochs,
)

from mnist_cnn.rundir import RunDir

pytestmark = pytest.mark.slow


def run_args(tmp_path, epochs, steps, *extra):
    return ["--data", "sample", "--epochs", epochs, "--steps-per-epoch", steps,
            "--logdir", tmp_path, "--run-name", "run", *extra]


def resume(run_dir):
    """``fit.py --resume RUN_DIR`` after the real kill, in this process (``fit_here``)."""
    return fit_here("--resume", run_dir)


def wait_for_file(proc, folder: Path, pattern: str, timeout=240) -> Path:
    """Busy-poll ``folder`` for a file matching ``pattern``; return it as soon as it appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(folder.glob(pattern)) if folder.is_dir() else []
        if found:
            return found[0]
        if proc.poll() is not None:
            err = proc.communicate()[1][-2000:]
            pytest.fail(f"training exited before {pattern} appeared ({proc.returncode}): {err}")
    proc.kill()
    pytest.fail(f"{pattern} did not appear in {folder}")


def last_line(text: str) -> str:
    """The CLI's own last line (TensorFlow's start-up lines precede it on stderr)."""
    return text.strip().splitlines()[-1]


def kill(proc, sig=signal.SIGKILL):
    proc.send_signal(sig)
    return proc.communicate(timeout=60)


def resume_completes(run_dir, after: int, epochs: int, steps: int) -> list[dict]:
    """--resume the run: it must say where it continues and end complete (``check_complete``)."""
    resumed = resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming {run_dir} after epoch {after} of {epochs}" in resumed.stdout
    return check_complete(run_dir, epochs, steps)


def check_complete(run_dir, epochs, steps):
    """Every epoch once in history.json and TensorBoard; the optimizer made exactly epochs x steps steps."""
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history] == list(range(epochs))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == epochs
    for split in ("train", "validation"):
        scalars, _ = read_events(run_dir / split)
        assert [step for step, _ in scalars["epoch_loss"]] == list(range(epochs)), split
    assert len(read_summaries(run_dir)["_hparams_/session_start_info"]) == 1  # the run's HParams, once
    batch_steps = [step for step, _ in read_events(run_dir / "train")[0]["batch_loss"]]
    assert sorted(batch_steps) == list(range(1, epochs * steps + 1))  # every step once
    assert metrics["optimizer_steps"] == epochs * steps
    assert not list((run_dir / "checkpoints").glob("resume-*"))  # the training state went with the resume state
    assert not (run_dir / "resume.json").exists()
    assert not list(run_dir.rglob(".*")), "temporary or lock files left"
    return history


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_kill_after_the_last_epoch_resumes_without_training(tmp_path, sig):
    run_dir, export = tmp_path / "run", tmp_path / "served"
    proc = start_fit(*run_args(tmp_path, 2, 10, "--export", export))
    wait_for_epochs(proc, run_dir, epochs=2, poll=0.002)
    _, err = kill(proc, sig)
    assert not (run_dir / "metrics.json").exists(), "killed too late: the run had finished"
    history_before = json.loads((run_dir / "history.json").read_text())
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and f"{RESUME_HINT} {run_dir}" in err, err

    resumed = resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming {run_dir} after epoch 2 of 2: every epoch is trained" in resumed.stdout
    assert "Epoch 1/2" not in resumed.stdout and "Epoch 2/2" not in resumed.stdout
    assert "test accuracy: " in resumed.stdout
    assert check_complete(run_dir, epochs=2, steps=10) == history_before  # nothing retrained
    assert (export / "1" / "saved_model.pb").is_file()  # the export was finished too, once
    assert [p.name for p in export.iterdir()] == ["1"]


def test_kills_while_epoch_checkpoints_are_written_resume_from_the_commit_before(tmp_path):
    """A checkpoint half-written: killed while epoch 1's is written, then the resume killed while
    epoch 2's is; each time the run resumes from the commit before the kill."""
    run_dir = tmp_path / "run"
    proc = start_fit(*run_args(tmp_path, 2, 10))
    for epoch in (1, 2):
        wait_for_file(proc, run_dir / "checkpoints", f".epoch-{epoch:02d}.keras.tmp-*")
        kill(proc)
        assert list((run_dir / "checkpoints").glob(f".epoch-{epoch:02d}.keras.tmp-*")), "the kill came after the write"
        assert committed_epochs(run_dir) == epoch - 1
        if epoch == 1:
            proc = start_fit("--resume", run_dir)  # sweeps epoch 1's half-written file, trains on from the start
    resume_completes(run_dir, after=1, epochs=2, steps=10)


def test_kill_while_best_is_rewritten_keeps_the_earlier_best(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_fit(*run_args(tmp_path, 3, 10))
    wait_for_epochs(proc, run_dir, epochs=1)
    wait_for_file(proc, run_dir / "checkpoints", ".best.keras.tmp-*")
    kill(proc)
    best = keras.saving.load_model(run_dir / "checkpoints" / "best.keras")  # whole, not truncated
    first = keras.saving.load_model(run_dir / "checkpoints" / "epoch-01.keras")
    for a, b in zip(best.get_weights(), first.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_two_processes_never_train_one_run_and_a_killed_ones_litter_is_swept(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_fit(*run_args(tmp_path, 3, 10))
    wait_for_epochs(proc, run_dir, epochs=1)
    kill(proc)
    holder = RunDir(run_dir).lock()  # another process is resuming it
    try:
        before = snapshot(run_dir)
        second = resume(run_dir)
        assert second.returncode == 2
        assert last_line(second.stderr) == f"fit.py: error: {run_dir}: another process is training this run right now"
        assert snapshot(run_dir) == before
    finally:
        holder.unlock()
    # what a process killed while writing leaves behind goes; a user's own file stays
    litter = [run_dir / f".model.keras.tmp-{'a' * 32}", run_dir / "checkpoints" / f".epoch-02.keras.tmp-{'b' * 32}"]
    for path in litter:
        path.write_bytes(os.urandom(1000))
    mine = run_dir / "notes.txt"
    mine.write_text("a user's file")
    resume_completes(run_dir, after=1, epochs=3, steps=10)
    assert not any(p.exists() for p in litter)
    assert mine.read_text() == "a user's file"


# -- storage faults -----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 100 MB (root only; the test says why it skips otherwise)."""
    mount = mount_tmpfs(tmp_path / "disk", "100m")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_mid_training_stops_cleanly_and_resumes_once_space_is_back(small_disk):
    run_dir = small_disk / "run"
    # each checkpoint is ~39 MB: epoch 1 fits (epoch-01 + best), epoch 2 cannot
    proc = subprocess.run([*FIT, *map(str, run_args(small_disk, 3, 5))], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = last_line(proc.stderr)
    assert last.startswith("fit.py: stopped: cannot write ") and "No space left on device" in last, proc.stderr
    assert f"{RESUME_HINT} {run_dir}" in last
    assert "Traceback" not in proc.stderr
    assert committed_epochs(run_dir) == 1
    assert not list(run_dir.rglob(".*.tmp-*"))
    keras.saving.load_model(run_dir / "checkpoints" / "best.keras")  # the earlier files are whole

    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
    resume_completes(run_dir, after=1, epochs=3, steps=5)


def test_a_resume_on_a_read_only_or_full_disk_is_one_line_and_leaves_no_temporary_file(small_disk):
    run_dir = small_disk / "run"
    proc = start_fit(*run_args(small_disk, 3, 5))
    wait_for_epochs(proc, run_dir, epochs=1)
    kill(proc)

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    before = snapshot(run_dir)
    resumed = resume(run_dir)
    assert resumed.returncode == 2
    assert last_line(resumed.stderr) == f"fit.py: error: {run_dir}: cannot write the run folder (Read-only file system)"
    assert snapshot(run_dir) == before

    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    subprocess.run(["dd", "if=/dev/zero", f"of={small_disk / 'filler'}", "bs=1M"], capture_output=True)  # to ENOSPC
    resumed = resume(run_dir)
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    last = last_line(resumed.stderr)
    assert last.startswith("fit.py: stopped: cannot write ") and "No space left on device" in last, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert not list(run_dir.rglob(".*.tmp-*"))  # nothing TensorBoard would read as an event file
    (small_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
    resume_completes(run_dir, after=committed_epochs(run_dir), epochs=3, steps=5)


def test_file_size_limit_is_one_line_and_leaves_no_partial_file(tmp_path):
    run_dir = tmp_path / "run"
    limited = ["prlimit", "--fsize=20000000", *FIT, *map(str, run_args(tmp_path, 2, 5))]
    proc = subprocess.run(limited, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = last_line(proc.stderr)
    assert last.startswith("fit.py: stopped: cannot write ") and "File too large" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints" / "best.keras").exists()  # never a file cut at the limit
    assert not list(run_dir.rglob(".*.tmp-*"))
    resume_completes(run_dir, after=0, epochs=2, steps=5)


def test_export_into_a_read_only_folder_is_refused_before_training(small_disk, tmp_path):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    logs = tmp_path / "logs"
    proc = subprocess.run([*FIT, "--data", "sample", "--dry-run", "--logdir", logs, "--export", small_disk / "out"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_line(proc.stderr).startswith(f"fit.py: error: {small_disk / 'out'}: cannot create it")
    assert "Read-only file system" in proc.stderr and "Epoch" not in proc.stdout
    assert not logs.exists()
