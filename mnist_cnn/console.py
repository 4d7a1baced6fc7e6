"""What a person sees on the console, in one place.

**Our lines.** The package logs to the ``mnist_cnn`` logger: INFO on stdout, warnings and
errors on stderr, unadorned. The commands install these handlers for the life of the process
(``show``); ``train.fit`` called from Python installs them only for the length of the call, and
only when the caller has configured no logging at all (``lines_shown``), so a notebook shows a
run's lines as Keras' own ``fit`` shows its progress, and an application's logging is left as it
is. ``hidden`` keeps a benchmark's runs from printing their own (Device:, Data: ...).

**TensorFlow's start-up lines.** TensorFlow 2.21's C++ side logs before absl is initialised, so
TF_CPP_MIN_LOG_LEVEL no longer silences it (tensorflow/tensorflow#102212, abseil/abseil-cpp#1957).
On every CPU machine that is nine lines, one of them an *error* (``failed call to cuInit``) that
tells a newcomer something is broken. ``filter_tensorflow_lines`` routes fd 2 through a pipe and
a process that drops exactly those known lines; every other line -- warnings, our errors,
tracebacks, TensorFlow lines we do not know -- passes through unchanged and in order.
``MNIST_CNN_VERBOSE=1`` turns the filter off. Only the entry points install it
(``mnist_cnn/__init__.py`` asks ``started_as_entry_point``: this process *is* one of our scripts
or ``mnist-cnn-*`` commands): importing the package from other code leaves stderr alone.

This module imports nothing heavy, so it runs before TensorFlow loads.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

LOGGER = "mnist_cnn"


class Console(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stdout`` (or ``sys.stderr``) is when a line is
    logged, as ``print`` does: a command run from Python under ``contextlib.redirect_stdout`` (or
    pytest's capture) sends its lines where its prints go, not to the stream of the first call."""

    def __init__(self, name: str):
        self.name_of_stream = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self.name_of_stream)

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the stream is looked up on each line
        pass


def handlers() -> list[logging.Handler]:
    out = Console("stdout")
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = Console("stderr")
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    return [out, err]


def show(name: str = LOGGER, level: int = logging.INFO) -> None:
    """Logger ``name``'s lines from ``level`` up on the console (``handlers``) for the life of
    the process, and nowhere else."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.handlers[:] = handlers()
    logger.propagate = False


@contextlib.contextmanager
def lines_shown(silent: bool = False):
    """The package's lines on the console for the block, unless ``silent`` or the caller's
    logging already has handlers (then they go where the caller's logging sends them)."""
    logger = logging.getLogger(LOGGER)
    if silent or logger.hasHandlers():
        yield
        return
    added, level = handlers(), logger.level
    for handler in added:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in added:
            logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def hidden():
    """The package's INFO lines hidden for the block (warnings still show)."""
    logger = logging.getLogger(LOGGER)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


KNOWN_LINES = [
    re.compile(p)
    for p in (
        r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
        r"^I\d{4} [\d:.]+\s+\d+ port\.cc:\d+\] oneDNN custom operations are on\.",
        r"^I\d{4} [\d:.]+\s+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
        r"^I\d{4} [\d:.]+\s+\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
        r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.$",
        r"^E\d{4} [\d:.]+\s+\d+ cuda_platform\.cc:\d+\] failed call to cuInit: .*UNKNOWN ERROR \(303\)$",
        # TensorFlow 2.16 (the floor) logs in its older format; its TensorRT probe on every CPU machine
        r"^\d{4}-\d\d-\d\d [\d:.]+: W tensorflow/compiler/tf2tensorrt/utils/py_utils\.cc:\d+\] "
        r"TF-TRT Warning: Could not find TensorRT$",
        # XLA's first compilation on the CPU (--jit-compile on, bench's XLA contenders)
        r"^I\d{4} [\d:.]+\s+\d+ service\.cc:\d+\] XLA service 0x[0-9a-f]+ initialized for platform Host ",
        r"^I\d{4} [\d:.]+\s+\d+ service\.cc:\d+\]\s+StreamExecutor \[\d+\]: Host, Default Version",
        r"^I\d{4} [\d:.]+\s+\d+ dump_mlir_util\.cc:\d+\] disabling MLIR crash reproducer",
        r"^I\d{4} [\d:.]+\s+\d+ device_compiler\.h:\d+\] Compiled cluster using XLA!",
        # the TensorFlow Lite converter reading back the SavedModel it converts (export --tflite)
        r"^W\d{4} [\d:.]+\s+\d+ tf_tfl_flatbuffer_helpers\.cc:\d+\] Ignored (output_format|drop_control_dependency)\.$",
        r"^I\d{4} [\d:.]+\s+\d+ reader\.cc:\d+\] Reading (SavedModel from: |meta graph with tags "
        r"|SavedModel debug info)",
        r"^I\d{4} [\d:.]+\s+\d+ mlir_graph_optimization_pass\.cc:\d+\] MLIR V1 optimization pass is not enabled$",
        r"^I\d{4} [\d:.]+\s+\d+ loader\.cc:\d+\] (Restoring SavedModel bundle\.$|Running initialization op on "
        r"SavedModel bundle at path: |SavedModel load for tags \{ serve \}; Status: success: OK\.)",
        # a SavedModel's variables on a full disk: TensorFlow's account of the failure our one line reports
        r"^W\d{4} [\d:.]+\s+\d+ op_kernel\.cc:\d+\] OP_REQUIRES failed at save_restore_v2_ops\.cc:\d+ : "
        r"RESOURCE_EXHAUSTED: .*; No space left on device$",
        r"^W\d{4} [\d:.]+\s+\d+ local_rendezvous\.cc:\d+\] Local rendezvous is aborting with status: "
        r"RESOURCE_EXHAUSTED: .*; No space left on device$",
        # the same two in TensorFlow 2.16's older format (the floor)
        r"^\d{4}-\d\d-\d\d [\d:.]+: W tensorflow/core/framework/op_kernel\.cc:\d+\] OP_REQUIRES failed at "
        r"save_restore_v2_ops\.cc:\d+ : RESOURCE_EXHAUSTED: .*; No space left on device$",
        r"^\d{4}-\d\d-\d\d [\d:.]+: W tensorflow/core/framework/local_rendezvous\.cc:\d+\] Local rendezvous is "
        r"aborting with status: RESOURCE_EXHAUSTED: .*; No space left on device$",
    )
]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT_NAMES = frozenset({"fit.py", "evaluate.py", "predict.py", "export.py", "bench.py", "serve.py", "tune.py",
                          "conv_demo.py", "reshape_demo.py", "tutorial_loop.py"})
_installed = False


def is_known(line: str) -> bool:
    return any(p.search(line) for p in KNOWN_LINES)


def is_entry_point(argv0: str) -> bool:
    """Whether this process was started as one of our scripts or installed commands: an
    ``mnist-cnn-*`` command, or a ``scripts/*.py`` of a checkout of this project (whether
    the package is installed from it editable or not)."""
    path = Path(argv0)
    if path.name.startswith("mnist-cnn-"):
        return True
    if path.name not in SCRIPT_NAMES or path.parent.name != "scripts":
        return False
    return path.resolve().parent == SCRIPTS or _is_our_checkout(path.resolve().parents[1])


def _is_our_checkout(folder: Path) -> bool:
    try:
        return 'name = "mnist_cnn"' in (folder / "pyproject.toml").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False


def started_as_entry_point() -> bool:
    return (bool(sys.argv) and is_entry_point(sys.argv[0])) or runs_command_module(getattr(sys, "orig_argv", []))


def runs_command_module(orig_argv: list[str]) -> bool:
    """Whether Python was started as ``python [options] -m mnist_cnn.cli.NAME ...`` (as ``tune --jobs``
    starts its workers). ``sys.orig_argv``: while ``-m`` imports the package, ``sys.argv[0]`` is "-m"."""
    args = iter(orig_argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, "").startswith("mnist_cnn.cli.")
        if arg in ("-X", "-W"):
            next(args, None)
        elif arg == "-c" or not arg.startswith("-"):
            return False
    return False


def filter_tensorflow_lines() -> None:
    """Filter fd 2 from now until the process exits (idempotent).

    The filter is a forked process of its own, not a thread: a command that dies at once
    (a C++ abort in TensorFlow, SIGKILL) cannot take its last lines with it -- the filter
    reads to the end of the pipe and exits when every writer has closed it."""
    global _installed
    if _installed or os.environ.get("MNIST_CNN_VERBOSE", "") not in ("", "0"):
        return
    try:
        original = os.dup(2)
        read_end, write_end = os.pipe()
        pid = os.fork()
    except (OSError, AttributeError):
        return  # no usable stderr, or no fork (Windows): nothing to filter
    if pid == 0:  # the filter process
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the command; its last lines still pass
            _close_all_but(read_end, original)
            _pump(read_end, original)
        finally:
            os._exit(0)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    _installed = True

    def restore():
        sys.stderr.flush()
        os.dup2(original, 2)  # our end of the pipe closes: the filter reads the rest, then EOF
        deadline = time.monotonic() + 5  # a child process still holding the pipe keeps it open: wait a little
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.01)

    atexit.register(restore)


def _close_all_but(*keep: int) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = [0, 1, 2]
    for fd in fds:
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _pump(read_end: int, out: int) -> None:
    """Copy lines but the known ones (and the empty line that ends a dropped message, as
    TensorFlow's warnings that carry a newline of their own do)."""
    pending, dropped = b"", False
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        kept = []
        for line in lines:
            drop = is_known(line.decode(errors="replace")) or (dropped and not line.strip())
            if not drop:
                kept.append(line + b"\n")
            dropped = drop and bool(line.strip())
        _write_all(out, b"".join(kept))
    if pending and not is_known(pending.decode(errors="replace")):
        _write_all(out, pending)
    os.close(read_end)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]
