"""The CPU path TensorFlow takes on this machine: its instruction-set features and whether
TensorFlow's oneDNN custom ops are on. Imports nothing heavy (no TensorFlow), so the
entry points can decide before TensorFlow starts.

TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, when it starts. Unset, it turns oneDNN on
by itself on Linux only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX
(``DefaultOneDnnPolicy`` in tensorflow/core/util/port.cc); on an AVX2-only CPU it stays
off, and ``model.fit`` of this CNN ran 2.3x slower there than with the variable set to 1
(measured on a 2-core AMD EPYC, see docs/performance.md). So every entry
point (``scripts/*.py``, ``mnist-cnn-*``) sets ``TF_ENABLE_ONEDNN_OPTS=1`` on x86 before
TensorFlow loads, unless the user set the variable (their value always wins). Importing
the package as a library changes nothing: ``fit()`` says which path it runs and how to
get the fast one.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping

VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
# /proc/cpuinfo flags that make TensorFlow turn oneDNN on by itself (its DefaultOneDnnPolicy)
ONEDNN_BY_DEFAULT = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
# /proc/cpuinfo flags of bfloat16 dot-product instructions, which oneDNN's bfloat16 kernels use
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN caps its kernels at this instruction set when the variable is set; below AVX512_CORE_BF16 its
# bfloat16 kernels are emulated: 12 epochs of `--recipe fast` took 105 s against 51 s in float32
# (a 2-core Xeon capped at AVX512_CORE_VNNI, docs/performance.md)
MAX_ISA_VARIABLE = "ONEDNN_MAX_CPU_ISA"
ISAS_WITHOUT_BFLOAT16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
ISAS_WITHOUT_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")
# the features worth naming in a start-up line, in the order a reader expects them
SHOWN = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX512F"), ("avx512_vnni", "AVX512_VNNI"),
         ("avx512_bf16", "AVX512_BF16"), ("amx_tile", "AMX"))


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386", "x86")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is not)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def describe_features(flags: frozenset[str]) -> str:
    """'AVX2 FMA' or 'AVX2 FMA AVX512F AVX512_VNNI AVX512_BF16 AMX' (empty when unknown)."""
    return " ".join(name for flag, name in SHOWN if flag in flags)


def parse_switch(value: str | None) -> bool | None:
    """The variable's value as TensorFlow reads it (0/false, 1/true, any case); None if
    unset or anything else (TensorFlow then warns and keeps its default)."""
    if value is None:
        return None
    return {"0": False, "false": False, "1": True, "true": True}.get(value.strip().lower())


def onednn_default(flags: frozenset[str] | None = None) -> bool:
    """Whether TensorFlow turns oneDNN on by itself on this machine (the variable unset)."""
    if not is_x86():
        return False  # aarch64 builds have their own policy; we leave it alone
    if sys.platform.startswith("win"):
        return True
    if not sys.platform.startswith("linux"):
        return False
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in ONEDNN_BY_DEFAULT)


def onednn_enabled(environ=None, flags: frozenset[str] | None = None) -> bool:
    """Whether a TensorFlow started with ``environ`` (default: this process's) runs oneDNN."""
    environ = os.environ if environ is None else environ
    chosen = parse_switch(environ.get(VARIABLE))
    return onednn_default(flags) if chosen is None else chosen


def native_bfloat16(environ=None, flags: frozenset[str] | None = None) -> bool:
    """Whether a TensorFlow started with ``environ`` runs bfloat16 convolutions and matmuls on
    the CPU's own bfloat16 instructions: oneDNN on, AVX512_BF16 or AMX-BF16 present, and
    ``ONEDNN_MAX_CPU_ISA`` (if set) not below AVX512_CORE_BF16. Elsewhere they are emulated."""
    environ = os.environ if environ is None else environ
    return _bfloat16_to_onednn(environ, flags) and isa_cap(environ) not in ISAS_WITHOUT_BFLOAT16


def bfloat16_blocked(environ=None, flags: frozenset[str] | None = None) -> str | None:
    """Why bfloat16 convolutions would stop TensorFlow here, or None: its oneDNN rewrite trusts the
    CPU's flags (AVX512_BF16, AMX-BF16), but ``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16 leaves oneDNN
    no bfloat16 kernel to run ("could not create a primitive descriptor" at the first convolution).
    Without those flags TensorFlow keeps bfloat16 on its own (Eigen) kernels: slow, but it runs."""
    environ = os.environ if environ is None else environ
    cap = isa_cap(environ)
    if _bfloat16_to_onednn(environ, flags) and cap in ISAS_WITHOUT_BFLOAT16:
        return (f"oneDNN is capped at {MAX_ISA_VARIABLE}={cap}, which has no bfloat16 convolutions, while this "
                f"CPU's bfloat16 flags send them to oneDNN; unset {MAX_ISA_VARIABLE} or train in float32")
    return None


def _bfloat16_to_onednn(environ, flags: frozenset[str] | None) -> bool:
    """Whether TensorFlow hands bfloat16 work to oneDNN: oneDNN on and the CPU's bfloat16 flags present
    (the cap decides whether oneDNN then has kernels for it)."""
    flags = cpu_flags() if flags is None else flags
    return onednn_enabled(environ, flags) and any(flag in flags for flag in BFLOAT16_FLAGS)


def slow_transposed_matmul(environ=None, flags: frozenset[str] | None = None) -> bool:
    """Whether TensorFlow's float32 ``matmul(g, w, transpose_b=True)`` with a large ``w`` -- a dense
    layer's input gradient -- is slower here than ``transpose(matmul(w, g, transpose_b=True))``:
    with oneDNN's AVX-512 kernels (dense1's, batch 50: 2.79 against 1.44 ms) and with oneDNN off
    (Eigen: 4.47 against 1.27 ms); not with oneDNN capped at AVX2 (1.52 against 1.74 ms), nor where
    it was not measured (other architectures). docs/performance.md, "Where the rest of a step goes"."""
    if not is_x86():
        return False
    environ = os.environ if environ is None else environ
    flags = cpu_flags() if flags is None else flags
    if not onednn_enabled(environ, flags):
        return True
    return "avx512f" in flags and isa_cap(environ) not in ISAS_WITHOUT_AVX512


def isa_cap(environ=None) -> str:
    """The instruction set oneDNN is capped at (``ONEDNN_MAX_CPU_ISA`` as oneDNN reads it), or ''."""
    environ = os.environ if environ is None else environ
    return environ.get(MAX_ISA_VARIABLE, "").strip().upper()


_set_here = False  # whether prefer_fast_path set the variable in this process (not the user)


def prefer_fast_path(environ: MutableMapping[str, str] | None = None) -> None:
    """What the entry points do before TensorFlow starts: oneDNN on, on x86, unless the
    user set the variable (then their value stands)."""
    global _set_here
    environ = os.environ if environ is None else environ
    if VARIABLE not in environ and is_x86():
        environ[VARIABLE] = "1"
        _set_here = environ is os.environ


def describe_path(environ=None, flags: frozenset[str] | None = None) -> str:
    """'CPU (AVX2 FMA), oneDNN on' -- and where it comes from when the user chose it."""
    environ = os.environ if environ is None else environ
    flags = cpu_flags() if flags is None else flags
    features = describe_features(flags)
    where = f"CPU ({features})" if features else f"CPU ({platform.machine() or 'unknown'})"
    state = "on" if onednn_enabled(environ, flags) else "off"
    if VARIABLE in environ and not (_set_here and environ is os.environ):  # the user's choice: say so
        state += f" ({VARIABLE}={environ[VARIABLE]})"
    if isa_cap(environ) and state.startswith("on"):
        state += f", its kernels capped at {MAX_ISA_VARIABLE}={isa_cap(environ)}"
    return f"{where}, oneDNN {state}"


def slow_path_hint(environ=None, flags: frozenset[str] | None = None) -> str | None:
    """A line for a library user whose x86 CPU runs without oneDNN because nobody chose."""
    environ = os.environ if environ is None else environ
    if not is_x86() or VARIABLE in environ or onednn_enabled(environ, flags):
        return None
    return (f"TensorFlow's oneDNN CPU kernels are off on this CPU; training ran 2.3x faster with them on an "
            f"AVX2 machine: set {VARIABLE}=1 before TensorFlow is imported (the mnist-cnn-* commands do)")
