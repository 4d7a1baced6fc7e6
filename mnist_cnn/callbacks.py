"""The callbacks every training run gets: TensorBoard, checkpoints, NaN guard."""

from __future__ import annotations

from pathlib import Path

import keras


def make_callbacks(run_dir: Path) -> list[keras.callbacks.Callback]:
    """Callbacks writing into ``run_dir``.

    - TensorBoard: loss/accuracy per step (``train/batch_*``) and per epoch
      (``train/epoch_*``, ``validation/epoch_*``), weight histograms every epoch;
    - ModelCheckpoint: ``checkpoints/best.keras``, the epoch with the best
      validation accuracy so far;
    - TerminateOnNaN: stop at the first NaN loss instead of training on garbage.
    """
    run_dir = Path(run_dir)
    return [
        keras.callbacks.TensorBoard(
            log_dir=str(run_dir),
            update_freq="batch",
            histogram_freq=1,
        ),
        keras.callbacks.ModelCheckpoint(
            str(run_dir / "checkpoints" / "best.keras"),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
        ),
        keras.callbacks.TerminateOnNaN(),
    ]
