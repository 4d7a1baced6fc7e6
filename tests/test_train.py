import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import quick, read_events, run_python, start_fit

from mnist_cnn import cpu, train
from mnist_cnn.cli import fit as fit_cli
from mnist_cnn.config import TrainConfig
from mnist_cnn.errors import UsageError
from mnist_cnn.rundir import RunDir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short real run on the sample, shared by the tests that inspect its folder."""
    return train.fit(quick(tmp_path_factory.mktemp("run")), verbose=0)


def test_fit_writes_a_complete_run_folder(run):
    assert run.run_dir.parent.name == "logs"
    assert run.model_path == run.run_dir / "model.keras" and run.model_path.is_file()
    assert (run.run_dir / "checkpoints" / "best.keras").is_file()
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(run.test_accuracy)
    assert metrics["epochs_run"] == 2
    assert metrics["config"]["batch_size"] == 50 and metrics["config"]["learning_rate"] == 1e-3
    assert metrics["data"] == {"source": "sample", "num_train": 3500, "num_validation": 500, "num_test": 1000}
    assert set(run.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert run.history["loss"][1] < run.history["loss"][0]
    assert metrics["validation_accuracy"] == run.history["val_accuracy"][-1]
    assert metrics["model_selection"] == "validation split"
    assert 0.1 < run.test_accuracy <= 1.0
    assert not list(run.run_dir.glob(".*tmp*")) and not list(run.run_dir.glob(".*.keras"))


def test_tensorboard_has_step_and_epoch_curves_and_histograms(run):
    train_scalars, train_tags = read_events(run.run_dir / "train")
    val_scalars, _ = read_events(run.run_dir / "validation")
    assert [s for s, _ in train_scalars["batch_loss"]] == [1, 2, 3, 4, 5, 6]  # every step
    assert "batch_accuracy" in train_scalars
    for tag in ("epoch_loss", "epoch_accuracy"):
        assert [s for s, _ in train_scalars[tag]] == [0, 1]
        assert [s for s, _ in val_scalars[tag]] == [0, 1]
    assert [v for _, v in train_scalars["epoch_loss"]] == pytest.approx(run.history["loss"])
    assert [v for _, v in val_scalars["epoch_accuracy"]] == pytest.approx(run.history["val_accuracy"])
    histograms = {t.split("/", 1)[1] for t in train_tags if t.endswith("/histogram")}  # drop "cnn_N/"
    layers = ("conv1", "conv2", "dense1", "dense2")
    assert histograms == {f"{layer}/{w}/histogram" for layer in layers for w in ("kernel", "bias")}


def histogram_tensors(folder):
    """{(tag, step): the histogram's (buckets, 3) array} of the event files in ``folder``."""
    return {(value.tag, event.step): tf.make_ndarray(value.tensor)
            for path in sorted(folder.glob("events.out.tfevents.*"))
            for event in tf.compat.v1.train.summary_iterator(str(path)) for value in event.summary.value
            if value.metadata.plugin_data.plugin_name == "histograms"}


def test_the_weight_histograms_are_tensorflows_own_of_the_epochs_weights(run, tmp_path):
    """The histograms are binned in NumPy (``WeightHistograms``): the last epoch's are what
    ``tf.summary.histogram`` makes of the saved model's weights, bucket for bucket."""
    written = {tag.split("/", 1)[1]: v for (tag, step), v in histogram_tensors(run.run_dir / "train").items()
               if step == 1}  # the last epoch's, "cnn_N/" dropped
    model = keras.saving.load_model(run.model_path)
    writer, weight_count = tf.summary.create_file_writer(str(tmp_path)), {}
    with writer.as_default():
        for layer in ("conv1", "dense1", "dense2"):
            for weight in getattr(model, layer).weights:
                tf.summary.histogram(f"{layer}/{weight.name}/histogram", weight, step=0)
                weight_count[f"{layer}/{weight.name}/histogram"] = int(np.prod(weight.shape))
    writer.close()
    expected = {tag: v for (tag, _), v in histogram_tensors(tmp_path).items()}
    assert len(expected) == 6
    for tag, buckets in expected.items():  # (left edge, right edge, count) per bucket
        np.testing.assert_allclose(written[tag][:, :2], buckets[:, :2], rtol=1e-9, err_msg=tag)
        # the same counts; a weight that sits on an edge may fall either side in another library's last bit
        assert np.abs(written[tag][:, 2] - buckets[:, 2]).sum() <= 2, tag
        assert written[tag][:, 2].sum() == buckets[:, 2].sum() == weight_count[tag]


def test_a_run_traces_its_training_step_once(tmp_path, monkeypatch):
    """The optimizer's variables exist before the first step (``train.compile_model``): made in it,
    they make tf.function trace the step a second time, ~0.3 CPU-s a run."""
    traced, step = [], train.CNN.train_step
    monkeypatch.setattr(train.CNN, "train_step", lambda self, *args: traced.append(1) or step(self, *args))
    train.fit(quick(tmp_path, epochs=1, steps_per_epoch=2), verbose=0)
    assert len(traced) == 1


def test_saved_model_predicts_like_the_result(run, sample):
    _, (x_test, y_test) = sample
    model = keras.saving.load_model(run.model_path)
    probs = model.predict(x_test[..., None].astype("float32") / 255.0, verbose=0)
    assert (probs.argmax(1) == y_test).mean() == pytest.approx(run.test_accuracy, abs=1e-6)


def test_another_seed_another_result(tmp_path):
    """(One seed, one result -- bit for bit, resumed or not -- is tests/test_determinism.py.)"""
    first = train.fit(quick(tmp_path, epochs=1), verbose=0)
    other = train.fit(quick(tmp_path, epochs=1, seed=8), verbose=0)
    assert first.run_dir != other.run_dir
    assert other.history["loss"] != first.history["loss"]


def test_run_folders_never_collide(tmp_path):
    folders = {RunDir.create(str(tmp_path), None).path for _ in range(5)}
    assert len(folders) == 5 and all(f.is_dir() for f in folders)
    named = RunDir.create(str(tmp_path), "mine").path
    (named / "keep.txt").write_text("precious")
    with pytest.raises(UsageError, match=r"--run-name mine: .* already exists"):
        RunDir.create(str(tmp_path), "mine")
    assert (named / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "argument --epochs: must be positive, got 0"),
        (["--batch-size", "-5"], "argument --batch-size: must be positive, got -5"),
        (["--keep-checkpoints", "-1"], "argument --keep-checkpoints: must be 0 or more, got -1"),  # 0 is allowed
        (["--learning-rate", "abc"], "argument --learning-rate: expected a positive number, got 'abc'"),
        (["--jit-compile", "maybe"], "argument --jit-compile: invalid choice"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_get_one_line_and_status_2(argv, message, capsys):
    assert fit_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cli_refuses_an_unknown_data_source_without_touching_the_logdir(tmp_path, capsys):
    assert fit_cli.main(["--data", "nowhere", "--logdir", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "fit.py: error: data source 'nowhere': expected auto, tfds, sample or an existing folder of IDX files\n"
    )
    assert not (tmp_path / "logs").exists()


def test_fit_script_dry_run_twice_at_once_in_two_run_folders(tmp_path):
    """Two dry runs started in the same second, as a user who chose nothing (no TF_ENABLE_ONEDNN_OPTS):
    each prints the run's lines and ends complete in its own run folder."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    procs = [start_fit("--dry-run", "--data", "sample", "--logdir", tmp_path, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(runs) == 2
    fast = "oneDNN on" if cpu.is_x86() else "oneDNN "  # the script's default on x86: the fast CPU path
    folders = set()
    for out, _ in outs:
        lines = out.splitlines()
        assert any(line.startswith("Device: CPU (") and fast in line or line.startswith("Device: GPU: ")
                   for line in lines), lines[:3]  # (", its kernels capped at ..." where ONEDNN_MAX_CPU_ISA is set)
        assert "Data: sample (3,500 train / 500 validation / 1,000 test)" in lines
        accuracy = [line for line in lines if line.startswith("test accuracy: ")]
        assert len(accuracy) == 1 and 0.0 <= float(accuracy[0].split(": ")[1]) <= 1.0
        assert len(accuracy[0].split(": ")[1]) == 8  # the tutorial's %f
        assert lines[-1].startswith("run folder: ")
        folders.add(lines[-1].split()[2])
    assert folders == {str(r) for r in runs}
    for run_dir in runs:
        assert {"config.json", "metrics.json", "model.keras", "history.json"} <= {p.name for p in run_dir.iterdir()}


FROM_PYTHON = """
import logging, sys
from mnist_cnn import train
from mnist_cnn.config import TrainConfig
for verbose in (None, 0):  # as in a notebook: a call that shows its lines, then one silenced
    config = TrainConfig(data="sample", epochs=1, steps_per_epoch=2, logdir=sys.argv[1], progress="epoch")
    result = train.fit(config, verbose=verbose)
    print("RESULT", verbose, len(logging.getLogger("mnist_cnn").handlers), logging.getLogger().hasHandlers(),
          flush=True)
"""


def test_fit_from_python_shows_its_lines_without_logging_configured_and_leaves_logging_alone(tmp_path):
    proc = run_python(FROM_PYTHON, tmp_path, lean=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    results = [i for i, line in enumerate(lines) if line.startswith("RESULT")]
    shown = lines[:results[0]]
    assert any(line.startswith("Device: ") for line in shown) and any(line.startswith("Run folder: ") for line in shown)
    assert any(line.startswith("Epoch 1/1 - ") for line in shown)
    # no handler left behind, the root logger untouched; verbose=0 printed nothing at all
    assert lines[results[0]:] == ["RESULT None 0 False", "RESULT 0 0 False"], lines


def test_a_recipe_name_without_its_settings_is_refused_with_the_call_that_applies_it():
    with pytest.raises(UsageError, match=re.escape("TrainConfig.from_recipe('best', ...)")):
        TrainConfig(recipe="best").validate()
    assert TrainConfig.from_recipe("best").validate().epochs == 120
    assert TrainConfig.from_recipe("best", epochs=3).validate().augment  # a typed value still wins


@pytest.mark.parametrize("field, value, expected", [
    ("validation_split", 100, "validation_split must be str, got 100"),  # a TypeError from re before
    ("epochs", "5", "epochs must be int, got '5'"), ("epochs", 2.0, "epochs must be int, got 2.0"),
    ("augment", 1, "augment must be bool, got 1"), ("learning_rate", True, "learning_rate must be float, got True")])
def test_a_field_of_the_wrong_type_from_python_is_one_usage_error_naming_it(tmp_path, field, value, expected):
    config = TrainConfig(logdir=str(tmp_path), **{field: value})
    with pytest.raises(UsageError, match=f"^TrainConfig: {re.escape(expected)}$"):
        train.fit(config)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written
    assert TrainConfig(learning_rate=1).validate().learning_rate == 1  # an int where a float goes is a number
