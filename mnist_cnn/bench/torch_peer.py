"""A PyTorch peer of the seed's CNN, for ``bench.py``'s training-speed table: the same layers
(conv 32@5x5 same + ReLU, max-pool 2, conv 64@5x5 same + ReLU, max-pool 2, dense 1024 + ReLU,
dense 10, softmax), the same loss (sparse categorical cross-entropy of the softmax), Adam at 1e-3,
the same batches' size, on the same CPU threads. Optional: ``pip install ".[compare]"``; where
torch cannot be imported, ``unavailable()`` says why in one line and the bench leaves it out.

It runs in a process of its own, started from this file as a script (``measure``), which never
imports TensorFlow: PyTorch 2.14 and TensorFlow 2.21 in one process crashed (a segmentation fault
in ``torch.optim.Adam``'s constructor), and each framework's thread pools would share the cores anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

CONTENDER = "PyTorch, the same CNN"
OPTIMIZER = "torch Adam"  # torch.optim.Adam


def unavailable() -> str | None:
    """Why the PyTorch contender cannot run here, or None (asked of a fresh interpreter)."""
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, timeout=300)
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
    return f"PyTorch contender left out: torch cannot be imported ({last[:160]}); pip install '.[compare]'"


def measure(images: np.ndarray, labels: np.ndarray, batch_size: int, rounds: int, steps: int) -> list[float]:
    """Seconds per step of ``rounds`` windows of ``steps`` steps each (after a warm-up), in a child
    process of its own."""
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "images.npy", images)
        np.save(Path(folder) / "labels.npy", labels)
        # this file as __main__, without its folder on sys.path (bench/profile.py would hide the standard one)
        script = f"import runpy; runpy.run_path({__file__!r}, run_name='__main__')"
        child = subprocess.run([sys.executable, "-I", "-c", script, folder, str(batch_size), str(rounds), str(steps)],
                               capture_output=True, text=True, timeout=3600)
    if child.returncode:
        raise RuntimeError(f"the PyTorch peer failed (exit status {child.returncode}): {child.stderr[-500:]}")
    return json.loads(child.stdout.splitlines()[-1])


def model():
    """The seed's CNN in PyTorch (channels first, as PyTorch's convolutions take them)."""
    import torch
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(7 * 7 * 64, 1024), nn.ReLU(), nn.Linear(1024, 10), nn.Softmax(dim=1),
    ).to(torch.float32)


def window(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0) -> Callable[[int], float]:
    """A window of ``n`` training steps of the PyTorch peer on random batches of ``images`` (uint8
    (N, 28, 28)) and ``labels``, as the tutorial's loop draws them; returns seconds."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    net = model()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x_all = torch.from_numpy(images.astype(np.float32)[:, None] / 255.0)
    y_all = torch.from_numpy(labels.astype(np.int64))
    rng = np.random.default_rng(seed)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        probabilities = net(x)
        loss = torch.nn.functional.nll_loss(torch.log(probabilities.clamp_min(1e-7)), y)  # Keras' clipped CE
        loss.backward()
        optimizer.step()
        return loss

    def run(n: int) -> float:
        marks = []
        for _ in range(n + 1):
            index = torch.from_numpy(rng.integers(0, len(y_all), batch_size))
            float(step(x_all[index], y_all[index]))  # wait for the step, as the other contenders do
            marks.append(time.perf_counter())
        return marks[-1] - marks[0]

    return run


if __name__ == "__main__":  # measure()'s child: FOLDER BATCH ROUNDS STEPS -> seconds per step, a JSON list
    folder, batch, rounds, steps = Path(sys.argv[1]), *map(int, sys.argv[2:5])
    run = window(np.load(folder / "images.npy"), np.load(folder / "labels.npy"), batch)
    run(3)  # warm-up
    print(json.dumps([run(steps) / steps for _ in range(rounds)]))
