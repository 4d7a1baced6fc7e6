"""keras_file: .keras archives cost what they really hold, wherever they load -- members counted
as they inflate, members Keras would unpack refused before it does, a config's sizes bounded
in CNN.from_config (so raw keras.saving.load_model is bounded too). Peaks are the child
process's resident memory (ru_maxrss), which counts what C code allocates."""

import json
import os
import re
import struct
import sys
import zipfile

import pytest
from conftest import REPO, run_measured

from mnist_cnn.keras_file import save_model
from mnist_cnn.model import CNN

pytestmark = pytest.mark.slow
EVALUATE = [sys.executable, str(REPO / "scripts" / "evaluate.py")]
PEAK_MB = 1200  # TensorFlow's own ~0.9 GB included


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("keras_file") / "model.keras", CNN())


def copy_with(source, target, replace=None, extra=()):
    """``source``'s members into ``target``, ``replace[name]`` (bytes, or a function writing into
    the member's stream) instead of a member, and ``extra`` (name, bytes) members added."""
    replace = replace or {}
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            payload = replace.get(name, zin.read(name))
            if callable(payload):
                with zout.open(name, "w", force_zip64=False) as f:
                    payload(f)
            else:
                zout.writestr(name, payload)
        for name, payload in extra:
            zout.writestr(name, payload)
    return target


def claim_size(path, member: bytes, size: int) -> None:
    """Make both zip headers of ``member`` claim ``size`` inflated bytes."""
    data = bytearray(path.read_bytes())
    for header, name_at, size_at in ((b"PK\x03\x04", 30, 22), (b"PK\x01\x02", 46, 24)):
        at = data.find(header)
        while at != -1:
            if data[at + name_at:at + name_at + len(member)] == member:
                data[at + size_at:at + size_at + 4] = struct.pack("<I", size)
            at = data.find(header, at + 4)
    path.write_bytes(bytes(data))


def zeros(megabytes: int):
    def write(f):
        block = bytes(1 << 20)
        for _ in range(megabytes):
            f.write(block)
    return write


def test_a_weights_member_that_inflates_past_its_header_is_refused_at_no_cost(model_file, tmp_path):
    """The issue's file: a weights member whose zip header says 13 MB and which inflates to
    ~0.7 GB (1.09 GB in the issue; 3 GB peak through evaluate before 'Bad CRC-32')."""
    path = copy_with(model_file, tmp_path / "bomb.keras", {"model.weights.h5": zeros(700)})
    claim_size(path, b"model.weights.h5", 13 << 20)
    assert path.stat().st_size < 2 << 20
    proc, peak = run_measured([*EVALUATE, path, "--data", "sample"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{path}: cannot read the model file" in proc.stderr or "inflates past" in proc.stderr, proc.stderr
    assert peak < PEAK_MB, f"peak {peak:.0f} MB"


def test_members_keras_would_unpack_are_refused_before_it_does(model_file, tmp_path):
    """Extra members (the issue: 8 of 250 MiB, unpacked into /tmp on every load) are refused by
    name, before Keras sees the file: nothing lands in TMPDIR."""
    path = copy_with(model_file, tmp_path / "extra.keras",
                     extra=[(f"assets/blob{i}.bin", bytes(1 << 20)) for i in range(8)])
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc, peak = run_measured([*EVALUATE, path, "--data", "sample"], env={**os.environ, "TMPDIR": str(scratch)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "the archive holds assets/blob0.bin, assets/blob1.bin, assets/blob2.bin ..." in proc.stderr
    assert "a .keras model file holds only config.json, metadata.json, model.weights.h5" in proc.stderr
    assert list(scratch.iterdir()) == []


def test_metadata_over_its_bound_is_refused(model_file, tmp_path):
    path = copy_with(model_file, tmp_path / "meta.keras", {"metadata.json": b" " * (1 << 17)})
    proc, _ = run_measured([*EVALUATE, path, "--data", "sample"])
    assert proc.returncode == 2 and "metadata.json is 131,072 bytes; at most 65,536 are read" in proc.stderr


def test_raw_keras_load_model_is_bounded_by_cnn_from_config(model_file, tmp_path):
    """``import mnist_cnn; keras.saving.load_model(f)`` on a config of 823 M parameters (17 GB
    peak before): a clear error naming the bound, and a peak under 1.2 GB."""
    def huge(config):
        saved = json.loads(config)
        saved["config"].update(filters2=1024, dense_units=16384)
        return json.dumps(saved).encode()

    with zipfile.ZipFile(model_file) as archive:
        config = archive.read("config.json")
    path = copy_with(model_file, tmp_path / "huge.keras", {"config.json": huge(config)})
    code = ("import sys, keras, mnist_cnn\n"
            "try:\n    keras.saving.load_model(sys.argv[1])\n"
            "except Exception as e:\n    print(type(e).__name__, e); sys.exit(3)\n")
    proc, peak = run_measured([sys.executable, "-c", code, path])
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    assert "a CNN of 823,084,874 parameters; at most 50,000,000 are built" in proc.stdout
    assert peak < PEAK_MB, f"peak {peak:.0f} MB"


def test_cnn_from_config_refuses_sizes_outside_the_bounds():
    for change, message in (({"dense_units": 10**9}, "dense_units=1000000000 is outside 1-16384"),
                            ({"filters2": 1024, "dense_units": 16384}, "at most 50,000,000 are built"),
                            ({"dropout": 1.5}, "dropout=1.5 is outside [0, 1)")):
        with pytest.raises(ValueError, match=re.escape(message)):
            CNN.from_config({**CNN().get_config(), **change})


def test_fused_adam_from_config_refuses_unusable_hyperparameters():
    from mnist_cnn.optimizers import FusedAdam

    config = FusedAdam().get_config()
    assert FusedAdam.from_config(config).get_config()["beta_1"] == config["beta_1"]
    for key, value in (("beta_1", 7.0), ("epsilon", "x"), ("learning_rate", -1.0)):
        with pytest.raises(ValueError, match=f"FusedAdam: {key}="):
            FusedAdam.from_config({**config, key: value})
