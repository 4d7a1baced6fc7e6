import re

import numpy as np
import pytest

from mnist_cnn import CNN, tutorial
from mnist_cnn.cli import tutorial as tutorial_cli
from mnist_cnn.tutorial import EXPECTED, MNISTLoader


def test_convolution_principle_matches_the_tutorial_exactly():
    np.testing.assert_array_equal(tutorial.keras_conv(), EXPECTED)
    np.testing.assert_array_equal(tutorial.numpy_conv(), EXPECTED)


@pytest.mark.parametrize("padding, strides, shape", [("same", 1, (7, 7)), ("valid", 2, (3, 3)), ("same", 2, (4, 4))])
def test_padding_and_strides_agree_with_the_sliding_window(padding, strides, shape):
    by_keras = tutorial.keras_conv(padding=padding, strides=strides)
    assert by_keras.shape == shape
    np.testing.assert_array_equal(by_keras, tutorial.numpy_conv(padding=padding, strides=strides))
    if padding == "same" and strides == 1:
        np.testing.assert_array_equal(by_keras[1:6, 1:6], EXPECTED)  # the interior is the valid result


def test_conv_demo_prints_the_table_and_agreement(capsys):
    assert tutorial_cli.conv_main([]) == 0
    out = capsys.readouterr().out
    table = "  6   5  -2   1   2\n  3   0   3   2  -2\n  4   2  -1   0   0\n  2   1   2  -1  -3\n  1   1   1   3   1"
    assert table in out
    assert "they agree, and match the tutorial" in out
    assert "padding='same', strides=1 -> (7, 7)" in out


def test_reshape_is_row_major_with_channels_fastest():
    x, y = tutorial.reshape_demo(seed=3)
    assert x.shape == (1, 3, 3, 4) and y.shape == (1, 36)
    np.testing.assert_array_equal(y, x.reshape(1, 36))
    np.testing.assert_array_equal(y[0, :4], x[0, 0, 0, :])  # pixel (0, 0), all 4 channels first
    np.testing.assert_array_equal(y[0, 4:8], x[0, 0, 1, :])


def test_the_cnn_flattens_its_feature_map_the_same_way():
    feature_map = np.random.default_rng(0).normal(size=(2, 7, 7, 64)).astype("float32")
    flat = np.asarray(CNN().flatten(feature_map))
    np.testing.assert_array_equal(flat, feature_map.reshape(2, 7 * 7 * 64))


def test_reshape_demo_prints_both(capsys):
    assert tutorial_cli.reshape_main(["--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "input (1, 3, 3, 4)" in out and "Reshape((3 * 3 * 4,)) -> (1, 36)" in out


@pytest.fixture(scope="module")
def loader():
    return MNISTLoader("sample", seed=0)


def test_loader_has_the_tutorial_attributes(loader):
    assert loader.train_data.shape == (4000, 28, 28, 1) and loader.train_data.dtype == np.float32
    assert loader.test_data.shape == (1000, 28, 28, 1) and loader.test_data.dtype == np.float32
    assert loader.train_label.dtype == np.int32 and loader.test_label.dtype == np.int32
    assert (loader.num_train_data, loader.num_test_data) == (4000, 1000)
    assert loader.train_data.min() == 0.0 and loader.train_data.max() == 1.0
    assert set(np.unique(loader.train_label)) == set(range(10))


def test_get_batch_draws_from_the_training_part_only(loader):
    train_rows = {row.tobytes(): label for row, label in zip(loader.train_data, loader.train_label, strict=True)}
    test_rows = {row.tobytes() for row in loader.test_data}
    for size in (1, 50, 123):
        x, y = loader.get_batch(size)
        assert x.shape == (size, 28, 28, 1) and y.shape == (size,)
        for row, label in zip(x, y, strict=True):
            assert train_rows[row.tobytes()] == label and row.tobytes() not in test_rows
    a = MNISTLoader("sample", seed=5).get_batch(20)[1]
    b = MNISTLoader("sample", seed=5).get_batch(20)[1]
    np.testing.assert_array_equal(a, b)


def test_manual_loop_lowers_the_loss_through_the_shared_step(loader, monkeypatch):
    calls = []
    original = CNN.gradient_step

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CNN, "gradient_step", counting)
    model = tutorial.tutorial_model()
    seen = []
    losses = tutorial.train_loop(model, loader, max_batches=40, eager=True, on_batch=lambda i, loss: seen.append(i))
    assert len(calls) == 40  # eager: one call of CNN.gradient_step per batch
    assert seen == list(range(40))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert model.optimizer.iterations.numpy() == 40
    accuracy = tutorial.evaluate_batchwise(model, loader)
    predicted = model.predict(loader.test_data, verbose=0).argmax(1)
    assert accuracy == pytest.approx((predicted == loader.test_label).mean(), abs=1e-6)


def test_number_of_batches_follows_the_tutorial(loader):
    losses = tutorial.train_loop(tutorial.tutorial_model(), loader, num_epochs=1, batch_size=500)
    assert len(losses) == 4000 // 500 * 1


def test_tutorial_loop_script_prints_the_tutorial_formats(capsys):
    argv = ["--data", "sample", "--max-batches", "25", "--log-every", "10", "--seed", "1"]
    assert tutorial_cli.loop_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    batch_lines = [line for line in lines if line.startswith("batch ")]
    assert [line.split(":")[0] for line in batch_lines] == ["batch 0", "batch 10", "batch 20"]
    assert all(re.fullmatch(r"batch \d+: loss \d+\.\d{6}", line) for line in batch_lines)
    assert re.fullmatch(r"test accuracy: 0\.\d{6}", [line for line in lines if line.startswith("test")][0])
    assert tutorial_cli.loop_main(argv + ["--quiet"]) == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("batch ")]
