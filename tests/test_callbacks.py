"""callbacks: the end of an epoch is one sequence through the run folder, and the run's
HParams session ends with the status of what happened."""

import keras
import numpy as np
import pytest
from tensorboard.plugins.histogram.summary_v2 import histogram_pb
from tensorboard.util import tensor_util

from mnist_cnn import callbacks, data, runstate, train
from mnist_cnn.errors import Interrupted, StorageError, TrainingDiverged
from mnist_cnn.rundir import RunDir


@pytest.mark.parametrize("values", [
    np.random.default_rng(0).normal(0, 0.02, (3136, 1024)).astype("float32"),  # dense1's kernel
    np.zeros(64, "float32"),  # a fresh bias: one value, all in the last bucket
    np.array([-1.0, 0.0, 0.0, 2.0]),  # values on the edges
    np.linspace(-3, 3, 31, dtype="float32"),
])
def test_weight_histograms_are_binned_bucket_for_bucket_as_tensorboards_histogram_pb(values):
    expected = tensor_util.make_ndarray(histogram_pb("t", values).value[0].tensor)
    binned = callbacks.histogram_buckets(values)
    assert binned.dtype == expected.dtype == np.float64 and binned.shape == (30, 3)
    np.testing.assert_array_equal(binned, expected)


def test_the_end_of_an_epoch_is_one_sequence_in_code_order(tmp_path, monkeypatch):
    """history -> both checkpoints -> best -> pictures -> commit, by one callback that reads no
    other's state: its model file for best.keras is the one it just wrote for the epoch."""


    seen = []

    class Recorder(RunDir):
        def write_history(self, entries):
            seen.append(("history", len(entries)))
            super().write_history(entries)

        def commit_epoch(self, epochs, steps, keep, random=None):
            seen.append(("commit", epochs))
            super().commit_epoch(epochs, steps, keep, random)

    write_atomic = callbacks.write_atomic
    monkeypatch.setattr(callbacks, "write_atomic", lambda path, payload: seen.append(("file", path.name))
                        or write_atomic(path, payload))
    monkeypatch.setattr(callbacks, "write_split_pictures", lambda writer, split, scores, step, shown:
                        seen.append(("pictures", split, len(scores.labels))))
    run_dir = Recorder(tmp_path / "run")
    run_dir.path.mkdir()
    (run_dir.path / "config.json").write_text("{}")  # the commit records its digest
    (images, labels), _ = data.sample_arrays()
    split = data.pipeline(images[:20], labels[:20], batch_size=10)
    end = callbacks.EpochCommit(run_dir, "validation", split, (images[:5], labels[:5]), keep=2)
    model = train.build_model(train.TrainConfig(), steps_per_epoch=1)
    end.set_model(model)
    end.on_train_begin()
    for epoch, score in enumerate((0.5, 0.4)):
        end.on_epoch_end(epoch, {"loss": 1.0, "val_accuracy": score})
    end.on_train_end()
    assert seen == [
        ("history", 1), ("file", "epoch-01.keras"), ("file", "resume-01.keras"), ("file", "best.keras"),
        ("pictures", "validation", 20), ("commit", 1),
        ("history", 2), ("file", "epoch-02.keras"), ("file", "resume-02.keras"),  # 0.4 < 0.5: no new best
        ("pictures", "validation", 20), ("commit", 2)]
    best, first = (keras.saving.load_model(run_dir.checkpoints / name) for name in ("best.keras", "epoch-01.keras"))
    for a, b in zip(best.get_weights(), first.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not best.compiled  # the model file holds no training state (resume-NN.keras does)


@pytest.mark.parametrize("raised, status, reraised", [
    (None, "success", None), (KeyboardInterrupt, "interrupted", Interrupted),
    (StorageError("cannot write x: No space left on device"), "failure", StorageError),
    (TrainingDiverged("loss is nan"), "failure", TrainingDiverged)])
def test_a_session_ends_with_the_status_of_what_happened(tmp_path, monkeypatch, raised, status, reraised):
    ended = []
    monkeypatch.setattr(runstate, "write_session_end", lambda run_dir, s: ended.append((run_dir, s)))
    if raised is None:
        with runstate.session(tmp_path):
            pass
    else:
        with pytest.raises(reraised) as caught, runstate.session(tmp_path):
            raise raised
        if reraised in (Interrupted, StorageError):
            assert caught.value.run_dir == tmp_path  # the run to resume is named
    assert ended == [(tmp_path, status)]
