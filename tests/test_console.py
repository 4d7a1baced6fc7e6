"""A clean start: our commands hide TensorFlow's known start-up lines, and only those;
output to a file is one line per epoch without terminal escape codes."""

import contextlib
import io
import logging
import subprocess
import sys

from conftest import FIT, REPO, run_python

from mnist_cnn import console
from mnist_cnn.cli import common

NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795785205.457800    3146 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors.",
    "I0000 00:00:1795785205.458097    3146 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    "GPU will not be used.",
    "I0000 00:00:1795785205.495996    3146 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
    "E0000 00:00:1795785279.801234    3550 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)",
    "I0000 00:00:1796029915.423842   19973 service.cc:153] XLA service 0x7f5f20009f80 initialized for platform "
    "Host (this does not guarantee that XLA will be used). Devices:",
    "I0000 00:00:1796029915.423887   19973 service.cc:161]   StreamExecutor [0]: Host, Default Version (Driver: "
    "0.0.0; Runtime: 0.0.0; Toolkit: 0.0.0; DNN: 0.0.0)",
    "I0000 00:00:1796029915.440379   19973 dump_mlir_util.cc:269] disabling MLIR crash reproducer, set env var "
    "`MLIR_CRASH_REPRODUCER_DIRECTORY` to enable.",
    "I0000 00:00:1796029916.546821   19973 device_compiler.h:208] Compiled cluster using XLA!  This line is logged "
    "at most once for the lifetime of the process.",
    "2026-11-30 11:01:50.657143: W tensorflow/compiler/tf2tensorrt/utils/py_utils.cc:38] TF-TRT Warning: Could not "
    "find TensorRT",
    # export on a full disk (2026-12-07): our own line says it
    "W0000 00:00:1796655149.653159   10020 op_kernel.cc:1858] OP_REQUIRES failed at save_restore_v2_ops.cc:141 : "
    "RESOURCE_EXHAUSTED: /d/models/.export-7.partial/variables/variables_temp/part-00000-of-00001.data-00000-of-00001"
    ".tempstate16906222314480382754; No space left on device",
    "W0000 00:00:1796655149.653218   10020 local_rendezvous.cc:412] Local rendezvous is aborting with status: "
    "RESOURCE_EXHAUSTED: /d/models/.export-7.partial/variables/variables_temp/part-00000-of-00001.data-00000-of-00001"
    ".tempstate16906222314480382754; No space left on device",
    "2026-12-07 16:17:46.308259: W tensorflow/core/framework/op_kernel.cc:1839] OP_REQUIRES failed at "
    "save_restore_v2_ops.cc:141 : RESOURCE_EXHAUSTED: /d/models/.export-3.partial/variables/variables_temp/part-00000-"
    "of-00001.data-00000-of-00001.tempstate1; No space left on device",
    "2026-12-07 16:17:46.308338: W tensorflow/core/framework/local_rendezvous.cc:404] Local rendezvous is aborting "
    "with status: RESOURCE_EXHAUSTED: /d/models/.export-3.partial/variables/variables_temp/part-00000-of-00001.data-"
    "00000-of-00001.tempstate1; No space left on device",
]


def test_the_known_lines_and_only_those_are_known():
    assert all(console.is_known(line) for line in NOISE)
    for other in ("E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_NO_DEVICE",
                  "W0000 00:00:1.0 1 op_kernel.cc:1858] OP_REQUIRES failed: RESOURCE_EXHAUSTED: OOM",
                  "Traceback (most recent call last):", "fit.py: error: --epochs must be positive"):
        assert not console.is_known(other), other


def test_the_filter_passes_everything_else_in_order_tracebacks_included():
    code = f"""
import os, sys
sys.argv[0] = "mnist-cnn-test"  # as an installed command: the filter is on before TensorFlow loads
from mnist_cnn import console
noise = {NOISE!r}
os.write(2, ("first line\\n" + noise[0] + "\\n" + noise[5] + "\\n").encode())
print("second line", file=sys.stderr, flush=True)
os.write(2, ("\\nafter a blank line\\n" + noise[-1] + "\\n\\n").encode())  # a dropped message's own blank line goes
os.write(2, (noise[3] + "\\n" + noise[4] + "\\nthird line without a newline").encode())
print("", file=sys.stderr, flush=True)
raise RuntimeError("boom")
"""
    proc = run_python(code)
    lines = proc.stderr.splitlines()
    assert not any(console.is_known(line) for line in lines)
    assert lines[:5] == ["first line", "second line", "", "after a blank line", "third line without a newline"]
    assert lines[5] == "Traceback (most recent call last):" and lines[-1] == "RuntimeError: boom"


def test_importing_the_library_leaves_stderr_alone():
    code = "import os; before = os.fstat(2).st_ino; import mnist_cnn; print(before == os.fstat(2).st_ino)"
    proc = run_python(code)
    assert proc.stdout.strip() == "True"


def test_a_run_into_files_starts_clean_and_prints_one_line_per_epoch(tmp_path):
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.run([*FIT, "--data", "sample", "--epochs", "2", "--steps-per-epoch", "3",
                               "--logdir", tmp_path / "logs"], stdout=stdout, stderr=stderr, timeout=300)
    assert proc.returncode == 0, err.read_text()[-2000:]
    assert err.read_text() == ""  # not one TensorFlow line
    text = out.read_text()
    assert "\x1b[" not in text and "━" not in text  # no progress bar, no escape codes
    epoch_lines = [line for line in text.splitlines() if line.startswith("Epoch ")]
    assert [line.split(" - ")[0] for line in epoch_lines] == ["Epoch 1/2", "Epoch 2/2"]
    assert all("val_accuracy: " in line for line in epoch_lines)
    assert text.splitlines()[-2].startswith("test accuracy: ")


def test_verbose_shows_tensorflows_lines_again(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "conv_demo.py")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**__import__("os").environ, "MNIST_CNN_VERBOSE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(console.is_known(line) for line in proc.stderr.splitlines())  # TensorFlow's own, unfiltered


def test_the_installed_command_names_count_as_entry_points():
    assert console.is_entry_point("/usr/local/bin/mnist-cnn-fit")
    assert console.is_entry_point(str(console.SCRIPTS / "fit.py"))
    assert not console.is_entry_point("/home/someone/fit.py") and not console.is_entry_point(sys.executable)


def test_every_script_of_the_checkout_starts_as_an_entry_point():
    """scripts/tune.py was missing: started as ``python scripts/tune.py`` it imported jax (through
    TensorFlow Lite; jax's garbage-collector callback is where CI lost a sweep's SIGTERM), kept
    TensorFlow's start-up lines and skipped the CPU fast path."""
    scripts = sorted((REPO / "scripts").glob("*.py"))
    assert len(scripts) >= 10
    assert [p.name for p in scripts if not console.is_entry_point(str(p))] == []
    # tune --jobs' workers: python -m mnist_cnn.cli.tune
    assert console.runs_command_module(["python", "-X", "importtime", "-u", "-m", "mnist_cnn.cli.tune", "--jobs"])
    assert not console.runs_command_module(["python", "-m", "pytest", "-m", "mnist_cnn.cli.x"])
    assert not console.runs_command_module(["python", "fit.py", "-m", "mnist_cnn.cli.fit"])
    assert not console.runs_command_module(["python", "-c", "pass", "-m", "mnist_cnn.cli.fit"])


def test_a_command_that_dies_at_once_still_shows_its_last_lines():
    """A C++ abort inside TensorFlow (or a SIGKILL) ends the process between two writes: the
    filter is a process of its own, so what was written still reaches the terminal."""
    for death in ("os.abort()", "os.kill(os.getpid(), signal.SIGKILL)"):
        code = f"""
import os, signal, sys
sys.argv[0] = "mnist-cnn-test"
from mnist_cnn import console
assert console._installed
os.write(2, b"terminate called after throwing an instance of 'dnnl::error'\\n")
{death}
"""
        proc = run_python(code, timeout=60)
        assert proc.returncode < 0, (death, proc.returncode)
        assert "terminate called after throwing an instance of 'dnnl::error'" in proc.stderr, death


def test_ctrl_c_reaches_the_command_not_the_filter():
    code = """
import os, signal, sys, time
sys.argv[0] = "mnist-cnn-test"
from mnist_cnn import console
try:
    os.kill(0, signal.SIGINT)  # the whole process group, as a terminal's Ctrl-C
    time.sleep(5)
except KeyboardInterrupt:
    time.sleep(0.2)
    print("interrupted, and this line still passes", file=sys.stderr, flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          start_new_session=True)
    assert "interrupted, and this line still passes" in proc.stderr


def test_a_commands_lines_go_where_sys_stdout_is_when_they_are_logged():
    """The handlers a command installs (for the life of the process) look sys.stdout/stderr up per
    line, as print does: lines logged later, under another redirect, go there -- not to the stream
    the command started with (closed by now, as pytest's capture closes a finished test's)."""
    log = logging.getLogger(console.LOGGER)

    def body():
        log.info("an info line")
        log.warning("a warning")

    for call in (lambda: common.run("fit.py", body), body):  # the command, then the package used after it
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert call() in (0, None)
        assert (out.getvalue(), err.getvalue()) == ("an info line\n", "WARNING: a warning\n")
        out.close(), err.close()
