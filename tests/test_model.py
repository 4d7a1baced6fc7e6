import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import fashion_mnist, run_python

from mnist_cnn import CNN, idx


def compiled(model=None, lr=1e-3):
    model = model or CNN()
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="sparse_categorical_crossentropy",
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def test_parameter_count_and_layers_match_the_tutorial():
    model = CNN()
    model.build()
    assert model.count_params() == 3_274_634
    assert [layer.name for layer in model.layers] == [
        "conv1", "pool1", "conv2", "pool2", "flatten", "dense1", "dense2", "softmax",
    ]
    assert model.conv1.kernel.shape == (5, 5, 1, 32)
    assert model.conv2.kernel.shape == (5, 5, 32, 64)
    assert model.dense1.kernel.shape == (7 * 7 * 64, 1024)
    assert model.dense2.kernel.shape == (1024, 10)


def test_outputs_are_probabilities(tiny):
    x, _ = tiny
    probs = CNN()(x[:7]).numpy()
    assert probs.shape == (7, 10)
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_config_rebuilds_the_same_architecture():
    model = CNN(filters1=8, filters2=16, kernel_size=3, dense_units=32, num_classes=5)
    model.build()
    clone = CNN.from_config(model.get_config())
    clone.build()
    assert clone.get_config() == model.get_config()
    assert clone.count_params() == model.count_params()
    assert clone(np.zeros((1, 28, 28, 1), "float32")).shape == (1, 5)


def test_fit_uses_our_train_step_and_moves_every_weight(tiny, monkeypatch):
    assert CNN.train_step is not keras.Model.train_step
    assert CNN.test_step is not keras.Model.test_step
    calls = []
    original = CNN.gradient_step

    def counting(self, *args, **kwargs):
        calls.append(1)  # runs once per trace of the tf.function
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CNN, "gradient_step", counting)
    x, y = tiny
    keras.utils.set_random_seed(1)
    model = compiled()
    model.build()
    before = [w.numpy().copy() for w in model.trainable_weights]
    first = model.evaluate(x, y, batch_size=50, verbose=0, return_dict=True)["loss"]
    model.fit(x, y, batch_size=50, epochs=3, verbose=0)
    after = model.evaluate(x, y, batch_size=50, verbose=0, return_dict=True)["loss"]
    assert calls, "model.fit did not go through CNN.gradient_step"
    assert after < 0.7 * first
    for w, old in zip(model.trainable_weights, before, strict=True):
        assert not np.allclose(w.numpy(), old), f"{w.path} did not change"


def test_zero_sample_weights_mean_no_update(tiny):
    x, y = tiny
    model = compiled()
    model.build()
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x[:50], y[:50], sample_weight=np.zeros(50), batch_size=50, epochs=1, verbose=0)
    assert history.history["loss"][0] == 0.0
    for w, old in zip(model.trainable_weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), old)


def test_test_step_weights_samples_like_keras(tiny):
    x, y = tiny
    model = compiled()
    model.build()
    probs = model.predict(x, verbose=0)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    weights = np.r_[np.ones(100), np.zeros(100)]
    weighted = model.evaluate(x, y, sample_weight=weights, batch_size=200, verbose=0, return_dict=True)
    np.testing.assert_allclose(weighted["loss"], loss_fn(y, probs, sample_weight=weights), rtol=1e-5)
    # Keras' "sum over batch size": zero weights still count in the denominator
    half = model.evaluate(x[:100], y[:100], batch_size=100, verbose=0, return_dict=True)
    np.testing.assert_allclose(weighted["loss"], 0.5 * half["loss"], rtol=1e-5)
    plain = model.evaluate(x, y, batch_size=200, verbose=0, return_dict=True)
    np.testing.assert_allclose(plain["loss"], loss_fn(y, probs), rtol=1e-5)


def test_keras_file_round_trip_in_a_fresh_process(tiny, tmp_path):
    x, y = tiny
    model = compiled()
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    path = tmp_path / "cnn.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x[:20])
    np.save(tmp_path / "y.npy", y)
    expected = model.predict(x[:20], verbose=0)

    code = """
import sys, numpy as np, keras
import mnist_cnn  # registers CNN with Keras
folder = sys.argv[1]
model = keras.saving.load_model(folder + "/cnn.keras")
assert type(model).__name__ == "CNN", type(model)
x = np.load(folder + "/x.npy")
np.save(folder + "/pred.npy", model.predict(x, verbose=0))
before = model.optimizer.iterations.numpy()
model.fit(np.load(folder + "/x.npy"), np.load(folder + "/y.npy")[:20], batch_size=10, verbose=0)
print("iterations", before, model.optimizer.iterations.numpy())
"""
    proc = run_python(code, tmp_path, lean=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "pred.npy"), expected, atol=1e-6)
    # the optimizer state came back with the model, and training continues from it
    assert "iterations 4 6" in proc.stdout


def test_nests_in_functional_and_sequential_models(tiny):
    x, y = tiny
    inputs = keras.Input((28, 28, 1))
    outputs = keras.layers.Dense(2)(CNN(dense_units=32)(inputs))
    functional = keras.Model(inputs, outputs)
    assert functional.output_shape == (None, 2)
    functional.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = functional.fit(x, y % 2, batch_size=50, epochs=2, verbose=0).history["loss"]
    assert np.isfinite(loss).all() and loss[-1] < loss[0]

    sequential = keras.Sequential([keras.Input((28, 28, 1)), CNN(dense_units=32)])
    assert sequential(x[:3]).shape == (3, 10)


def test_gradient_step_is_traceable_on_its_own(tiny):
    # the tutorial's manual loop wraps this very method in tf.function
    x, y = tiny
    model = compiled()
    step = tf.function(model.gradient_step)
    losses = [float(step(x[:50], y[:50])[0]) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert model.optimizer.iterations.numpy() == 5


def test_the_lean_dense_gradient_is_tensorflows_gradient_computed_the_other_way_round(tiny):
    """The same gradients for every weight as TensorFlow's own (float32 rounding apart: the dot products
    over dense1's 1024 units may be summed in another order; measured on an AVX-512 EPYC: none with oneDNN
    or Eigen, 9e-8 of the largest gradient with oneDNN capped at AVX2; the bound is 1000x that), and the
    same forward pass."""
    x, y = tiny
    gradients, outputs = {}, {}
    for lean in (False, True):
        keras.utils.set_random_seed(5)
        model = CNN()
        model.lean_dense_gradient = lean
        assert model.uses_lean_dense_gradient() is lean
        with tf.GradientTape() as tape:
            outputs[lean] = model(x[:16], training=True)
            loss = keras.losses.sparse_categorical_crossentropy(y[:16], outputs[lean])
        gradients[lean] = [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]
    np.testing.assert_array_equal(outputs[True].numpy(), outputs[False].numpy())
    for ours, theirs in zip(gradients[True], gradients[False], strict=True):
        assert np.abs(theirs).max() > 0
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


def test_the_lean_dense_gradient_is_only_for_float32_training_steps(tiny, monkeypatch):
    from mnist_cnn import dense_gradient

    x, y = tiny
    traced = []
    original = dense_gradient.matmul_lean_gradient
    monkeypatch.setattr(dense_gradient, "matmul_lean_gradient", lambda *a: traced.append(1) or original(*a))
    model = compiled(CNN())
    model.lean_dense_gradient = True
    model.predict(x[:4], verbose=0)
    model.evaluate(x[:4], y[:4], verbose=0)
    assert traced == []  # inference: Keras' own Dense
    model.fit(x[:8], y[:8], batch_size=4, epochs=1, verbose=0)
    first = len(traced)
    assert first  # the training step
    model.lean_dense_gradient = False  # the step is traced again, without it
    model.fit(x[:8], y[:8], batch_size=4, epochs=1, verbose=0)
    assert len(traced) == first
    model.lean_dense_gradient = True
    model.fit(x[:8], y[:8], batch_size=4, epochs=1, verbose=0)
    assert len(traced) > first
    with pytest.raises(ValueError, match="None, True or False"):
        model.lean_dense_gradient = "yes"
    assert not CNN(dtype="mixed_bfloat16").uses_lean_dense_gradient()  # bfloat16: no faster that way
    lean = CNN()
    lean.lean_dense_gradient = True
    lean.dense1.enable_lora(4)
    assert not lean.uses_lean_dense_gradient()  # LoRA: Keras' Dense.call computes the kernel


@pytest.mark.parametrize("bad", [(28, 28), (1, 28, 28, 1, 1)])
def test_wrong_input_rank_is_refused(bad):
    with pytest.raises(ValueError, match=re.escape(f"input of shape {bad}")):
        CNN()(np.zeros(bad, "float32"))


def test_fused_adam_follows_keras_adam(tiny):
    from mnist_cnn import FusedAdam

    x, y = tiny
    trained = {}
    for name, optimizer in (("keras", keras.optimizers.Adam(1e-3)), ("fused", FusedAdam(1e-3))):
        keras.utils.set_random_seed(3)
        model = CNN()
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        for start in range(0, 200, 50):
            model.train_on_batch(x[start : start + 50], y[start : start + 50])
        trained[name] = model
    assert int(trained["fused"].optimizer.iterations) == 4
    # the same update, one kernel instead of eight ops: equal up to float32 rounding, which
    # 1/(sqrt(v) + eps) magnifies for the few weights whose v is still near 0
    for a, b in zip(trained["keras"].get_weights(), trained["fused"].get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
        assert np.mean(np.abs(a - b) <= 1e-6) > 0.99
    def state(name):
        # (shape, kind) of each variable; names carry auto-numbered prefixes ("adam_6/", "cnn_3_")
        return [(tuple(v.shape), v.path.rsplit("/", 1)[-1].rsplit("_", 1)[-1])
                for v in trained[name].optimizer.variables]

    assert state("fused") == state("keras")  # the same state (iterations, m and v of each weight)
    with pytest.raises(ValueError, match="plain Adam"):
        FusedAdam(amsgrad=True)


def test_a_channels_first_keras_config_does_not_change_the_cnn(tiny, tmp_path):
    """A Keras user whose keras.json says channels_first still gets the tutorial's CNN
    (NHWC images, as its docs say), can save it and load it back."""
    x, _ = tiny
    reference = CNN()
    expected = reference(x[:4])
    keras.config.set_image_data_format("channels_first")
    try:
        model = CNN()
        model.set_weights(reference.get_weights())
        np.testing.assert_allclose(model(x[:4]), expected, atol=1e-6)
        model.save(tmp_path / "m.keras")
        np.testing.assert_allclose(keras.models.load_model(tmp_path / "m.keras")(x[:4]), expected, atol=1e-6)
    finally:
        keras.config.set_image_data_format("channels_last")


def test_the_cnns_features_fine_tune_a_new_head_on_fashion_mnist(sample, tmp_path):
    """Transfer learning as with keras.applications' include_top=False: a CNN trained on MNIST
    digits, its features frozen, a new head trained on Fashion-MNIST clothes; saved and loaded."""
    folder = fashion_mnist()
    (x, y), _ = sample
    keras.utils.set_random_seed(0)
    cnn = CNN()
    cnn.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    cnn.fit(x[:2000, ..., None] / 255.0, y[:2000], batch_size=50, epochs=1, verbose=0)
    features = cnn.features()
    digits = x[:8, ..., None].astype("float32") / 255.0
    assert features.output.shape == (None, 1024)
    by_hand = digits
    for layer in (cnn.conv1, cnn.pool1, cnn.conv2, cnn.pool2, cnn.flatten, cnn.dense1):
        by_hand = layer(by_hand)
    np.testing.assert_array_equal(features(digits), by_hand)  # the CNN's own layers and weights

    features.trainable = False
    model = keras.Sequential([features, keras.layers.Dense(10, activation="softmax", name="clothes")])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    (fx, fy), (tx, ty) = idx.read_split(folder, "train"), idx.read_split(folder, "test")
    frozen = [w.numpy().copy() for w in features.weights]
    model.fit(fx[:6000, ..., None] / 255.0, fy[:6000], batch_size=50, epochs=3, verbose=0)
    test_x, test_y = tx[:1000, ..., None] / 255.0, ty[:1000]
    accuracy = model.evaluate(test_x, test_y, verbose=0, return_dict=True)["accuracy"]
    assert accuracy > 0.5, accuracy  # chance is 0.1; 0.69 seen: a linear head on these features reads clothes
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(frozen, features.weights, strict=True))

    model.save(tmp_path / "clothes.keras")
    loaded = keras.saving.load_model(tmp_path / "clothes.keras")
    np.testing.assert_array_equal(loaded.predict(test_x[:16], verbose=0), model.predict(test_x[:16], verbose=0))
