"""Adam with TensorFlow's fused update kernel.

Keras 3's Adam updates each variable with eight separate element-wise ops (sub, mul,
square, sqrt, div, assign-add x2, assign-sub); on the CNN's 3.27 M weights, at batch 50
on a 2-core CPU, the profiler (``bench.profile.op_class_profile``) puts that at about a third
of a training step's op time -- more than every convolution. ``FusedAdam`` computes
the same update with one ``ResourceApplyAdam`` kernel per variable:

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    w <- w - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

which is Keras' Adam formula (without amsgrad or weight decay, which it refuses). The moving
average of the weights (``use_ema``) is Keras' own, applied after the update as for any optimizer.
It is a ``keras.optimizers.Adam`` in everything else: state, schedules, loss scaling,
serialization (registered, so resume checkpoints load it back).
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _handle(variable):
    return variable.handle if hasattr(variable, "handle") else variable.value.handle


@keras.saving.register_keras_serializable(package="mnist_cnn")
class FusedAdam(keras.optimizers.Adam):
    """``keras.optimizers.Adam`` whose per-variable update is TensorFlow's fused kernel."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.amsgrad or self.weight_decay:
            raise ValueError("FusedAdam computes plain Adam: no amsgrad or weight_decay")

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Keras' ``from_config``, after checking that a file's hyperparameters are numbers
        Adam can use (a resume checkpoint's optimizer is built from them)."""
        bounds = {"beta_1": (0, 1), "beta_2": (0, 1), "epsilon": (0, 1), "learning_rate": (0, 1e3),
                  "ema_momentum": (0, 1)}
        for key, (low, high) in bounds.items():
            value = config.get(key)
            if isinstance(value, dict) and key == "learning_rate":
                continue  # a schedule: Keras deserializes and checks it
            if value is not None and (type(value) not in (int, float) or not low <= value <= high):
                raise ValueError(f"FusedAdam: {key}={value!r} is outside [{low}, {high}]")
        return super().from_config(config, custom_objects=custom_objects)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable),
            m=_handle(self._momentums[index]),
            v=_handle(self._velocities[index]),
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )
