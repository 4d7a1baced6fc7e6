"""The fast CPU path: the entry points start TensorFlow with oneDNN on (on x86) unless the
user chose, the library leaves the environment alone, and the start-up line says which path
runs. TensorFlow's own "oneDNN custom operations are on" line is the oracle throughout."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, SKIPPED_AS_IN_COMMANDS

from mnist_cnn import as_command, cpu, unused_by_commands

AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"})  # an AMD EPYC / laptop CPU
AMX = AVX2_ONLY | {"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}
TF_SAYS_ON = "oneDNN custom operations are on"
x86_only = pytest.mark.skipif(not cpu.is_x86(), reason="the entry points change TensorFlow's default on x86 only")


def env_with(value):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "MNIST_CNN_VERBOSE")}
    if value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = value
    return env


@x86_only
def test_the_entry_points_turn_onednn_on_only_when_the_user_did_not_choose():
    for before, after in ((None, "1"), ("0", "0"), ("1", "1"), ("false", "false"), ("bogus", "bogus")):
        env = {} if before is None else {"TF_ENABLE_ONEDNN_OPTS": before}
        cpu.prefer_fast_path(env)
        assert env == {"TF_ENABLE_ONEDNN_OPTS": after}


@x86_only
def test_the_start_up_line_names_the_cpu_features_and_the_onednn_state():
    assert cpu.describe_path({}, AVX2_ONLY) == "CPU (AVX2 FMA), oneDNN off"
    assert cpu.describe_path({}, AMX) == "CPU (AVX2 FMA AVX512F AVX512_VNNI AVX512_BF16 AMX), oneDNN on"
    assert cpu.describe_path({"TF_ENABLE_ONEDNN_OPTS": "0"}, AMX).endswith("oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)")
    chosen = cpu.describe_path({"TF_ENABLE_ONEDNN_OPTS": "TRUE"}, AVX2_ONLY)
    assert chosen.endswith("oneDNN on (TF_ENABLE_ONEDNN_OPTS=TRUE)")
    # a library user on an AVX2 CPU who chose nothing is told how to get the fast path; nobody else is
    assert "TF_ENABLE_ONEDNN_OPTS=1" in cpu.slow_path_hint({}, AVX2_ONLY)
    assert cpu.slow_path_hint({}, AMX) is None
    assert cpu.slow_path_hint({"TF_ENABLE_ONEDNN_OPTS": "0"}, AVX2_ONLY) is None


@x86_only
def test_bfloat16_is_native_only_with_onednn_bfloat16_instructions_and_no_lower_isa_cap():
    """What picks the `fast` recipe's precision: AVX512_BF16 or AMX-BF16 that oneDNN is allowed to use."""
    avx512_bf16 = AVX2_ONLY | {"avx512f", "avx512_vnni", "avx512_bf16"}
    assert cpu.native_bfloat16({}, AMX) and cpu.native_bfloat16({}, avx512_bf16)
    assert not cpu.native_bfloat16({}, AVX2_ONLY | {"avx512f", "avx512_vnni"})  # VNNI, no bfloat16: emulated
    assert not cpu.native_bfloat16({"TF_ENABLE_ONEDNN_OPTS": "1"}, AVX2_ONLY)
    assert not cpu.native_bfloat16({"TF_ENABLE_ONEDNN_OPTS": "0"}, AMX)  # Eigen's bfloat16 is emulated
    for capped in ("AVX512_CORE_VNNI", "avx2", " AVX512_CORE "):  # oneDNN kept below its bfloat16 kernels
        assert not cpu.native_bfloat16({"ONEDNN_MAX_CPU_ISA": capped}, AMX), capped
    for allowed in ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL", "DEFAULT"):
        assert cpu.native_bfloat16({"ONEDNN_MAX_CPU_ISA": allowed}, AMX), allowed
    assert cpu.describe_path({"ONEDNN_MAX_CPU_ISA": "AVX2"}, AMX).endswith(
        "oneDNN on, its kernels capped at ONEDNN_MAX_CPU_ISA=AVX2")  # what the start-up line and bench say


@x86_only
def test_the_lean_dense_gradient_is_chosen_where_the_transposed_matmul_was_measured_slow():
    """oneDNN's AVX-512 kernels and Eigen: (w g^T)^T is faster; oneDNN capped at or built for AVX2: TensorFlow's."""
    avx512 = AVX2_ONLY | {"avx512f", "avx512_vnni"}
    assert cpu.slow_transposed_matmul({}, AMX) and cpu.slow_transposed_matmul({}, avx512)
    assert cpu.slow_transposed_matmul({"TF_ENABLE_ONEDNN_OPTS": "0"}, AMX)
    assert cpu.slow_transposed_matmul({"TF_ENABLE_ONEDNN_OPTS": "0"}, AVX2_ONLY)  # Eigen, whatever the CPU
    assert not cpu.slow_transposed_matmul({"TF_ENABLE_ONEDNN_OPTS": "1"}, AVX2_ONLY)
    for capped in ("AVX2", "avx2_vnni", " AVX "):
        assert not cpu.slow_transposed_matmul({"ONEDNN_MAX_CPU_ISA": capped}, AMX), capped
    for allowed in ("AVX512_CORE", "AVX512_CORE_AMX", "ALL"):
        assert cpu.slow_transposed_matmul({"ONEDNN_MAX_CPU_ISA": allowed}, AMX), allowed


@x86_only
def test_the_suite_runs_tensorflow_on_the_path_our_commands_run():
    """conftest chooses as a command does, before TensorFlow loads: on an AVX2-only CPU (TensorFlow's
    default off) the in-process runs were 2.3x slower than the commands and 24 tests failed without it."""
    from tensorflow.python.util import _pywrap_util_port

    assert cpu.VARIABLE in os.environ  # set by conftest unless whoever started the suite set it
    assert _pywrap_util_port.IsMklEnabled() == cpu.onednn_enabled()
    # and without what a command skips (jax aside: test_honest loads it)
    assert set(SKIPPED_AS_IN_COMMANDS) == set(unused_by_commands()) - {"jax"}
    assert [name for name in SKIPPED_AS_IN_COMMANDS if sys.modules.get(name)] == []


@pytest.mark.slow
@pytest.mark.parametrize("value", [None, "0", "1", "FALSE"])
def test_the_onednn_state_we_report_is_the_one_tensorflow_runs(value):
    proc = subprocess.run([sys.executable, "-c", as_command("import tensorflow")], env=env_with(value),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (TF_SAYS_ON in proc.stderr) == cpu.onednn_enabled(env_with(value))


@x86_only
@pytest.mark.slow
def test_an_installed_command_starts_tensorflow_on_the_fast_path_and_the_users_value_wins(tmp_path):
    """As `mnist-cnn-*` or `scripts/*.py` (argv[0]) the package sets the variable before TensorFlow
    loads, and Keras and TensorFlow skip pandas, scikit-learn, matplotlib and jax (~3 s of a command's start-up);
    the user's value stands; imported by other code it changes nothing. TensorFlow's own start-up
    line (MNIST_CNN_VERBOSE=1 keeps it) says which path it took."""
    probe = ("import sys; sys.argv[0] = sys.argv[1]; import os, mnist_cnn; "
             "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS')); import keras; "
             "print(sorted(m for m in ('jax', 'matplotlib', 'pandas', 'sklearn') if sys.modules.get(m)))")
    for argv0, value, expected, on in (
            ("/venv/bin/mnist-cnn-fit", None, ["1", "[]"], True),
            (str(REPO / "scripts" / "fit.py"), "0", ["0", "[]"], False),
            ("/home/someone/notebook.py", None, ["None", "['jax', 'matplotlib', 'pandas', 'sklearn']"], None)):
        proc = subprocess.run([sys.executable, "-c", probe, argv0], env={**env_with(value), "MNIST_CNN_VERBOSE": "1"},
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.splitlines() == expected, (argv0, value)
        if on is not None:  # (unset, TensorFlow's own default depends on the CPU)
            assert (TF_SAYS_ON in proc.stderr) == on, (argv0, value)


def test_jax_is_skipped_only_where_keras_will_run_tensorflow(tmp_path, monkeypatch):
    """Which backend a command's Keras will load, read before it loads (KERAS_BACKEND, else
    keras.json in KERAS_HOME): jax is marked absent only when that is tensorflow."""
    from mnist_cnn import keras_backend

    home = {"KERAS_HOME": str(tmp_path)}
    assert keras_backend(home) == "tensorflow"  # no keras.json: Keras' default
    assert keras_backend({**home, "KERAS_BACKEND": "jax"}) == "jax"
    (tmp_path / "keras.json").write_text('{"backend": "jax", "floatx": "float32"}')
    assert keras_backend(home) == "jax"
    assert keras_backend({**home, "KERAS_BACKEND": "tensorflow"}) == "tensorflow"  # the variable wins
    (tmp_path / "keras.json").write_text('{"floatx": "float32"}')
    assert keras_backend(home) == "tensorflow"
    for unreadable in ("{not json", "[]"):  # not ours to guess: jax stays importable
        (tmp_path / "keras.json").write_text(unreadable)
        assert keras_backend(home) is None
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / ".keras").mkdir(parents=True)
    (tmp_path / "home" / ".keras" / "keras.json").write_text('{"backend": "torch"}')
    assert keras_backend({}) == "torch"  # no KERAS_HOME: ~/.keras
