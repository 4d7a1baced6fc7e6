"""The tutorial's CNN as a Keras 3 model with its own GradientTape training step.

conv 32@5x5 same relu -> maxpool 2 -> conv 64@5x5 same relu -> maxpool 2
-> Reshape(7*7*64) -> Dense 1024 relu -> Dense 10 -> softmax

``CNN.gradient_step`` is the one place where gradients are computed and applied;
``train_step`` (used by ``model.fit``) and the tutorial's manual loop both call it.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import tensorflow as tf

from mnist_cnn import dense_gradient, idx
from mnist_cnn.errors import BackendError

IMAGE_SHAPE = (*idx.IMAGE_SHAPE, 1)  # one channel: MNIST's digits, NHWC


def build_optimizer(model: keras.Model) -> None:
    """A compiled model's optimizer variables (slots, step count, EMA averages), made once: Keras'
    LossScaleOptimizer would make a second set if built again."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def require_tensorflow(what: str) -> None:
    """Training needs the TensorFlow backend; loading, predicting and evaluating do not."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise BackendError.training(what, backend)

INPUT_SHAPE = (None, *IMAGE_SHAPE)

# A CNN's sizes, checked whenever one is built from a config (a file's, through Keras'
# load_model too) before anything is allocated: at most 50 M parameters (200 MB of float32;
# the tutorial's CNN has 3.3 M).
SIZE_BOUNDS = {
    "filters1": (1, 1024),
    "filters2": (1, 1024),
    "kernel_size": (1, 28),
    "dense_units": (1, 16384),
    "num_classes": (2, 1000),
}
MAX_PARAMETERS = 50_000_000


@keras.saving.register_keras_serializable(package="mnist_cnn")
class CNN(keras.Model):
    """The two-convolution MNIST classifier; outputs class probabilities (softmax).

    Input: float images ``(batch, 28, 28, 1)`` or ``(batch, 28, 28)`` scaled to [0, 1];
    integer images are refused (divide uint8 digits by 255 first) rather than silently
    mis-scaled. The input shape is fixed, so the model is built when it is made: it
    has its 3,274,634 weights (and a ``summary()``) before any call.

    Every size is a constructor argument and part of ``get_config()``, and so are the
    names of frozen layers (``frozen``), so the model rebuilds from its config alone
    (``keras.saving.load_model`` needs nothing but the import).
    """

    step_scalars = None  # callbacks.StepScalars' writer, called in train_step when several steps run a call

    def __init__(
        self,
        filters1: int = 32,
        filters2: int = 64,
        kernel_size: int = 5,
        dense_units: int = 1024,
        num_classes: int = 10,
        dropout: float = 0.0,
        frozen: tuple[str, ...] | list[str] = (),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters1 = filters1
        self.filters2 = filters2
        self.kernel_size = kernel_size
        self.dense_units = dense_units
        self.num_classes = num_classes
        self.dropout = dropout

        # The model's dtype policy (e.g. CNN(dtype="mixed_bfloat16")) applies to every layer ...
        # Images are NHWC whatever keras.config.image_data_format() says (keras.json).
        policy, nhwc = self.dtype_policy, "channels_last"
        self.conv1 = keras.layers.Conv2D(
            filters1, kernel_size, padding="same", activation="relu", name="conv1", dtype=policy, data_format=nhwc
        )
        self.pool1 = keras.layers.MaxPooling2D(pool_size=2, strides=2, name="pool1", dtype=policy, data_format=nhwc)
        self.conv2 = keras.layers.Conv2D(
            filters2, kernel_size, padding="same", activation="relu", name="conv2", dtype=policy, data_format=nhwc
        )
        self.pool2 = keras.layers.MaxPooling2D(pool_size=2, strides=2, name="pool2", dtype=policy, data_format=nhwc)
        # 28 -> 14 -> 7 after the two poolings.
        self.flatten = keras.layers.Reshape((7 * 7 * filters2,), name="flatten", dtype=policy)
        self.dense1 = keras.layers.Dense(dense_units, activation="relu", name="dense1", dtype=policy)
        # Off by default: the tutorial's CNN has no dropout.
        self.drop = keras.layers.Dropout(dropout, name="dropout", dtype=policy) if dropout else None
        self.dense2 = keras.layers.Dense(num_classes, name="dense2", dtype=policy)
        # ... but the probabilities are float32 even under mixed precision.
        self.softmax = keras.layers.Softmax(dtype="float32", name="softmax")

        self.build(INPUT_SHAPE)
        names = {layer.name: layer for layer in self.layers_in_order()}
        for name in frozen:
            if name not in names:
                raise ValueError(f"frozen: no layer {name!r} (the CNN's layers are {', '.join(names)})")
            names[name].trainable = False
        if not self.trainable:
            # CNN(trainable=False) (how Keras rebuilds a frozen CNN nested in another
            # model) set the flag before the layers existed: pass it on to them now.
            # (Not `self.trainable = False`: TensorFlow's tracking skips assigning a
            # value an attribute already has, so the setter would never run.)
            for layer in self.layers:
                layer.trainable = False

    def features(self, name: str = "cnn_features") -> keras.Model:
        """The CNN without its classifier: a functional model from images (N, 28, 28, 1) to
        dense1's activations (N, dense_units), sharing this CNN's layers and weights -- what
        ``keras.applications`` gives with ``include_top=False``. Freeze it and put a new head
        on it for another task; the result saves and loads as an ordinary ``.keras`` model."""
        inputs = keras.Input(INPUT_SHAPE[1:], name="images")
        x = inputs
        for layer in (self.conv1, self.pool1, self.conv2, self.pool2, self.flatten, self.dense1):
            x = layer(x)
        return keras.Model(inputs, x, name=name)

    def layers_in_order(self) -> tuple[keras.layers.Layer, ...]:
        """The layers an image passes through, in order (without dropout and softmax)."""
        return (self.conv1, self.pool1, self.conv2, self.pool2, self.flatten, self.dense1, self.dense2)

    def build(self, input_shape=INPUT_SHAPE):
        # Build the layers in order so the model has weights before its first
        # call (and can be saved, summarised and counted at once). Built once.
        if self.conv1.built:
            return
        shape = tuple(input_shape)
        for layer in self.layers_in_order():
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.softmax.build(shape)

    def get_build_config(self):
        return {"input_shape": INPUT_SHAPE}  # fixed: Keras would record {} after build()

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """``keras.Model.export`` with the CNN's input signature, float32 (N, 28, 28, 1),
        by default: Keras infers it only from a model that was called since it was made,
        so a model fresh from ``load_model`` could not be exported."""
        if input_signature is None:
            input_signature = [keras.InputSpec(shape=INPUT_SHAPE, dtype="float32")]
        return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)

    def build_from_config(self, config):
        # The input shape is fixed. Keras' default, given a build_config it cannot
        # build from (an edited file), only warns and leaves the model without
        # weights -- and then loads nothing into it: refuse such a config instead.
        check_build_config(config)
        self.build()

    def call(self, inputs, training=False):
        x = self._standard_input(inputs)  # [batch, 28, 28, 1]
        x = self.conv1(x)  # [batch, 28, 28, 32]
        x = self.pool1(x)  # [batch, 14, 14, 32]
        x = self.conv2(x)  # [batch, 14, 14, 64]
        x = self.pool2(x)  # [batch, 7, 7, 64]
        x = self.flatten(x)  # [batch, 7 * 7 * 64]
        x = self._dense1(x, training)  # [batch, 1024]
        if self.drop is not None:
            x = self.drop(x, training=training)
        x = self.dense2(x)  # [batch, 10]
        return self.softmax(x)

    def _dense1(self, x, training):
        """dense1(x); in a training step where ``uses_lean_dense_gradient()``, ``dense_gradient.dense_call``."""
        if training and self.uses_lean_dense_gradient():
            return dense_gradient.dense_call(self.dense1, x)
        return self.dense1(x)

    @property
    def lean_dense_gradient(self) -> bool | None:
        """dense1's input gradient by ``dense_gradient.matmul_lean_gradient``: None (the default) where
        that is faster (``dense_gradient.applies``), True/False always/never. The same products."""
        return getattr(self, "_lean_dense_gradient", None)

    @lean_dense_gradient.setter
    def lean_dense_gradient(self, value: bool | None) -> None:
        if value is not None and type(value) is not bool:
            raise ValueError(f"lean_dense_gradient={value!r}: None, True or False")
        self._lean_dense_gradient = value
        self.train_function = None  # traced with the old choice: trace the step again

    def uses_lean_dense_gradient(self) -> bool:
        """Whether a training step computes dense1's input gradient the faster way round
        (``dense_gradient.applies`` to ``lean_dense_gradient``)."""
        return dense_gradient.applies(self.dense1, self.lean_dense_gradient)

    @staticmethod
    def _standard_input(inputs):
        """(N, 28, 28) or (N, 28, 28, 1) float images as (N, 28, 28, 1); anything else is
        refused -- never reshaped into other rows."""
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if "float" not in dtype:
            raise ValueError(f"CNN takes float images scaled to [0, 1]; got {dtype}: divide 0-255 images by 255 first")
        if getattr(inputs.shape, "rank", 0) is None:
            # A tf.function traced for several input ranks (predict on both forms): check at run time.
            x = tf.cond(tf.rank(inputs) == 3, lambda: tf.expand_dims(inputs, -1), lambda: inputs)
            return tf.ensure_shape(x, INPUT_SHAPE)
        shape = tuple(inputs.shape)
        if len(shape) not in (3, 4) or shape[1:3] != IMAGE_SHAPE[:2] or shape[3:] not in ((), (1,)):
            raise ValueError(f"CNN takes images of shape (N, 28, 28) or (N, 28, 28, 1); got input of shape {shape}")
        return inputs if len(shape) == 4 else keras.ops.expand_dims(inputs, -1)

    @classmethod
    def from_config(cls, config):
        """Keras' ``from_config``, after ``check_sizes``: a file's config cannot make
        ``keras.saving.load_model`` allocate more than ``MAX_PARAMETERS`` weights."""
        check_sizes(config)
        return super().from_config(config)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters1=self.filters1,
            filters2=self.filters2,
            kernel_size=self.kernel_size,
            dense_units=self.dense_units,
            num_classes=self.num_classes,
            dropout=self.dropout,
            frozen=[layer.name for layer in self.layers_in_order() if not layer.trainable and self.trainable],
        )
        return config

    # -- training --------------------------------------------------------------

    @property
    def label_smoothing(self) -> float:
        """e: the training loss aims at 1 - e on the label and e / classes on every class (Szegedy et
        al. 2016, Keras' ``label_smoothing``), while validation and test losses stay the plain
        cross-entropy, comparable with runs without it. 0 (the tutorial's loss) unless set."""
        return getattr(self, "_label_smoothing", 0.0)

    @label_smoothing.setter
    def label_smoothing(self, value: float) -> None:
        if type(value) not in (int, float) or not 0 <= value < 1:
            raise ValueError(f"label_smoothing={value!r} is outside [0, 1)")
        self._label_smoothing = float(value)
        self.train_function = None  # traced with the old value: trace the step again

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        smoothing = self.label_smoothing
        if not (training and smoothing):
            return loss
        # the smoothed targets' cross-entropy is (1 - e) CE(label) + e CE(uniform), and CE(uniform) is
        # the mean over classes of -log p, clipped as Keras clips probabilities
        probs = keras.ops.clip(keras.ops.cast(y_pred, "float32"), keras.config.epsilon(), 1.0)
        uniform = -keras.ops.mean(keras.ops.log(probs), axis=-1)
        if sample_weight is not None:
            uniform = uniform * keras.ops.cast(keras.ops.reshape(sample_weight, (-1,)), "float32")
        # divided by the replicas as Keras divides the loss it computed (see _track_loss)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return (1 - smoothing) * loss + smoothing * keras.ops.mean(uniform) / replicas

    def gradient_step(self, x, y, sample_weight=None):
        """One optimisation step: forward pass, loss, gradients, update.

        Uses the loss and optimizer given to ``compile``. Returns ``(loss, y_pred)``
        where ``loss`` is the loss as Keras computed it for this replica.
        """
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            # Mixed precision: scale up so float16 gradients do not underflow;
            # the optimizer unscales them again in apply().
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_weights)
        self.optimizer.apply(gradients, self.trainable_weights)
        return loss, y_pred

    def train_step(self, *args):
        # Training is TensorFlow's GradientTape (the point of this package); other
        # backends call train_step(state, data) and get a clear refusal instead.
        require_tensorflow("training a CNN")
        (data,) = args
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        loss, y_pred = self.gradient_step(x, y, sample_weight)
        self._track_loss(loss, x)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if self.step_scalars is not None:
            self.step_scalars(logs, self.optimizer.iterations)
        return _reducible(logs)

    def test_step(self, *args):
        if keras.backend.backend() != "tensorflow":
            return super().test_step(*args)  # evaluate() is inference: Keras' own step for JAX/torch
        (data,) = args
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        loss = self.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        self._track_loss(loss, x)
        return _reducible(self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))

    def _track_loss(self, loss, x):
        # Keras divides each replica's loss by the number of replicas so that
        # summed gradients are right; undo that for the logged value so the
        # "loss" metric is the true mean loss over the batch.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss * replicas, sample_weight=tf.shape(x)[0])


def _reducible(logs: dict) -> dict:
    """Step results in the shape Keras can reduce across workers.

    Under MultiWorkerMirroredStrategy Keras 3 (3.15 here) averages each result with
    ``strategy.reduce("MEAN", value, axis=0)``, which fails on scalars; give them
    one axis there (the reduce returns scalars again). Elsewhere: unchanged.
    """
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


def parameter_count(config: dict) -> int:
    """The CNN's weights for a config: two convolutions and two dense layers; a field the
    config leaves out takes ``CNN``'s own default."""
    defaults = {name: p.default for name, p in inspect.signature(CNN.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    c = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    k, f1, f2, units, classes = (c[name] for name in ("kernel_size", "filters1", "filters2", "dense_units",
                                                      "num_classes"))
    return (k * k * f1 + f1) + (k * k * f1 * f2 + f2) + (7 * 7 * f2 * units + units) + (units * classes + classes)


def check_sizes(config: dict) -> None:
    """ValueError unless ``config``'s sizes are whole numbers within ``SIZE_BOUNDS``, dropout in
    [0, 1), and the whole at most ``MAX_PARAMETERS`` weights."""
    for key, (low, high) in SIZE_BOUNDS.items():
        value = config.get(key)
        if value is not None and (type(value) is not int or not low <= value <= high):
            raise ValueError(f"{key}={value!r} is outside {low}-{high}")
    dropout = config.get("dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r} is outside [0, 1)")
    parameters = parameter_count(config)
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"a CNN of {parameters:,} parameters; at most {MAX_PARAMETERS:,} are built")


def check_build_config(config) -> None:
    """A saved ``build_config`` must describe the CNN's input, (None, 28, 28[, 1])."""
    config = dict(config or {})
    shapes = list(config.pop("shapes_dict", {}).values())
    if "input_shape" in config:
        shapes.append(config.pop("input_shape"))
    for shape in shapes:
        if not isinstance(shape, (list, tuple)) or tuple(shape[1:]) not in (IMAGE_SHAPE, IMAGE_SHAPE[:2]):
            raise ValueError(f"build_config input shape {shape!r} is not the CNN's (None, 28, 28, 1)")
    if config:
        raise ValueError(f"build_config has unknown entries {sorted(config)}")


def _random_generators(model: keras.Model) -> dict:
    """The model's variables that are not weights, in order, keyed ``<position>:<name>`` (their
    paths carry a per-process counter, so they differ between two CNNs of one process)."""
    weights = {id(v) for v in model.weights}
    others = [v for v in model.variables if id(v) not in weights]
    return {f"{i}:{v.name}": v for i, v in enumerate(others)}


def random_state(model: keras.Model) -> dict[str, list[int]]:
    """The states of the model's random generators (dropout's ``SeedGenerator``): variables
    of the model that are not weights, which ``model.save`` does not keep. Part of the
    resume state, so that a resumed run draws the dropout masks the killed one would have."""
    return {name: [int(n) for n in keras.ops.convert_to_numpy(v)] for name, v in _random_generators(model).items()}


def restore_random_state(model: keras.Model, saved: dict[str, list[int]]) -> None:
    """Set the generators ``random_state`` recorded; ValueError if they are not this model's."""
    current = _random_generators(model)
    if set(saved) != set(current):
        raise ValueError(f"random generator states {sorted(saved)} do not fit the model's {sorted(current)}")
    for name, value in saved.items():
        current[name].assign(np.asarray(value, dtype=current[name].dtype))
