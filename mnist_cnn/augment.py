"""Random distortions of training batches, each a pure function of (images, seed): the same
seed gives the same batch, which is what makes a resumed run bit-exact (``data.training_stream``
draws batch i's seed from (run seed, i)).

- ``augment_batch``: a random rotation of +-10 degrees, shift and zoom of +-10 % (``--augment``;
  the strengths: ``--augment-rotation``, ``--augment-shift``, ``--augment-zoom``);
- ``elastic_batch``: elastic distortions (Simard et al. 2003) (``--elastic``; ``--elastic-alpha``,
  ``--elastic-sigma``).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

SEED_OFFSET = 1 << 32  # stream position i augments with (seed, i + offset), apart from pass seeds


@dataclass(frozen=True)
class Strengths:
    """How far the distortions go (TrainConfig's --augment-* and --elastic-* options)."""

    rotation: float = 10.0  # degrees, either way
    shift: float = 0.1  # of the image's side, either way
    zoom: float = 0.1  # scale 1 - zoom to 1 + zoom
    elastic_alpha: float = 34.0  # pixels
    elastic_sigma: float = 4.0  # pixels


def augment_batch(images: tf.Tensor, seed: tf.Tensor, strengths: Strengths | None = None) -> tf.Tensor:
    """Small random rotations (±10°), shifts (±10 %) and zooms (±10 %) per image (``strengths``),
    zero-filled: digits a writer could have drawn. Drawn statelessly from ``seed`` (two integers),
    so a batch is augmented the same way in every run with that seed and after a resume."""
    strengths = strengths or Strengths()
    count = tf.shape(images)[0]
    u = tf.random.stateless_uniform(tf.stack([count, 4]), seed=seed, minval=-1.0, maxval=1.0)
    shift = strengths.shift * 28
    angle, shift_x, shift_y = u[:, 0] * (strengths.rotation / 180 * np.pi), u[:, 1] * shift, u[:, 2] * shift
    zoom = 1.0 + strengths.zoom * u[:, 3]
    # output pixel p reads input pixel R(angle) (p - centre - shift) / zoom + centre
    cos, sin, centre = tf.cos(angle) / zoom, tf.sin(angle) / zoom, 13.5
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = centre - a0 * (centre + shift_x) - a1 * (centre + shift_y)
    b2 = centre - b0 * (centre + shift_x) - b1 * (centre + shift_y)
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return keras.ops.image.affine_transform(images, transforms, interpolation="bilinear", fill_mode="constant")


def _gaussian_kernel(sigma: float) -> tf.Tensor:
    radius = int(round(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    return tf.constant(np.outer(g, g)[:, :, None, None], tf.float32)


def elastic_batch(images: tf.Tensor, seed: tf.Tensor, alpha: float = 34.0, sigma: float = 4.0) -> tf.Tensor:
    """Simard et al.'s elastic distortion per image: a random displacement field (uniform in
    [-1, 1] per pixel), smoothed by a Gaussian of ``sigma`` pixels and scaled by ``alpha``,
    then bilinear resampling; zero outside the image. Stateless in ``seed``."""
    shape = tf.shape(images)
    count, height, width = shape[0], shape[1], shape[2]
    noise = tf.random.stateless_uniform(tf.stack([count * 2, height, width, 1]), seed=seed, minval=-1.0, maxval=1.0)
    field = tf.nn.conv2d(noise, _gaussian_kernel(sigma), strides=1, padding="SAME") * alpha
    dy, dx = tf.split(tf.reshape(field, tf.stack([count, 2, height, width])), 2, axis=1)
    rows = tf.cast(tf.range(height), tf.float32)[None, :, None] + dy[:, 0]
    cols = tf.cast(tf.range(width), tf.float32)[None, None, :] + dx[:, 0]
    return _bilinear(images, rows, cols)


def _bilinear(images, rows, cols):
    """images [B, H, W, C] sampled at (rows, cols) [B, H, W], zero outside."""
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]])  # a zero border for samples outside
    r = tf.clip_by_value(rows + 1.0, 0.0, tf.cast(height, tf.float32) + 1.0)
    c = tf.clip_by_value(cols + 1.0, 0.0, tf.cast(width, tf.float32) + 1.0)
    r0, c0 = tf.floor(r), tf.floor(c)
    wr, wc = (r - r0)[..., None], (c - c0)[..., None]
    r0 = tf.cast(r0, tf.int32)
    c0 = tf.cast(c0, tf.int32)
    r1 = tf.minimum(r0 + 1, height + 1)
    c1 = tf.minimum(c0 + 1, width + 1)

    def at(rr, cc):
        return tf.gather_nd(padded, tf.stack([rr, cc], axis=-1), batch_dims=1)

    top = at(r0, c0) * (1 - wc) + at(r0, c1) * wc
    bottom = at(r1, c0) * (1 - wc) + at(r1, c1) * wc
    return top * (1 - wr) + bottom * wr
