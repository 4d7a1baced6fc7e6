"""The accuracy levers of issue #22: a moving average of the weights (--ema) and elastic
distortions (--elastic), each seeded, resumable and what the saved models are made of."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import StopAfter, quick

from mnist_cnn import CNN, augment, data, train
from mnist_cnn.errors import Interrupted
from mnist_cnn.keras_file import load_cnn
from mnist_cnn.optimizers import FusedAdam


class RawWeights(keras.callbacks.Callback):
    """The model's own (not averaged) weights at the end of each epoch."""

    def __init__(self):
        super().__init__()
        self.raw = []

    def on_epoch_end(self, epoch, logs=None):
        self.raw.append(self.model.get_weights())


class EveryStep(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append(self.model.get_weights())


@pytest.mark.parametrize("optimizer", [FusedAdam, keras.optimizers.Adam])
def test_the_moving_average_is_the_average_of_the_steps_weights(optimizer, tiny):
    """Each optimizer's ``use_ema``: after fit the model holds m * avg + (1 - m) * w over every step."""
    x, y = tiny
    keras.utils.set_random_seed(0)
    model = train.compile_model(CNN(), train.TrainConfig(ema=0.9), steps_per_epoch=4, optimizer=optimizer)
    steps = EveryStep()
    model.fit(x[:64], y[:64], batch_size=8, epochs=1, verbose=0, callbacks=[steps])
    assert model.optimizer.use_ema and model.optimizer.ema_momentum == 0.9 and len(steps.weights) == 8
    average = steps.weights[0]
    for weights in steps.weights[1:]:
        average = [0.9 * a + 0.1 * w for a, w in zip(average, weights, strict=True)]
    for got, want in zip(model.get_weights(), average, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert max(np.abs(g - w).max() for g, w in zip(model.get_weights(), steps.weights[-1], strict=True)) > 1e-4


def test_ema_is_what_is_saved_and_scored_and_resume_keeps_it(tmp_path):
    config = quick(tmp_path / "a", epochs=3, steps_per_epoch=6, run_name="r", ema=0.9)
    raw = RawWeights()
    run = train.fit(config, verbose=0, callbacks=[raw])
    final = load_cnn(run.model_path).get_weights()
    last_epoch = keras.saving.load_model(run.run_dir / "checkpoints" / "epoch-03.keras").get_weights()
    for a, b in zip(final, last_epoch, strict=True):
        np.testing.assert_array_equal(a, b)  # model.keras and the epoch's model file: the average
    assert max(np.abs(a - b).max() for a, b in zip(final, raw.raw[-1], strict=True)) > 1e-4  # not the raw weights
    model = load_cnn(run.model_path)
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    scored = model.evaluate(data.load("sample").test, return_dict=True, verbose=0)
    assert scored["accuracy"] == pytest.approx(run.test_accuracy, abs=1e-6)  # the test score is the average's
    best = json.loads((run.run_dir / "metrics.json").read_text())["history"]["val_accuracy"]
    assert len(best) == 3

    killed = quick(tmp_path / "b", epochs=3, steps_per_epoch=6, run_name="r", ema=0.9)
    with pytest.raises(Interrupted):
        train.fit(killed, verbose=0, callbacks=[StopAfter(1)])
    resumed = train.fit(killed, verbose=0, resume=True)
    for a, b in zip(load_cnn(resumed.model_path).get_weights(), final, strict=True):
        np.testing.assert_array_equal(a, b)  # the average is part of the resume state
    assert resumed.history == run.history


def test_elastic_distortions_change_digits_seeded_and_keep_them_digits(sample):
    (x, y), _ = sample
    images = tf.constant(x[:64, ..., None] / 255.0, tf.float32)
    seed = tf.constant([3, 1], tf.int64)
    once, again = augment.elastic_batch(images, seed), augment.elastic_batch(images, seed)
    np.testing.assert_array_equal(once.numpy(), again.numpy())  # seeded
    assert not np.allclose(augment.elastic_batch(images, tf.constant([4, 1], tf.int64)).numpy(), once.numpy())
    moved = np.abs(once.numpy() - images.numpy()).mean(axis=(1, 2, 3))
    assert (moved > 0.02).all()  # every digit distorted
    assert 0.0 <= float(tf.reduce_min(once)) and float(tf.reduce_max(once)) <= 1.0 + 1e-6
    ink = images.numpy().sum(axis=(1, 2, 3))
    ratio = once.numpy().sum(axis=(1, 2, 3)) / ink
    assert np.abs(ratio - 1).mean() < 0.2 and ratio.min() > 0.3 and ratio.max() < 2.5  # distorted, not erased
    stream = [b.numpy() for b, _ in data.training_stream(x[:20], y[:20], 5, seed=1, elastic=True).take(6)]
    resumed = [b.numpy() for b, _ in data.training_stream(x[:20], y[:20], 5, seed=1, elastic=True,
                                                         start_step=4).take(2)]
    for a, b in zip(stream[4:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)  # exact under resume


def test_label_smoothing_is_keras_smoothed_cross_entropy_in_training_and_plain_elsewhere(tiny):
    """--label-smoothing e: the gradient step minimises the cross-entropy against Keras' smoothed
    targets (1 - e + e/10 on the label, e/10 elsewhere); validation and test losses stay plain."""
    x, y = tiny
    keras.utils.set_random_seed(0)
    model = train.compile_model(CNN(), train.TrainConfig(label_smoothing=0.2), steps_per_epoch=4)
    probs = tf.nn.softmax(np.random.default_rng(0).normal(0, 3, (40, 10)).astype("float32"))  # far from uniform
    smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=0.2)(tf.one_hot(y[:40], 10), probs)
    plain = keras.losses.SparseCategoricalCrossentropy()(y[:40], probs)
    assert abs(float(smoothed) - float(plain)) > 0.05  # apart by far more than float32 rounding
    weights = np.r_[np.ones(30), np.zeros(10)].astype("float32")
    weighted = keras.losses.CategoricalCrossentropy(label_smoothing=0.2)(tf.one_hot(y[:40], 10), probs, weights)
    for training, want, sw in ((True, smoothed, None), (False, plain, None), (True, weighted, weights)):
        got = model.compute_loss(x[:40], y[:40], probs, sample_weight=sw, training=training)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    # and fit's logged losses: training smoothed, validation plain
    history = model.fit(x[:40], y[:40], batch_size=40, epochs=1, verbose=0, validation_data=(x[:40], y[:40]))
    after = model(x[:40], training=False)
    assert history.history["val_loss"][0] == pytest.approx(
        float(keras.losses.SparseCategoricalCrossentropy()(y[:40], after)), rel=1e-5)
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing"):
            model.label_smoothing = bad
    assert model.label_smoothing == 0.2 and CNN().label_smoothing == 0.0
