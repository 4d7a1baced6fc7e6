import gzip
import shutil
import struct
import zlib

import numpy as np
import pytest
from conftest import FIT, SHARED_MNIST, run_measured, write_folder

from mnist_cnn import idx
from mnist_cnn.idx import IDXError


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_raw_and_gzipped(tmp_path, gz):
    written = write_folder(tmp_path, gz=gz)
    for split in ("train", "test"):
        images, labels = idx.read_split(tmp_path, split)
        np.testing.assert_array_equal(images, written[split][0])
        np.testing.assert_array_equal(labels, written[split][1])
        assert images.dtype == np.uint8


def test_header_is_the_mnist_one(tmp_path):
    path = idx.write_idx(tmp_path / "x", np.zeros((3, 28, 28), np.uint8))
    assert path.read_bytes()[:16] == bytes.fromhex("00000803" "00000003" "0000001c" "0000001c")


def test_truncated_file_is_named(tmp_path):
    write_folder(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IDXError, match=r"train-images-idx3-ubyte: truncated"):
        idx.read_split(tmp_path, "train")


def test_wrong_magic_number_is_named(tmp_path):
    write_folder(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x01" + path.read_bytes()[4:])
    with pytest.raises(IDXError, match=r"t10k-labels-idx1-ubyte: wrong magic number 0x00000d01"):
        idx.read_split(tmp_path, "test")


def test_mismatched_counts_name_both_files(tmp_path):
    write_folder(tmp_path)
    idx.write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8))
    with pytest.raises(IDXError, match=r"has 12 images but .*train-labels-idx1-ubyte has 11 labels"):
        idx.read_split(tmp_path, "train")


def test_wrong_image_size(tmp_path):
    write_folder(tmp_path)
    idx.write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(IDXError, match=r"t10k-images-idx3-ubyte: images are 32x32, expected 28x28"):
        idx.read_split(tmp_path, "test")


def test_labels_outside_0_to_9(tmp_path):
    write_folder(tmp_path)
    idx.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2, 10, 3, 4], np.uint8))
    with pytest.raises(IDXError, match=r"label 10 at index 2 is outside 0-9"):
        idx.read_split(tmp_path, "test")


def test_gz_that_is_not_gzip(tmp_path):
    write_folder(tmp_path)
    raw = tmp_path / "train-images-idx3-ubyte"
    shutil.move(raw, str(raw) + ".gz")
    with pytest.raises(IDXError, match=r"train-images-idx3-ubyte.gz: not a valid gzip file"):
        idx.read_split(tmp_path, "train")


def test_truncated_gzip(tmp_path):
    write_folder(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(IDXError, match=r"train-images-idx3-ubyte.gz: not a valid gzip file"):
        idx.read_split(tmp_path, "train")


def test_missing_file_is_named(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(IDXError, match=r"missing t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\)"):
        idx.read_split(tmp_path, "test")


@pytest.mark.skipif(not SHARED_MNIST.is_dir(),
                    reason=f"official MNIST test set not in {SHARED_MNIST}: set MNIST_IDX_DIR to its IDX folder")
def test_reads_the_official_mnist_test_set():
    images, labels = idx.read_split(SHARED_MNIST, "test")
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    assert np.bincount(labels).tolist()[:3] == [980, 1135, 1032]
    with gzip.open(SHARED_MNIST / "train-labels-idx1-ubyte.gz") as f:
        assert f.read(8) == bytes.fromhex("00000801" "0000ea60")  # 60,000 labels


def gzip_bomb(path, images: int, zeros: int):
    """An images IDX .gz whose header claims ``images`` and whose stream inflates to ``zeros`` bytes."""
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip framing
    parts = [packer.compress(struct.pack(">HBBIII", 0, 8, 3, images, 28, 28))]
    block = bytes(1 << 24)
    parts += [packer.compress(block) for _ in range(zeros >> 24)]
    path.write_bytes(b"".join(parts) + packer.flush())


@pytest.mark.slow
@pytest.mark.parametrize("images, zeros, message", [
    (2**32 - 1, 64 << 20, "more than the 2,147,483,648 bytes an IDX file may hold"),  # refused from the header
    (2_000_000, 768 << 20, "truncated: header says shape (2000000, 28, 28)"),  # within the cap: counted, not kept
])
def test_a_gzip_bomb_costs_what_it_holds_not_what_it_inflates_to(tmp_path, images, zeros, message):
    """The issue's reproduction: fit.py --data on a small .gz that inflates to hundreds of MB of
    zeros under a header claiming more: one line, exit 2, and a peak (TensorFlow's ~0.9 GB
    included) under 1.2 GB; the old reader kept the inflated bytes twice (2.9 GB)."""
    write_folder(tmp_path / "data", gz=True)
    bomb = tmp_path / "data" / "train-images-idx3-ubyte.gz"
    gzip_bomb(bomb, images, zeros)
    assert bomb.stat().st_size < 2 << 20
    proc, peak_mb = run_measured([*FIT, "--data", tmp_path / "data", "--logdir", tmp_path / "logs"])
    assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1], proc.stderr[-1000:]
    assert peak_mb < 1200, f"peak {peak_mb:.0f} MB"
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
