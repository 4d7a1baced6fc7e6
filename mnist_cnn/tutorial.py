"""The tutorial the package grew from, kept runnable and tested.

1. ``conv_main``     -- the convolution principle on a 7x7 image (scripts/conv_demo.py);
2. ``reshape_main``  -- what ``Reshape((3*3*4,))`` does to a (1, 3, 3, 4) tensor (scripts/reshape_demo.py);
3. ``MNISTLoader``   -- the tutorial's loader with random ``get_batch``, on the package's data sources;
4. ``loop_main``     -- the hand-written GradientTape loop and batch-wise evaluation
                        (scripts/tutorial_loop.py). Its step is ``CNN.gradient_step``, the very
                        method ``CNN.train_step`` runs inside ``model.fit``.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from mnist_cnn import data
from mnist_cnn.model import CNN

# -- 1. the convolution principle ---------------------------------------------------

IMAGE = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 1, 2, 1, 0],
        [0, 0, 2, 2, 0, 1, 0],
        [0, 1, 1, 0, 2, 1, 0],
        [0, 0, 2, 1, 1, 0, 0],
        [0, 2, 1, 1, 2, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ],
    dtype=np.float32,
)
KERNEL = np.array([[0, 0, -1], [0, 1, 0], [-2, 0, 2]], dtype=np.float32)
BIAS = 1.0
# What the tutorial printed for the valid 3x3 convolution (stride 1).
EXPECTED = np.array(
    [
        [6, 5, -2, 1, 2],
        [3, 0, 3, 2, -2],
        [4, 2, -1, 0, 0],
        [2, 1, 2, -1, -3],
        [1, 1, 1, 3, 1],
    ],
    dtype=np.float32,
)


def keras_conv(image=IMAGE, kernel=KERNEL, bias=BIAS, padding="valid", strides=1) -> np.ndarray:
    """``image`` (H, W) through a one-filter Conv2D initialised with ``kernel`` and ``bias``."""
    layer = keras.layers.Conv2D(
        filters=1,
        kernel_size=kernel.shape,
        padding=padding,
        strides=strides,
        kernel_initializer=keras.initializers.Constant(kernel[:, :, None, None]),
        bias_initializer=keras.initializers.Constant(bias),
    )
    return keras.ops.convert_to_numpy(layer(image[None, :, :, None]))[0, :, :, 0]


def numpy_conv(image=IMAGE, kernel=KERNEL, bias=BIAS, padding="valid", strides=1) -> np.ndarray:
    """The same thing by hand: slide the kernel, multiply element-wise, sum, add the bias.

    "same" pads with zeros so that the output is ceil(H / strides) high, as Keras does.
    """
    kh, kw = kernel.shape
    if padding == "same":
        h, w = image.shape
        out_h, out_w = -(-h // strides), -(-w // strides)
        pad_h = max((out_h - 1) * strides + kh - h, 0)
        pad_w = max((out_w - 1) * strides + kw - w, 0)
        image = np.pad(image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))
    rows = range(0, image.shape[0] - kh + 1, strides)
    cols = range(0, image.shape[1] - kw + 1, strides)
    return np.array(
        [[np.sum(image[i : i + kh, j : j + kw] * kernel) + bias for j in cols] for i in rows],
        dtype=np.float32,
    )


def _grid(array: np.ndarray) -> str:
    return "\n".join(" ".join(f"{v:3g}" for v in row) for row in array)


def conv_demo() -> int:
    """Print the convolution principle on the 7x7 image; 0 when Keras, NumPy and the tutorial agree."""
    print(f"input image (7x7):\n{_grid(IMAGE)}\n")
    print(f"kernel (3x3), bias {BIAS:g}:\n{_grid(KERNEL)}\n")
    by_keras, by_hand = keras_conv(), numpy_conv()
    print(f"keras.layers.Conv2D(1, 3), padding='valid' -> {by_keras.shape}:\n{_grid(by_keras)}\n")
    print(f"sliding-window sum in NumPy -> {by_hand.shape}:\n{_grid(by_hand)}\n")
    agree = np.array_equal(by_keras, by_hand) and np.array_equal(by_keras, EXPECTED)
    print("they agree, and match the tutorial" if agree else "MISMATCH between Keras and NumPy")
    for padding, strides in (("same", 1), ("valid", 2), ("same", 2)):
        out = keras_conv(padding=padding, strides=strides)
        same = np.array_equal(out, numpy_conv(padding=padding, strides=strides))
        print(
            f"\npadding={padding!r}, strides={strides} -> {out.shape}"
            f" (NumPy {'agrees' if same else 'DISAGREES'}):\n{_grid(out)}"
        )
    print(
        "\n'same' pads the border with zeros so the output keeps the input's size (the CNN's convolutions"
        "\nuse it: 28x28 in, 28x28 out); strides=2 moves the window two pixels at a time, halving each side."
    )
    return 0 if agree else 1


# -- 2. the Reshape illustration -------------------------------------------------------


def reshape_demo(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random (1, 3, 3, 4) tensor and its ``Reshape((3 * 3 * 4,))`` output (1, 36)."""
    x = keras.random.normal((1, 3, 3, 4), seed=seed)
    y = keras.layers.Reshape((3 * 3 * 4,))(x)
    return keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y)


def print_reshape_demo(seed: int = 0) -> None:
    x, y = reshape_demo(seed)
    with np.printoptions(precision=4, suppress=True, linewidth=100):
        print(f"input {x.shape} (3 rows x 3 columns x 4 channels):\n{x[0]}\n")
        print(f"Reshape((3 * 3 * 4,)) -> {y.shape}:\n{y[0]}\n")
    print("row-major order, channels fastest: the 4 channels of pixel (0,0), then of (0,1), ...")
    print("the CNN flattens its (7, 7, 64) feature map into 3136 numbers the same way.")


# -- 3. the loader ---------------------------------------------------------------------


class MNISTLoader:
    """The tutorial's loader: the whole dataset in memory, random batches on demand.

    ``source`` is any ``--data`` choice (auto, tfds, sample, an IDX folder).
    """

    def __init__(self, source: str = "auto", data_dir: str | None = None, seed: int | None = None):
        (train_x, train_y), (test_x, test_y), self.info = data.load_arrays(source, data_dir)
        # uint8 0-255 -> float32 in [0, 1], plus a channel axis
        self.train_data = np.expand_dims(train_x.astype(np.float32) / 255.0, axis=-1)  # [N, 28, 28, 1]
        self.test_data = np.expand_dims(test_x.astype(np.float32) / 255.0, axis=-1)  # [M, 28, 28, 1]
        self.train_label = train_y.astype(np.int32)  # [N]
        self.test_label = test_y.astype(np.int32)  # [M]
        self.num_train_data, self.num_test_data = self.train_data.shape[0], self.test_data.shape[0]
        self._rng = np.random.default_rng(seed)

    def get_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """``batch_size`` random training examples (drawn with replacement, as in the tutorial)."""
        index = self._rng.integers(0, self.num_train_data, batch_size)
        return self.train_data[index, :], self.train_label[index]


# -- 4. the manual loop ---------------------------------------------------------------


def tutorial_model(learning_rate: float = 1e-3) -> CNN:
    """The CNN compiled with the tutorial's optimizer and loss (compile supplies both to
    ``CNN.gradient_step``; nothing else of Keras' training loop is used here)."""
    model = CNN()
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
    )
    return model


def train_loop(
    model: CNN,
    loader: MNISTLoader,
    num_epochs: int = 5,
    batch_size: int = 50,
    max_batches: int | None = None,
    eager: bool = False,
    on_batch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """The tutorial's training: ``num_train // batch_size * num_epochs`` random batches.

    Each batch is one ``model.gradient_step`` (wrapped in ``tf.function`` unless
    ``eager``). Returns the per-batch losses; ``on_batch(index, loss)`` sees each.
    """
    step = model.gradient_step if eager else tf.function(model.gradient_step)
    num_batches = int(loader.num_train_data // batch_size * num_epochs)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    losses = []
    for batch_index in range(num_batches):
        x, y = loader.get_batch(batch_size)
        loss, _ = step(tf.convert_to_tensor(x), tf.convert_to_tensor(y))
        losses.append(float(loss))
        if on_batch is not None:
            on_batch(batch_index, losses[-1])
    return losses


def evaluate_batchwise(model: keras.Model, loader: MNISTLoader, batch_size: int = 50) -> float:
    """The tutorial's evaluation: ``model.predict`` batch by batch into a
    SparseCategoricalAccuracy (including a last, smaller batch)."""
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    for start in range(0, loader.num_test_data, batch_size):
        end = start + batch_size
        y_pred = model.predict(loader.test_data[start:end], verbose=0)
        accuracy.update_state(y_true=loader.test_label[start:end], y_pred=y_pred)
    return float(accuracy.result())


