"""rundir: run files cannot steer, crash or hang a resume. resume.json carries the run's
identity (digests of config.json, of the committed history and of the resume checkpoint),
checked before anything trains or is written; run files are read only as regular files
under the size cap; names in checkpoints/ and the event folders that are not the run's are
left alone; a finished run's leftover resume state is swept when it is next opened."""

import json
import os
import shutil

import pytest
from conftest import FIT, REPO, StopAfter, fit_here, run_measured, snapshot

from mnist_cnn import train
from mnist_cnn.cli import fit as fit_cli
from mnist_cnn.errors import Interrupted

pytestmark = pytest.mark.slow


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Two runs of 3 epochs killed after their second: ``ours`` (seed 7) and ``foreign`` (seed 8,
    dropout 0.5) -- the files a user might copy from one run into another."""
    logdir = tmp_path_factory.mktemp("killed")
    for name, extra in (("ours", {}), ("foreign", {"seed": 8, "dropout": 0.5})):
        config = train.TrainConfig(data="sample", epochs=3, steps_per_epoch=2, logdir=str(logdir), run_name=name,
                                   seed=extra.get("seed", 7), dropout=extra.get("dropout", 0.0))
        with pytest.raises(Interrupted):
            train.fit(config, verbose=0, callbacks=[StopAfter(2)])
    return logdir


@pytest.fixture
def run(killed, tmp_path):
    shutil.copytree(killed / "ours", tmp_path / "ours")
    return tmp_path / "ours"


def refused(run, capsys, message):
    """--resume is one line, exit 2, every file byte-identical afterwards, and none of a run's
    start lines (Device:, Data:, ...) on stdout before the refusal."""
    before = snapshot(run)
    assert fit_cli.main(["--resume", str(run)]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert out == "", out
    assert snapshot(run) == before


def test_a_history_cut_short_is_refused_before_training(run, capsys):
    """The issue: history.json cut to one entry (resume.json: two epochs) trained epoch 3,
    rewrote files, then failed on every later resume."""
    history = json.loads((run / "history.json").read_text())
    (run / "history.json").write_text(json.dumps(history[:1]))
    refused(run, capsys, "history.json: holds 1 epoch(s); ")


@pytest.mark.parametrize("name", ["history.json", "checkpoints/resume-02.keras", "config.json"])
def test_another_runs_file_copied_in_is_refused(run, killed, capsys, name):
    """Another run's history, resume checkpoint (another seed, dropout 0.5) or config: the run
    would have trained on from foreign state (exit 0 before)."""
    shutil.copy(killed / "foreign" / name, run / name)
    if name == "config.json":  # the foreign config is valid; only the digest tells
        config = json.loads((run / name).read_text())
        config.update(run_name="ours", logdir=str(run.parent))
        (run / name).write_text(json.dumps(config))
    refused(run, capsys, f"{run / name}: not the one this run committed with epoch 2")


def test_an_edited_resume_checkpoint_is_refused(run, capsys):
    checkpoint = run / "checkpoints" / "resume-02.keras"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 1
    checkpoint.write_bytes(bytes(data))
    refused(run, capsys, "resume-02.keras: not the one this run committed")


@pytest.mark.parametrize("make, message", [
    (lambda p: os.symlink("/dev/zero", p), "a symbolic link; a run config must be a regular file"),
    (lambda p: os.mkfifo(p), "a FIFO; a run config must be a regular file"),
    (lambda p: p.write_bytes(b"{" + b" " * (20 << 20) + b"}"), "over 16,777,216 bytes; not a run config"),
])
def test_config_json_that_is_not_a_small_regular_file_is_refused_without_reading_it(run, capsys, make, message):
    """config.json as a link to /dev/zero (a 2.6 GB MemoryError before), a FIFO (a hang), 20 MB."""
    (run / "config.json").unlink()
    make(run / "config.json")
    before = {p.name for p in run.iterdir()}
    assert fit_cli.main(["--resume", str(run)]) == 2
    assert message in one_line_error(capsys)
    assert {p.name for p in run.iterdir()} == before


@pytest.mark.parametrize("name", ["resume.json", "history.json"])
def test_a_run_file_that_is_a_fifo_is_refused_not_waited_on(run, capsys, name):
    (run / name).unlink()
    os.mkfifo(run / name)
    assert fit_cli.main(["--resume", str(run)]) == 2
    assert f"{run / name}: a FIFO" in one_line_error(capsys)


def test_a_resume_checkpoint_that_is_a_link_is_refused(run, killed, capsys):
    checkpoint = run / "checkpoints" / "resume-02.keras"
    checkpoint.unlink()
    checkpoint.symlink_to(killed / "ours" / "checkpoints" / "resume-02.keras")
    refused(run, capsys, "resume-02.keras: a symbolic link")


def test_a_checkpoints_folder_that_is_a_link_is_refused(run, tmp_path, capsys):
    """checkpoints/ as a link to a folder outside the run: the resume would have written its
    checkpoints there (and swept, trimmed and rolled back files there)."""
    outside = tmp_path / "elsewhere"
    shutil.move(run / "checkpoints", outside)
    (run / "checkpoints").symlink_to(outside)
    before = snapshot(outside)
    refused(run, capsys, f"{run / 'checkpoints'}: a symbolic link; a run's files stay inside its folder")
    assert snapshot(outside) == before


def test_names_that_are_not_the_runs_are_left_alone_and_the_resume_completes(run):
    """checkpoints/epoch-abc.keras and resume-.keras, and a folder named like an event file
    (tracebacks before): ignored, untouched, and the run finishes."""
    strays = [run / "checkpoints" / "epoch-abc.keras", run / "checkpoints" / "resume-.keras"]
    for stray in strays:
        stray.write_bytes(b"not ours")
    folder = run / "train" / "events.out.tfevents.1.stray"
    folder.mkdir()
    proc, _ = run_measured([*FIT, "--resume", run])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TFRecordDataset" not in proc.stderr  # trimming the event files logs nothing of TensorFlow's
    assert (run / "metrics.json").is_file()
    assert all(stray.read_bytes() == b"not ours" for stray in strays) and folder.is_dir()


def test_a_finished_runs_leftover_resume_state_is_swept_when_it_is_next_opened(run, killed, capsys):
    """A kill between metrics.json and the clean-up left resume.json and resume-0N.keras; the
    next --resume removes exactly those and says the run is finished."""
    proc = fit_here("--resume", run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    finished = snapshot(run)
    shutil.copy(killed / "ours" / "resume.json", run / "resume.json")
    shutil.copy(killed / "ours" / "checkpoints" / "resume-02.keras", run / "checkpoints" / "resume-02.keras")
    assert fit_cli.main(["--resume", str(run)]) == 2
    assert "this run already finished" in one_line_error(capsys)
    assert snapshot(run) == finished


def test_only_rundir_names_the_files_of_a_run_folder():
    """RunDir is the one place a run folder's file names are written: a module that spells one out
    (as distribute.worker_run_dir once copied "resume.json", "config.json", "history.json") would go
    wrong the day a name changes. keras_file's "config.json" is a member of a .keras archive."""
    import ast

    names = {"config.json", "history.json", "metrics.json", "resume.json", "model.keras", "best.keras", ".lock"}
    allowed = {("keras_file.py", "config.json")}
    found = []
    for path in sorted((REPO / "mnist_cnn").rglob("*.py")):
        if path.name == "rundir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Constant) and node.value in names
                    and (path.name, node.value) not in allowed):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value}")
    assert found == []
