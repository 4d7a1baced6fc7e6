"""Bad input an adversarial user tried: tampered models, hostile images and IDX files,
broken config.json files and out-of-range flags. Each is one line and exit status 2,
caught before anything is written."""

import dataclasses
import gzip
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO, StopAfter, fit_here, run_measured, snapshot, write_folder
from PIL import Image

from mnist_cnn import CNN, export, idx, predict, train
from mnist_cnn.cli import evaluate as evaluate_cli
from mnist_cnn.cli import export as export_cli
from mnist_cnn.cli import fit as fit_cli
from mnist_cnn.cli import predict as predict_cli
from mnist_cnn.errors import Interrupted, ModelFileError
from mnist_cnn.idx import IDXError
from mnist_cnn.keras_file import load_cnn


def one_line_error(capsys, prog="fit.py"):
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err


# -- tampered model files -----------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory, sample):
    """A CNN trained for a few steps (so its weights are not the initial ones), saved."""
    folder = tmp_path_factory.mktemp("tamper")
    (x, y), _ = sample
    model = CNN()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:500, ..., None] / 255.0, y[:500], batch_size=50, epochs=1, verbose=0)
    model.save(folder / "good.keras")
    return folder


def rewrite(source, target, edit_config=None, edit_weights=None):
    """Copy a .keras zip, editing its config.json (a dict) or its weights (an h5py.File)."""
    import h5py

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for name in zin.namelist():
            payload = zin.read(name)
            if name == "config.json" and edit_config:
                config = json.loads(payload)
                edit_config(config)
                payload = json.dumps(config).encode()
            if name == "model.weights.h5" and edit_weights:
                buffer = io.BytesIO(payload)
                with h5py.File(buffer, "r+") as store:
                    edit_weights(store)
                payload = buffer.getvalue()
            zout.writestr(name, payload)
    return target


TAMPERING = {
    "build_config shape": (
        dict(edit_config=lambda c: c.update(build_config={"input_shape": [None, 10]})),
        "build_config input shape [None, 10] is not the CNN's"),
    "build_config garbage": (
        dict(edit_config=lambda c: c.update(build_config={"shapes_dict": {"x": "nonsense"}})),
        "build_config input shape 'nonsense'"),
    "dense_units 1e9": (
        dict(edit_config=lambda c: c["config"].update(dense_units=10**9)), "dense_units=1000000000 is outside 1-16384"),
    "kernel_size text": (
        dict(edit_config=lambda c: c["config"].update(kernel_size="5")), "kernel_size='5' is outside 1-28"),
    "missing weight": (dict(edit_weights=lambda h: h.__delitem__("dense1/vars/0")), None),
    "weight of another shape": (
        dict(edit_weights=lambda h: (h.__delitem__("dense2/vars/1"),
                                     h.create_dataset("dense2/vars/1", data=np.ones(3)))),
        None,
    ),
}


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_a_tampered_model_file_is_refused(saved, kind, tmp_path, capsys):
    edits, message = TAMPERING[kind]
    path = rewrite(saved / "good.keras", tmp_path / "tampered.keras", **edits)
    with pytest.raises(ModelFileError, match=re.escape(message) if message else ".") as caught:
        load_cnn(path)
    assert str(path) in str(caught.value)
    assert "another size" not in str(caught.value)
    assert evaluate_cli.main([str(path), "--data", "sample"]) == 2
    err = one_line_error(capsys, "evaluate.py")
    assert "test accuracy" not in capsys.readouterr().out
    argv = ["--data", "sample", "--dry-run", "--init-from", str(path), "--logdir", str(tmp_path / "l")]
    assert fit_cli.main(argv) == 2
    assert one_line_error(capsys).split(": error: ")[1] == err.split(": error: ")[1]  # the same reason
    assert not (tmp_path / "l").exists()


def peak_of(call) -> int:
    """Bytes Python (and NumPy) allocated at the peak of ``call()``, which must raise ModelFileError."""
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError) as raised:
            call()
        return tracemalloc.get_traced_memory()[1], str(raised.value)
    finally:
        tracemalloc.stop()


def test_a_config_json_larger_than_its_zip_header_says_is_refused_without_reading_it(saved, tmp_path):
    path = tmp_path / "lying.keras"
    with zipfile.ZipFile(saved / "good.keras") as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            payload = zin.read(name)
            if name == "config.json":
                payload = payload[:-1] + b" " * (200 << 20) + payload[-1:]  # 200 MB of spaces: valid JSON
            zout.writestr(name, payload)
    data = bytearray(path.read_bytes())  # the header then claims 2,000 bytes
    for header in (b"PK\x03\x04", b"PK\x01\x02"):
        at = data.find(header + b"", 0)
        while at != -1:
            name_at = at + (30 if header == b"PK\x03\x04" else 46)
            if data[name_at:name_at + 11] == b"config.json":
                size_at = at + (22 if header == b"PK\x03\x04" else 24)
                data[size_at:size_at + 4] = struct.pack("<I", 2000)
            at = data.find(header, at + 4)
    path.write_bytes(bytes(data))
    peak, message = peak_of(lambda: load_cnn(path))
    assert "cannot read the model file" in message or "over 1,048,576 bytes" in message, message
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB to refuse it"


def test_a_config_json_nested_too_deep_is_one_line(saved, tmp_path):
    path = tmp_path / "deep.keras"
    with zipfile.ZipFile(saved / "good.keras") as zin, zipfile.ZipFile(path, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, ("[" * 100_000 + "]" * 100_000).encode() if name == "config.json" else zin.read(name))
    with pytest.raises(ModelFileError, match="cannot read the model file \\(RecursionError"):
        load_cnn(path)


def test_weights_padded_past_what_the_config_needs_are_refused_before_reading(saved, tmp_path):
    path = tmp_path / "padded.keras"
    with zipfile.ZipFile(saved / "good.keras") as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            if name != "model.weights.h5":
                zout.writestr(name, zin.read(name))
                continue
            with zout.open(name, "w", force_zip64=True) as f:
                f.write(zin.read(name))
                for _ in range(300):  # 300 MiB of zeros: a few hundred KB in the zip
                    f.write(bytes(1 << 20))
    with zipfile.ZipFile(path) as archive:  # 300 MiB more inside than on disk
        assert archive.getinfo("model.weights.h5").file_size - path.stat().st_size > 250 << 20
    peak, message = peak_of(lambda: load_cnn(path))
    assert "model.weights.h5 is 3" in message and "at most" in message, message
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB to refuse it"


def test_a_config_inside_the_bounds_but_too_big_in_total_is_refused_before_allocating(saved, tmp_path):
    path = rewrite(saved / "good.keras", tmp_path / "huge.keras",
                   edit_config=lambda c: c["config"].update(filters2=1024, dense_units=16384))
    peak, message = peak_of(lambda: load_cnn(path))
    assert "a CNN of 823,084,874 parameters" in message, message
    assert "at most 50,000,000 are built" in message
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB to refuse it"


def test_a_weight_whose_stored_shape_is_huge_is_refused_from_its_metadata(saved, tmp_path):
    """The issue's file: conv1's kernel replaced by a chunked, never-written dataset of 2^28 floats
    (the file stays ~13 MB; Keras would allocate 1 GB for it, and the command peaked at ~3.7 GB).
    Refused from HDF5's metadata, the command peaks where the refusal of a small wrong-shaped
    weight does (measured: 625 MB against 3,983 MB before the check)."""
    huge = rewrite(saved / "good.keras", tmp_path / "huge-weight.keras", edit_weights=lambda h: (
        h.__delitem__("conv1/vars/0"), h.create_dataset("conv1/vars/0", shape=(2**28,), dtype="float32",
                                                         chunks=(1 << 16,))))
    small = rewrite(saved / "good.keras", tmp_path / "small-weight.keras", edit_weights=lambda h: (
        h.__delitem__("conv1/vars/0"), h.create_dataset("conv1/vars/0", data=np.ones(3, np.float32))))
    assert huge.stat().st_size < 64 << 20  # (this one keeps its optimizer state too)
    evaluate = [sys.executable, str(REPO / "scripts" / "evaluate.py")]
    (refused, peak), (other, baseline) = run_measured([*evaluate, huge]), run_measured([*evaluate, small])
    for proc, path in ((refused, huge), (other, small)):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.splitlines()[-1] == (f"evaluate.py: error: {path}: stored array conv1/vars/0 is float32 "
                                                f"{(2**28,) if path == huge else (3,)}, not one of the model's weights")
    assert peak < baseline + 150, f"{peak:.0f} MB to refuse it, {baseline:.0f} MB for a small wrong weight"


def test_the_untouched_model_file_loads_with_its_own_weights(saved):
    model = load_cnn(saved / "good.keras")
    reference = keras.saving.load_model(saved / "good.keras")
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# -- predict.py on images as people make them ---------------------------------------------


@pytest.fixture(scope="module")
def reader(exported_run):
    """The session's trained CNN (conftest.exported_run): it reads each of the digits below with a
    probability of 0.91 or more, and none other above 0.09."""
    return load_cnn(exported_run.model_path)


def digits(sample, count=6):
    _, (x, y) = sample
    picks = [int(np.flatnonzero(y == d)[0]) for d in range(count)]
    return x[picks], y[picks]


def test_predict_reads_16_bit_paper_and_canvas_exports(reader, sample, tmp_path):
    """16-bit dark-on-light scans and ink-on-transparency canvas exports read as the
    same digits as plain 8-bit files of the same pictures (and mostly correctly)."""
    images, labels = digits(sample)
    kinds = {"plain8": [], "scan16": [], "canvas": []}
    for i, image in enumerate(images):
        big = np.kron(image, np.ones((4, 4), np.uint8))  # 112 x 112, like a scan
        Image.fromarray(255 - big).save(tmp_path / f"plain8-{i}.png")
        paper16 = (65535 - big.astype(np.uint32) * 200).astype(np.uint16)  # dark ink on light paper, 16-bit
        Image.fromarray(paper16).save(tmp_path / f"scan16-{i}.png")
        rgba = np.zeros((*big.shape, 4), np.uint8)
        rgba[..., 3] = big  # black ink, alpha = ink, transparent elsewhere
        Image.fromarray(rgba, "RGBA").save(tmp_path / f"canvas-{i}.png")
        for kind in kinds:
            kinds[kind].append(str(tmp_path / f"{kind}-{i}.png"))
    assert Image.open(kinds["scan16"][0]).mode.startswith("I")  # really a 16-bit file
    read = {kind: [o[0][0] for _, o in predict.predict_files(reader, paths)] for kind, paths in kinds.items()}
    assert read["scan16"] == read["plain8"] and read["canvas"] == read["plain8"], read
    assert sum(int(a == b) for a, b in zip(read["plain8"], labels, strict=True)) >= 5, (read, labels)


def test_a_decompression_bomb_is_one_bad_file_and_the_others_are_read(reader, sample, tmp_path):
    bomb, large = tmp_path / "bomb.png", tmp_path / "large.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 megapixels, a few hundred KB on disk
    Image.new("1", (7000, 7000)).save(large)  # 49 megapixels: under Pillow's limit, over ours
    images, labels = digits(sample, 2)
    good = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"d{i}.png")
        good.append(str(tmp_path / f"d{i}.png"))
    outcomes = dict(predict.predict_files(reader, [good[0], str(bomb), str(large), good[1]]))
    assert "refused as a decompression bomb" in outcomes[str(bomb)]
    assert "7000x7000 pixels, more than the 40,000,000 this reads" in outcomes[str(large)]
    assert [outcomes[g][0][0] for g in good] == [int(v) for v in labels]


@pytest.mark.parametrize("top", ["-1", "0", "11", "x"])
def test_predict_top_outside_1_to_10_is_a_usage_error(top, tmp_path, capsys):
    assert predict_cli.main([str(tmp_path / "m.keras"), "x.png", "--top", top]) == 2
    assert "argument --top: expected a whole number from 1 to 10" in one_line_error(capsys, "predict.py")


# -- IDX files ----------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_zero_images_are_refused_before_a_run_folder_exists(split, saved, tmp_path, capsys):
    folder = tmp_path / "data"
    write_folder(folder)
    idx.write_idx(folder / idx.FILE_STEMS[(split, "images")], np.zeros((0, 28, 28)))
    idx.write_idx(folder / idx.FILE_STEMS[(split, "labels")], np.zeros(0))
    assert fit_cli.main(["--data", str(folder), "--logdir", str(tmp_path / "logs")]) == 2
    assert "holds 0 items; a split needs at least one" in one_line_error(capsys)
    assert not (tmp_path / "logs").exists()
    if split == "test":
        assert evaluate_cli.main([str(saved / "good.keras"), "--data", str(folder)]) == 2
        assert "holds 0 items" in one_line_error(capsys, "evaluate.py")


def test_a_gzip_bomb_is_refused_without_decompressing_it(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    zeros = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, 10))
        for _ in range(256):  # 256 MiB of zeros behind a 10-label header
            f.write(zeros)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(IDXError, match="has trailing bytes: header says shape \\(10,\\)"):
            idx.read_idx(path, ndim=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated to read a 10-label file"


def test_dimensions_whose_product_overflows_are_refused(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(struct.pack(">HBB3I", 0, 8, 3, 2**32 - 1, 2**32 - 1, 2**32 - 1) + bytes(100))
    with pytest.raises(IDXError, match="more than the 2,147,483,648 bytes an IDX file may hold"):
        idx.read_idx(path)
    with pytest.raises(IDXError, match="images are 4294967295x4294967295, expected 28x28"):
        idx.read_idx(path, ndim=3, item_shape=(28, 28))


# -- config.json and flags ----------------------------------------------------------------


@pytest.fixture
def unfinished_run(tmp_path):
    """A run folder as a process killed in its first epoch leaves it: config.json only."""
    config = train.TrainConfig(data="sample", epochs=1, steps_per_epoch=2, logdir=str(tmp_path), run_name="r")
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return run_dir


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(epochs="abc"), "epochs must be int, got 'abc'"),
        (lambda c: c.update(epochs=2.5), "epochs must be int, got 2.5"),
        (lambda c: c.update(augment="yes"), "augment must be bool, got 'yes'"),
        (lambda c: c.update(steps_per_epoch=True), "steps_per_epoch must be int or null, got True"),
        (lambda c: c.update(surprise=1), "unknown field(s) surprise"),
        (lambda c: c.update(seed=-1), "--seed must be in [0, 4294967295], got -1"),
    ],
)
def test_a_broken_config_json_is_one_line_on_resume(unfinished_run, edit, message, capsys):
    config = json.loads((unfinished_run / "config.json").read_text())
    edit(config)
    (unfinished_run / "config.json").write_text(json.dumps(config))
    before = snapshot(unfinished_run)
    assert fit_cli.main(["--resume", str(unfinished_run)]) == 2
    assert message in one_line_error(capsys)
    assert snapshot(unfinished_run) == before  # not even an event file


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def killed_after_one(tmp_path_factory):
    """A run of 3 epochs killed after its first: its real history.json and resume.json (trained once)."""
    logdir = tmp_path_factory.mktemp("killed")
    config = train.TrainConfig(data="sample", epochs=3, steps_per_epoch=2, logdir=str(logdir), run_name="r")
    with pytest.raises(Interrupted):
        train.fit(config, verbose=0, callbacks=[StopAfter(1)])
    return logdir / "r"


@pytest.fixture
def one_epoch_run(killed_after_one, tmp_path):
    """A copy of ``killed_after_one`` for a test to break."""
    return Path(shutil.copytree(killed_after_one, tmp_path / "r"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("history.json", "", "history.json: not a history file (JSONDecodeError"),
        ("history.json", "garbage", "history.json: not a history file"),
        ("history.json", "{}", "history.json: expected a list of epochs, got dict"),
        ("history.json", '[{"loss": 1.0}]', "history.json: entry 0 is not epoch 0's record"),
        ("history.json", '[{"epoch": 0, "loss": "x"}]', "entry 0 holds a value that is not a finite number"),
        ("history.json", DEEP, "history.json: not a history file (RecursionError"),
        ("resume.json", '{"epochs": "1", "steps": 2, "checkpoint": "checkpoints/resume-01.keras"}',
         "epochs must be a whole number from 1 to 3, got '1'"),
        ("resume.json", '{"epochs": -1, "steps": 2, "checkpoint": "checkpoints/resume-01.keras"}',
         "epochs must be a whole number from 1 to 3, got -1"),
        ("resume.json", '{"epochs": 99, "steps": 2, "checkpoint": "checkpoints/resume-01.keras"}',
         "epochs must be a whole number from 1 to 3, got 99"),
        ("resume.json", '{"epochs": 1, "steps": 0, "checkpoint": "checkpoints/resume-01.keras"}',
         "steps must be a whole number of at least one per epoch"),
        ("resume.json", '{"epochs": 1, "steps": 2, "checkpoint": "../../etc/passwd"}',
         "checkpoint must be checkpoints/resume-01.keras"),
        ("resume.json", DEEP, "resume.json: not a resume state (RecursionError"),
        ("resume.json", "[]", "resume.json: expected a JSON object, got list"),
        ("config.json", DEEP, "config.json: not a run config (RecursionError"),
    ],
)
def test_a_broken_run_file_is_one_line_and_changes_nothing(one_epoch_run, name, content, message, capsys):
    (one_epoch_run / name).write_text(content)
    before = snapshot(one_epoch_run)
    assert fit_cli.main(["--resume", str(one_epoch_run)]) == 2
    assert message in one_line_error(capsys)
    assert snapshot(one_epoch_run) == before


def test_config_json_that_is_a_folder_is_one_line(unfinished_run, capsys):
    (unfinished_run / "config.json").unlink()
    (unfinished_run / "config.json").mkdir()
    assert fit_cli.main(["--resume", str(unfinished_run)]) == 2
    assert "config.json: a folder; a run config must be a regular file" in one_line_error(capsys)


def test_an_unfinished_run_resumes_from_its_config_alone(unfinished_run):
    proc = fit_here("--resume", unfinished_run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "after epoch 0 of 1 (no epoch had finished)" in proc.stdout
    assert (unfinished_run / "metrics.json").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "-1"], "--seed: must be in [0, 4294967295]"),
        (["--seed", "99999999999999999999"], "--seed: must be in [0, 4294967295]"),
        (["--data", ""], "--data must be auto, tfds, sample or a folder of IDX files, got ''"),
        (["--run-name", "r" * 256], "--run-name rrrr"),
        (["--export", "e" * 250], "--export eeee"),
    ],
)
def test_out_of_range_flags_are_one_line_before_anything_is_written(argv, message, tmp_path, capsys):
    logs = tmp_path / "logs"
    assert fit_cli.main(["--data", "sample", "--dry-run", "--logdir", str(logs), *argv]) == 2
    err = one_line_error(capsys)
    assert message in err
    if "--run-name" in argv or "--export" in argv:
        assert "name too long" in err
    assert not logs.exists()


def test_export_script_refuses_a_name_too_long(saved, tmp_path, capsys):
    assert export_cli.main([str(saved / "good.keras"), str(tmp_path / ("e" * 250))]) == 2
    assert "name too long" in one_line_error(capsys, "export.py")
    assert list(tmp_path.iterdir()) == []


def test_export_has_the_usual_permissions_and_clears_a_killed_attempt(saved, tmp_path):
    base = tmp_path / "served"
    partial = base / ".export-0123.partial"  # left by an export killed a day ago
    partial.mkdir(parents=True)
    (partial / "junk").write_bytes(b"left by a killed export")
    os.utime(partial, (time.time() - 2 * 86400,) * 2)
    old = os.umask(0o022)
    try:
        target = export.export_savedmodel(load_cnn(saved / "good.keras"), base)
    finally:
        os.umask(old)
    assert target == base / "1" and not partial.exists()
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)
    assert oct((target / "saved_model.pb").stat().st_mode & 0o777) == oct(0o644)
    assert all(p.stat().st_mode & 0o004 for p in target.rglob("*"))  # others can read everything


def test_scripts_print_no_traceback_for_a_tampered_model(saved, tmp_path):
    path = rewrite(saved / "good.keras", tmp_path / "t.keras",
                   edit_config=lambda c: c.update(build_config={"input_shape": [None, 10]}))
    for script in ("evaluate.py", "predict.py", "export.py"):
        extra = {"evaluate.py": ["--data", "sample"], "predict.py": ["x.png"], "export.py": [str(tmp_path / "o")]}
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), str(path), *extra[script]],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (script, proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert "Traceback" not in proc.stderr and last.startswith(f"{script}: error: {path}: "), script
        assert "is not the CNN's (None, 28, 28, 1)" in last, script
