"""The speed levers of a float32 training step, each measured against fit()'s own
setting in one run (``python scripts/bench.py --levers``).

Some levers only take effect when TensorFlow starts (oneDNN, thread pools, XLA
flags), so every lever trains in its own worker process; the workers stay alive and
take turns, one timed window each per round (as bench.py's contenders do), so the
drift of a shared machine hits all of them alike. A window runs from the end of its
first step to the end of its last; the figure is the median over rounds and the
ratio is the default's time per step over the lever's (> 1: the lever is faster).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from mnist_cnn import as_command, console, cpu


@dataclass(frozen=True)
class Lever:
    name: str
    env: dict = field(default_factory=dict)  # set before TensorFlow starts
    intra_threads: int = 0  # tf.config.threading; 0 = TensorFlow's default (one per core)
    inter_threads: int = 0
    steps_per_execution: int | None = None  # None: fit()'s default
    lean_dense_gradient: bool | None = None  # CNN.lean_dense_gradient; None: fit()'s choice
    jit: bool = False
    pipeline: str = "fit"  # "fit": data.pipeline as fit() builds it
    channels_first: bool = False


LEVERS = (
    Lever("default (as fit() trains)"),
    Lever("oneDNN on (TF_ENABLE_ONEDNN_OPTS=1)", env={"TF_ENABLE_ONEDNN_OPTS": "1"}),
    Lever("oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)", env={"TF_ENABLE_ONEDNN_OPTS": "0"}),
    Lever("threads: intra-op 2, inter-op 1", intra_threads=2, inter_threads=1),
    Lever("threads: intra-op 1, inter-op 2", intra_threads=1, inter_threads=2),
    Lever("steps_per_execution 10", steps_per_execution=10),
    Lever("dense1's input gradient: TensorFlow's", lean_dense_gradient=False),
    Lever("dense1's input gradient: (w g^T)^T", lean_dense_gradient=True),
    Lever("pipeline: parallel gather, then prefetch", pipeline="parallel"),
    Lever("pipeline: one fixed batch (no input work)", pipeline="fixed"),
    Lever("data layout: channels_first", channels_first=True),
    Lever("XLA", jit=True),
    Lever("XLA + fast math", jit=True, env={"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}),
    Lever("XLA + oneDNN", jit=True, env={"XLA_FLAGS": "--xla_cpu_use_onednn=true"}),
    Lever("XLA + 512-bit vectors", jit=True, env={"XLA_FLAGS": "--xla_cpu_prefer_vector_width=512"}),
)


def unavailable(lever: Lever, environ=None) -> str | None:
    """Why this CPU cannot run ``lever`` (None if it can)."""
    if lever.channels_first and not cpu.onednn_enabled({**(os.environ if environ is None else environ), **lever.env}):
        return "TensorFlow's CPU convolutions take NCHW only with oneDNN on"
    return None


# -- the conductor --------------------------------------------------------------------------


class Worker:
    def __init__(self, lever: Lever, batch_size: int, stderr):
        env = {**os.environ, **lever.env, "PYTHONUNBUFFERED": "1"}
        code = ("import sys, json; from mnist_cnn.bench import lever_worker; "
                "lever_worker.main(json.loads(sys.argv[1]), sys.argv[2])")
        spec = json.dumps(dataclasses.asdict(lever))
        self.lever, self.stderr = lever, stderr
        self.proc = subprocess.Popen([sys.executable, "-c", as_command(code), spec, str(batch_size)], env=env,
                                     text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        first = self._expect("READY", "UNAVAILABLE")
        self.unavailable = first.split(" ", 1)[1].strip() if first.startswith("UNAVAILABLE") else None
        self.applied = None if self.unavailable else json.loads(first.split(" ", 1)[1])  # what the worker runs with

    def _expect(self, *words: str) -> str:
        line = self.proc.stdout.readline()
        if not line.startswith(words):
            self.stderr.seek(0)
            said = [ln for ln in self.stderr.read().splitlines() if ln.strip() and not console.is_known(ln)]
            raise RuntimeError(f"lever {self.lever.name!r}: the worker failed: {' | '.join(said[-3:])}")
        return line

    def window(self, steps: int) -> float | None:
        if self.unavailable:
            return None
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return float(self._expect("SECONDS_PER_STEP").split()[1])

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(rounds: int, steps: int, log, batch_size: int = 50, levers=LEVERS) -> dict:
    """ms per step of every lever, its ratio to the default and its spread over rounds.
    The workers are started one after another (each warms up alone) and then take turns."""
    workers = []
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [w.close() for w in workers])
        for lever in levers:
            workers.append(Worker(lever, batch_size, stack.enter_context(tempfile.TemporaryFile("w+"))))
        seconds = {w.lever.name: [] for w in workers}
        for r in range(rounds):
            for w in workers:
                seconds[w.lever.name].append(w.window(steps))
            log(f"  levers: round {r + 1}/{rounds} done")
    baseline = statistics.median(seconds[levers[0].name])
    rows = {}
    for w in workers:
        s = seconds[w.lever.name]
        if w.unavailable:
            rows[w.lever.name] = {"unavailable": w.unavailable}
            continue
        rows[w.lever.name] = {"ms_per_step": 1000 * statistics.median(s), "vs_default": baseline / statistics.median(s),
                              "spread_pct": 100 * (max(s) - min(s)) / statistics.median(s), "applied": w.applied}
    return rows


def lines(rows: dict, batch_size: int = 50, default_onednn: bool | None = None) -> list[str]:
    """The levers for bench.py's report; ``default_onednn``: whether the default runs oneDNN."""
    state = "" if default_onednn is None else f"; the default runs with oneDNN {'on' if default_onednn else 'off'}"
    out = [f"speed levers, batch {batch_size}, float32 (each in its own process, taking turns{state}):",
           f"  {'lever':<44} {'ms/step':>8} {'vs default':>10} {'spread':>7}"]
    for name, row in rows.items():
        if "unavailable" in row:
            out.append(f"  {name:<44} {'-':>8} {'-':>10} {'':>7}  not on this CPU: {row['unavailable']}")
            continue
        out.append(f"  {name:<44} {row['ms_per_step']:8.1f} {row['vs_default']:9.2f}x {row['spread_pct']:6.0f}%")
    return out
