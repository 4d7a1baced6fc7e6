"""Deployment with TensorFlow's own tools: a serving SavedModel whose signatures have a
shape (and refuse other batches), and TensorFlow Lite files that work with the plain
Interpreter flow."""

import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import FIT, REPO, RESUME_HINT, fit_here, mount_tmpfs

from mnist_cnn import export
from mnist_cnn.cli import export as export_cli
from mnist_cnn.config import QUANTIZE
from mnist_cnn.keras_file import load_cnn


@pytest.fixture(scope="module")
def exported(exported_run, served):
    """A short real run, its model and its SavedModel (via fit.py's --export path; conftest.exported_run)."""
    return exported_run, served


@pytest.fixture(scope="module")
def digits(sample):
    _, (x, y) = sample
    return data_float(x), y


def data_float(images):
    return (images / 255.0).astype("float32")[..., None]


def test_signatures_have_a_shape_and_refuse_other_batches(exported, digits):
    _, served = exported
    loaded = tf.saved_model.load(str(served))
    for name, dtype in (("serving_default", tf.float32), ("serve_uint8", tf.uint8)):
        spec = loaded.signatures[name].structured_input_signature[1]["images"]
        assert spec.shape.as_list() == [None, 28, 28, 1] and spec.dtype == dtype, name
    x, _ = digits
    assert loaded.signatures["serving_default"](images=tf.constant(x[:3]))["probabilities"].shape == (3, 10)
    for bad in (np.zeros((3, 28, 28, 3), "float32"), np.zeros((8, 784), "float32"), x[:3, ..., 0]):
        with pytest.raises((ValueError, TypeError, tf.errors.InvalidArgumentError)):
            loaded.signatures["serving_default"](images=tf.constant(bad))  # never 9 rows for 3 images


def test_saved_model_cli_shows_the_shape_and_runs_real_digits(exported, digits, tmp_path):
    run, served = exported
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    shown = subprocess.run([*cli, "show", "--dir", str(served), "--all"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    blocks = {block.split("'")[0]: block for block in shown.stdout.split("signature_def['")[1:]}
    for name in ("serving_default", "serve_uint8"):
        inputs = blocks[name].split("outputs:")[0]
        assert "shape: (-1, 28, 28, 1)" in inputs and "unknown_rank" not in inputs, blocks[name]
    x, _ = digits
    np.save(tmp_path / "x.npy", x[:32])
    argv = [*cli, "run", "--dir", str(served), "--tag_set", "serve", "--signature_def", "serving_default",
            "--inputs", f"images={tmp_path / 'x.npy'}", "--outdir", str(tmp_path / "out")]
    ran = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    expected = load_cnn(run.model_path).predict(x[:32], verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "probabilities.npy"), expected, atol=1e-5)


def tflite_accuracy(content: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """The ordinary Interpreter flow: allocate_tensors() with no resize, set, invoke, get."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's own deprecation notice
        interpreter = tf.lite.Interpreter(model_content=content)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert list(inp["shape"]) == [1, 28, 28, 1] and inp["dtype"] == np.float32
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["images"], "outputs": ["probabilities"]}}
    predicted = []
    for image in x:
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        predicted.append(int(interpreter.get_tensor(out["index"])[0].argmax()))
    return float((np.array(predicted) == y).mean())


def test_tensorflow_lite_float_dynamic_and_int8(exported, digits, tmp_path, capsys):
    run, _ = exported
    x, y = digits  # the sample's held-out digits
    x, y = x[:400], y[:400]
    keras_accuracy = float((load_cnn(run.model_path).predict(x, verbose=0).argmax(1) == y).mean())
    sizes = {}
    for quantize in QUANTIZE:
        path = tmp_path / f"cnn-{quantize}.tflite"
        argv = [str(run.model_path), str(tmp_path / f"saved-{quantize}"), "--tflite", str(path), "--quantize", quantize]
        assert export_cli.main(argv) == 0
        assert f"TensorFlow Lite ({quantize}): {path}" in capsys.readouterr().out
        sizes[quantize] = path.stat().st_size
        accuracy = tflite_accuracy(path.read_bytes(), x, y)
        if quantize in ("none", "dynamic"):
            assert abs(accuracy - keras_accuracy) <= 0.005, (quantize, accuracy, keras_accuracy)
        else:
            assert accuracy >= keras_accuracy - 0.02, (accuracy, keras_accuracy)
    assert sizes["dynamic"] < 0.3 * sizes["none"] and sizes["int8"] < 0.3 * sizes["none"]


def test_export_writes_numbered_versions_for_tensorflow_serving(exported, tmp_path, capsys):
    run, _ = exported
    base = tmp_path / "models"
    for version in (1, 2):
        assert export_cli.main([str(run.model_path), str(base)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"SavedModel for serving: {base / str(version)}"
        assert out[1] == f"serve it with: mnist-cnn-serve {base.absolute()}"  # installed with the package
        assert out[2] == (f"serve it with: tensorflow_model_server --rest_api_port=8501 --model_name=mnist "
                          f"--model_base_path={base.absolute()}")
    assert export_cli.main([str(run.model_path), str(base), "--version", "7"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in base.iterdir()) == ["1", "2", "7"]  # no staging left behind
    assert (base / "7" / "saved_model.pb").is_file()
    assert export_cli.main([str(run.model_path), str(base), "--version", "2"]) == 2  # taken: never overwritten
    assert "version 2 exists" in capsys.readouterr().err
    for bad in ("0", "-1", "x", "1.5", str(2**63), "99999999999999999999"):  # TF Serving's versions: int64
        assert export_cli.main([str(run.model_path), str(base), "--version", bad]) == 2
        assert "argument --version: expected a whole number" in capsys.readouterr().err
    assert sorted(p.name for p in base.iterdir()) == ["1", "2", "7"]
    assert export_cli.main([str(run.model_path), str(base), "--version", str(2**63 - 1)]) == 0
    capsys.readouterr()
    assert export_cli.main([str(run.model_path), str(base)]) == 2  # one past int64 does not exist
    assert "the highest TensorFlow Serving reads" in capsys.readouterr().err
    assert sorted(p.name for p in base.iterdir()) == ["1", "2", "7", str(2**63 - 1)]
    (base / "file").write_text("x")
    assert export_cli.main([str(run.model_path), str(base / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_export_checks_the_tflite_file_before_writing_anything(exported, tmp_path, capsys):
    run, _ = exported
    (tmp_path / "taken.tflite").write_bytes(b"mine")
    (tmp_path / "folder.tflite").mkdir()
    for tflite, message in ((tmp_path / "taken.tflite", "already exists"),
                            (tmp_path / "folder.tflite", "already exists"),
                            (tmp_path / "missing" / "cnn.tflite", "no folder"),
                            ("", "needs a file name")):
        assert export_cli.main([str(run.model_path), str(tmp_path / "out"), "--tflite", str(tflite)]) == 2
        assert message in capsys.readouterr().err, tflite
        assert not (tmp_path / "out").exists()  # nothing written: the corrected command still works
    assert (tmp_path / "taken.tflite").read_bytes() == b"mine"


def test_export_refuses_an_unknown_quantization_and_an_existing_file(exported, tmp_path, capsys):
    run, _ = exported
    argv = [str(run.model_path), str(tmp_path / "a"), "--tflite", "x.tflite", "--quantize", "int4"]
    assert export_cli.main(argv) == 2
    assert "argument --quantize: invalid choice: 'int4'" in capsys.readouterr().err
    taken = tmp_path / "taken.tflite"
    taken.write_bytes(b"mine")
    with pytest.raises(export.UsageError, match="already exists"):
        export.export_tflite(keras.saving.load_model(run.model_path), taken)
    assert taken.read_bytes() == b"mine"


def test_the_installed_export_command_prints_no_converter_lines(exported, tmp_path):
    """The TensorFlow Lite converter logs eleven lines of its own while it reads the SavedModel back;
    an installed command filters them as it does TensorFlow's start-up lines."""
    run, _ = exported
    command = Path(sys.executable).parent / "mnist-cnn-export"
    if not command.exists():
        pytest.skip(f"mnist-cnn-export is not installed beside {sys.executable} (pip install -e .)")
    proc = subprocess.run([command, run.model_path, tmp_path / "out", "--tflite", tmp_path / "cnn.tflite"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    assert (tmp_path / "cnn.tflite").stat().st_size > 1_000_000


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs: a SavedModel of the CNN (13 MB of variables) cannot fit."""
    disk = mount_tmpfs(tmp_path / "disk", "2m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_export_on_a_full_disk_is_one_stopped_line_and_leaves_no_staging(exported, tiny_disk):
    run, _ = exported
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), str(run.model_path),
                           str(tiny_disk / "models")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr == (f"export.py: stopped: cannot write the SavedModel in {tiny_disk / 'models'}: "
                           f"No space left on device\n"), proc.stderr[-3000:]  # one line: TensorFlow's two are ours
    assert list((tiny_disk / "models").iterdir()) == []  # the staging folder is gone, no version published


def test_fit_export_on_a_full_disk_stops_resumably_and_the_resume_exports(tmp_path, tiny_disk):
    args = ["--data", "sample", "--epochs", "1", "--steps-per-epoch", "2", "--logdir", str(tmp_path / "logs"),
            "--run-name", "r", "--export", str(tiny_disk / "models")]
    proc = subprocess.run([*FIT, *args], capture_output=True, text=True, timeout=300)
    run_dir = tmp_path / "logs" / "r"
    last = proc.stderr.splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("fit.py: stopped: cannot write the SavedModel in "), proc.stderr
    assert "No space left on device" in last and last.endswith(f"{RESUME_HINT} {run_dir}")
    assert not (run_dir / "metrics.json").exists() and (run_dir / "resume.json").is_file()
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    proc = fit_here("--resume", run_dir)  # in this process
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tiny_disk / "models" / "1" / "saved_model.pb").is_file() and (run_dir / "metrics.json").is_file()
