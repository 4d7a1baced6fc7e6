"""Honest results: model selection on a validation split, the test split scored once,
and a CNN that behaves like any Keras model (save/load, freezing, export, input forms)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import quick, read_summaries

from mnist_cnn import cli, data, train


def test_the_best_checkpoint_is_the_best_validation_epoch(tmp_path):
    run = train.fit(quick(tmp_path, epochs=3, steps_per_epoch=4), verbose=0)
    val = run.history["val_accuracy"]
    best_epoch = int(np.argmax(val)) + 1  # the first epoch with the highest validation accuracy
    best = keras.saving.load_model(run.run_dir / "checkpoints" / "best.keras")
    chosen = keras.saving.load_model(run.run_dir / "checkpoints" / f"epoch-{best_epoch:02d}.keras")
    for a, b in zip(best.get_weights(), chosen.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # the validation scores are the validation split's, not the test split's
    validation_scores = best.evaluate(data.load("sample").validation, return_dict=True, verbose=0)
    assert validation_scores["accuracy"] == pytest.approx(max(val), abs=1e-6)


def test_the_test_split_is_read_once_per_run(tmp_path, monkeypatch):
    batches_read = []
    load = data.load

    def counting_load(*args, **kwargs):
        datasets = load(*args, **kwargs)
        count = lambda x, y: (tf.py_function(lambda: batches_read.append(1) or 0, [], tf.int64), x, y)  # noqa: E731
        datasets.test = datasets.test.map(count).map(lambda _, x, y: (x, y))
        return datasets

    monkeypatch.setattr(data, "load", counting_load)
    run = train.fit(quick(tmp_path, epochs=3, steps_per_epoch=3), verbose=0)
    assert len(batches_read) == 2  # 1,000 test digits in batches of 500: one pass, at the end
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] == run.test_accuracy
    assert metrics["validation_accuracy"] == run.history["val_accuracy"][-1]
    assert metrics["data"] == {"source": "sample", "num_train": 3500, "num_test": 1000, "num_validation": 500}


def test_validation_split_0_keeps_the_notebooks_protocol_and_says_so(tmp_path, capsys):
    argv = ["--data", "sample", "--epochs", "1", "--steps-per-epoch", "3", "--logdir", str(tmp_path),
            "--run-name", "nb", "--validation-split", "0"]
    assert cli.fit_main(argv) == 0
    out, err = capsys.readouterr()
    assert "WARNING: --validation-split 0: per-epoch scores and the best checkpoint use the test split" in err
    assert "Data: sample (4,000 train / 1,000 test)" in out and "validation accuracy" not in out
    metrics = json.loads((tmp_path / "nb" / "metrics.json").read_text())
    assert metrics["model_selection"] == "test split"
    assert metrics["test_accuracy"] == pytest.approx(metrics["validation_accuracy"], abs=1e-6)
    images = read_summaries(tmp_path / "nb" / "images")
    assert [s for s, _, _ in images["test/misclassified"]] == [0, 1]  # per epoch, and once at the end
    assert "validation/misclassified" not in images


@pytest.mark.parametrize("bad", ["-1", "1.5", "half", "0.", ""])
def test_a_bad_validation_split_is_one_line(bad, tmp_path, capsys):
    assert cli.fit_main(["--data", "sample", "--validation-split", bad, "--logdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fit.py: error: --validation-split must be auto, a count or a fraction")
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
