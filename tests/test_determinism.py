"""A seed means a result, and a resume changes nothing: final weights compared array by array
(on CPU, where TensorFlow's kernels are deterministic run to run)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import StopAfter, quick

from mnist_cnn import data, train
from mnist_cnn.errors import Interrupted


def final_weights(run_dir) -> list[np.ndarray]:
    return keras.saving.load_model(run_dir / "model.keras").get_weights()


def assert_same_weights(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert np.array_equal(x, y), f"weight {i} differs by up to {np.abs(x - y).max()}"


@pytest.mark.parametrize("options", [{}, {"augment": True, "dropout": 0.5}], ids=["tutorial", "augment+dropout"])
def test_one_seed_one_result_and_a_resume_changes_nothing(tmp_path, options):
    """A second run of the same seed, interrupted after epoch 1, resumed and interrupted again after
    epoch 2 (a resume of a resumed run), then resumed to the end, must end with the uninterrupted
    run's weights, bit for bit, and its history -- which a seed that did not fix the result would fail."""
    first = train.fit(quick(tmp_path / "first", epochs=3, steps_per_epoch=4, run_name="r", **options), verbose=0)
    config = quick(tmp_path / "killed", epochs=3, steps_per_epoch=4, run_name="r", **options)
    for stop in (1, 2):
        with pytest.raises(Interrupted):
            train.fit(config, verbose=0, resume=stop > 1, callbacks=[StopAfter(stop)])
        state = json.loads((tmp_path / "killed" / "logs" / "r" / "resume.json").read_text())
        assert state["epochs"] == stop
        if options.get("dropout"):
            assert state["random"], "dropout's generator state is part of the resume state"
    resumed = train.fit(config, verbose=0, resume=True)
    assert_same_weights(final_weights(resumed.run_dir), final_weights(first.run_dir))
    assert resumed.history == first.history


def test_the_training_stream_is_a_function_of_seed_and_position(sample):
    (x, y), _ = sample
    x, y = x[:23], y[:23]  # 5 batches of 5 a pass, the last one short

    def labels(stream, count):
        return [b.numpy().tolist() for _, b in stream.take(count)]

    whole = labels(data.training_stream(x, y, 5, seed=3), 17)  # three passes and more
    assert [len(b) for b in whole[:5]] == [5, 5, 5, 5, 3]
    assert sorted(sum(whole[:5], [])) == sorted(y.tolist())  # a pass shows every digit once
    assert whole[:5] != whole[5:10]  # each pass in its own order
    for start in (1, 5, 7, 12):  # a resume at any step, inside a pass or at its start
        assert labels(data.training_stream(x, y, 5, seed=3, start_step=start), 17 - start) == whole[start:]
    assert labels(data.training_stream(x, y, 5, seed=4), 5) != whole[:5]

    augmented = [b.numpy() for b, _ in data.training_stream(x, y, 5, seed=3, augment=True).take(7)]
    again = [b.numpy() for b, _ in data.training_stream(x, y, 5, seed=3, augment=True, start_step=5).take(2)]
    for a, b in zip(augmented[5:], again, strict=True):
        np.testing.assert_array_equal(a, b)  # the same batch, augmented the same way, after a resume
    plain = [b.numpy() for b, _ in data.training_stream(x, y, 5, seed=3).take(1)]
    assert not np.allclose(plain[0], augmented[0], atol=0.05)  # augmentation changed the digits
    assert tf.reduce_max(augmented[0]) <= 1.0 and tf.reduce_min(augmented[0]) >= 0.0
