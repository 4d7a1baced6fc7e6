"""Honest results: model selection on a validation split, the test split scored once,
and a CNN that behaves like any Keras model (save/load, freezing, export, input forms)."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, quick, read_summaries

from mnist_cnn import CNN, data, train
from mnist_cnn.cli import fit as fit_cli


def test_the_best_checkpoint_is_the_best_validation_epoch(tmp_path):
    run = train.fit(quick(tmp_path, epochs=3, steps_per_epoch=4, keep_checkpoints=3), verbose=0)
    val = run.history["val_accuracy"]
    best_epoch = int(np.argmax(val)) + 1  # the first epoch with the highest validation accuracy
    best = keras.saving.load_model(run.run_dir / "checkpoints" / "best.keras")
    chosen = keras.saving.load_model(run.run_dir / "checkpoints" / f"epoch-{best_epoch:02d}.keras")
    for a, b in zip(best.get_weights(), chosen.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # the validation scores are the validation split's, not the test split's
    best.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])  # run files hold no training state
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
    assert fit_cli.main(argv) == 0
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
    assert fit_cli.main(["--data", "sample", "--validation-split", bad, "--logdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fit.py: error: --validation-split must be auto, a count or a fraction")
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# -- the CNN as a stock Keras model ----------------------------------------------------


def compiled_cnn(**kwargs):
    model = CNN(**kwargs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def trainable_count(model):
    return len(model.trainable_weights)


def test_summary_counts_every_weight_before_any_call():
    lines = []
    CNN().summary(print_fn=lambda line, **_: lines.append(line))
    text = "\n".join(lines)
    assert "3,274,634" in text and "unbuilt" not in text


def test_freezing_survives_save_and_load(tmp_path, tiny):
    x, y = tiny
    model = compiled_cnn()
    model.conv1.trainable = model.conv2.trainable = False
    assert trainable_count(model) == 4
    model.fit(x[:50], y[:50], verbose=0)
    model.save(tmp_path / "frozen.keras")
    loaded = keras.saving.load_model(tmp_path / "frozen.keras")
    assert trainable_count(loaded) == 4
    assert not loaded.conv1.trainable and not loaded.conv2.trainable and loaded.dense1.trainable


def test_a_frozen_cnn_nested_in_a_functional_model_stays_frozen(tmp_path, tiny):
    x, y = tiny
    inputs = keras.Input((28, 28, 1))
    inner = CNN()
    inner.trainable = False
    outer = keras.Model(inputs, keras.layers.Dense(2)(inner(inputs)))
    outer.save(tmp_path / "outer.keras")
    loaded = keras.saving.load_model(tmp_path / "outer.keras")
    assert trainable_count(loaded) == 2  # the Dense layer's kernel and bias only
    cnn = next(layer for layer in loaded.layers if isinstance(layer, CNN))
    before = [w.copy() for w in cnn.get_weights()]
    loaded.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    loaded.fit(x[:100], (y[:100] % 2), epochs=1, verbose=0)
    for a, b in zip(before, cnn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_model_loaded_from_a_run_exports_with_keras(tmp_path, tiny):
    run = train.fit(quick(tmp_path, epochs=1, steps_per_epoch=2), verbose=0)
    loaded = keras.saving.load_model(run.model_path)
    loaded.export(tmp_path / "exported", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "exported"))
    x, _ = tiny
    np.testing.assert_allclose(served.serve(x[:5]).numpy(), loaded.predict(x[:5], verbose=0), atol=1e-5)
    built_then_called = CNN()
    built_then_called.build()
    built_then_called(x[:2])
    built_then_called.export(tmp_path / "second", verbose=False)
    assert (tmp_path / "second" / "saved_model.pb").is_file()


def test_both_input_forms_give_the_same_probabilities(tiny):
    x, _ = tiny
    model = CNN()
    four = model.predict(x[:7], verbose=0)
    three = model.predict(x[:7, ..., 0], verbose=0)  # (N, 28, 28)
    np.testing.assert_array_equal(three, four)
    np.testing.assert_array_equal(model(x[:3, ..., 0]), model(x[:3]))
    functional = keras.Model(inputs := keras.Input((28, 28)), CNN()(inputs))
    assert functional.output_shape == (None, 10)


@pytest.mark.parametrize("dtype", ["uint8", "int32"])
def test_integer_images_are_refused_with_the_fix(dtype, tiny):
    x, _ = tiny
    with pytest.raises(ValueError, match=f"CNN takes float images scaled to \\[0, 1\\]; got {dtype}: divide 0-255"):
        CNN().predict((x[:4] * 255).astype(dtype), verbose=0)


@pytest.mark.parametrize("shape", [(3, 28, 28, 3), (8, 784), (2, 14, 14, 1)])
def test_other_shapes_are_refused_never_reshaped(shape):
    with pytest.raises(ValueError, match=re.escape(f"got input of shape {shape}")):
        CNN()(np.zeros(shape, "float32"))


# -- other Keras backends: inference yes, training no ----------------------------------------

JAX_CHILD = """
import json, sys
import numpy as np
import keras
from mnist_cnn.keras_file import load_cnn

model = load_cnn(sys.argv[1])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
x, y = np.load(sys.argv[2]), np.load(sys.argv[3])
out = {"backend": keras.backend.backend(), "probs": model.predict(x, verbose=0).tolist(),
       "scores": model.evaluate(x, y, return_dict=True, verbose=0)}
try:
    model.fit(x, y, epochs=1, verbose=0)
except Exception as e:
    out["fit"] = str(e)
print("RESULT " + json.dumps(out))
"""


def jax_env():
    pytest.importorskip("jax", reason="the dev extra installs jax (CPU) for this test")
    return {**os.environ, "KERAS_BACKEND": "jax"}


def test_a_tensorflow_trained_model_predicts_the_same_under_jax(tmp_path, sample):
    env = jax_env()
    run = train.fit(quick(tmp_path, epochs=1, steps_per_epoch=20), verbose=0)
    _, (x, y) = sample
    x, y = (x[:64, ..., None] / 255.0).astype("float32"), y[:64].astype("int32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    argv = [sys.executable, "-c", JAX_CHILD, str(run.model_path), tmp_path / "x.npy", tmp_path / "y.npy"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["backend"] == "jax"
    model = keras.saving.load_model(run.model_path)
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    # float32 through two kernel libraries (XLA's under JAX, oneDNN's or Eigen's under TensorFlow) agrees to
    # rounding (2.3e-6 seen); a wrong weight, layout or missing layer would be off by 1e-2 or more
    probs, jax_probs = model.predict(x, verbose=0), np.array(result["probs"])
    np.testing.assert_allclose(jax_probs, probs, atol=1e-4)
    top2 = np.sort(probs, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3  # where rounding cannot swap the top two
    assert clear.sum() >= 60 and (jax_probs.argmax(1) == probs.argmax(1))[clear].all()
    tf_scores = model.evaluate(x, y, return_dict=True, verbose=0)
    assert result["scores"]["loss"] == pytest.approx(tf_scores["loss"], rel=1e-4)
    assert result["fit"] == ("training a CNN needs KERAS_BACKEND=tensorflow (this process runs jax); "
                             "inference works under any backend")


@pytest.mark.parametrize("script", ["fit.py", "tutorial_loop.py"])
def test_training_scripts_refuse_another_backend_before_anything_is_made(script, tmp_path):
    """... and before Keras or that backend loads: the refusal is decided as Keras would decide."""
    watched = ("import atexit, runpy, sys\n"  # the script, and what it has loaded when it exits
               "atexit.register(lambda: print('loaded:', sorted({'keras', 'jax'} & set(sys.modules))))\n"
               "sys.argv[:] = sys.argv[1:]\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", watched, REPO / "scripts" / script, "--data", "sample"],
                          capture_output=True, text=True, env=jax_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout.strip() == "loaded: []"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"{script}: error: {script} needs KERAS_BACKEND=tensorflow (this process runs jax); "
        "inference works under any backend")
    assert list(tmp_path.iterdir()) == []  # no logs/ folder
