"""Augmentation and the tf.data input pipeline shared by training and evaluation.

Augmentation (random flip, rotation, zoom, contrast) runs inside the tf.data pipeline on training
images only, never inside the exported model, so the served model sees exactly the preprocessing
of medops.dicom and nothing random. Augmented pixels are clipped back to [0, 1], the range every
other stage assumes.

The random ops are TensorFlow's stateless ones (tf.image.stateless_random_*, and one affine
ImageProjectiveTransformV3 for rotation + zoom), each image getting its own seed pair from a
seeded ``tf.data.Dataset.random`` stream that changes every epoch. That keeps the map parallel
AND the run repeatable. Keras' RandomRotation/RandomZoom layers were the first choice, but they
draw from one shared seed state: inside a parallel map their draws race, and two runs with the
same seed ended 0.02 apart in weights.

Params (``augment`` section, AugmentConfig), each 0 / "none" = off:
    rotation: up to this fraction of a full turn either way (as keras.layers.RandomRotation).
    flip: none | horizontal | vertical | horizontal_and_vertical (each with probability 1/2).
    zoom: scale by a factor in [1 - zoom, 1 + zoom] about the centre (as RandomZoom).
    contrast: scale deviations from the image mean by a factor in [1 - contrast, 1 + contrast].

TensorFlow is imported inside the functions: this module is cheap to import.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from medops.config import AugmentConfig

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf


def is_enabled(cfg: AugmentConfig | None) -> bool:
    """True when ``cfg`` turns on at least one augmentation."""
    return cfg is not None and (cfg.flip != "none" or cfg.rotation > 0 or cfg.zoom > 0 or cfg.contrast > 0
                                or cfg.noise > 0)


def affine_transform(angle: "tf.Tensor", scale: "tf.Tensor", size: int) -> "tf.Tensor":
    """ImageProjectiveTransform row (8,) for a rotation by ``angle`` (radians) and a zoom by
    ``scale`` (> 1 enlarges the content) about the image centre.

    The transform maps output pixel coordinates to input coordinates:
    ``in = c + R(angle) (out - c) / scale``.
    """
    import tensorflow as tf

    c = (size - 1) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = c - a0 * c - a1 * c
    b2 = c - b0 * c - b1 * c
    zero = tf.zeros_like(angle)
    return tf.stack([a0, a1, a2, b0, b1, b2, zero, zero])


def augment_image(image: "tf.Tensor", seed: "tf.Tensor", cfg: AugmentConfig) -> "tf.Tensor":
    """One random augmentation of one image (S, S, 1) in [0, 1]; deterministic given ``seed`` (2,).

    Args:
        image: float32 (S, S, 1).
        seed: int64 (2,) stateless seed.
        cfg: which augmentations, and how strong.
    """
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
    x = tf.convert_to_tensor(image, tf.float32)
    if cfg.flip in ("horizontal", "horizontal_and_vertical"):
        x = tf.image.stateless_random_flip_left_right(x, seed=seeds[0])
    if cfg.flip in ("vertical", "horizontal_and_vertical"):
        x = tf.image.stateless_random_flip_up_down(x, seed=seeds[1])
    if cfg.rotation > 0 or cfg.zoom > 0:
        turn = cfg.rotation * 2 * math.pi
        angle = tf.random.stateless_uniform((), seeds[2], -turn, turn) if cfg.rotation > 0 else tf.constant(0.0)
        scale = tf.random.stateless_uniform((), seeds[3], 1 - cfg.zoom, 1 + cfg.zoom) if cfg.zoom > 0 else tf.constant(1.0)
        size = int(image.shape[0])
        x = tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None],
            transforms=affine_transform(angle, scale, size)[None],
            output_shape=tf.constant([size, size], tf.int32),
            fill_value=0.0,
            interpolation="BILINEAR",
            # reflect fills the corners with image content instead of black wedges a model could key on
            fill_mode="REFLECT",
        )[0]
    if cfg.contrast > 0:
        factor = tf.random.stateless_uniform((), seeds[4], 1 - cfg.contrast, 1 + cfg.contrast)
        mean = tf.reduce_mean(x)
        x = (x - mean) * factor + mean
    if cfg.noise > 0:  # sensor noise: additive Gaussian, standard deviation cfg.noise
        x = x + cfg.noise * tf.random.stateless_normal(tf.shape(x), seeds[5])
    return tf.clip_by_value(x, 0.0, 1.0)


def build_input_pipeline(
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    batch_size: int,
    training: bool,
    augment_cfg: AugmentConfig | None = None,
    seed: int = 0,
) -> "tf.data.Dataset":
    """A batched tf.data pipeline over in-memory images (n, S, S, 1) in [0, 1].

    Training: shuffle (seeded, reshuffled every epoch), augment in a parallel map (per-image
    stateless seeds, new every epoch), batch, prefetch. Otherwise: batch and prefetch, in order,
    untouched.

    Args:
        images: float32 pixels (n, S, S, 1).
        labels: (n,) 0/1 labels, or None for prediction-only datasets.
        batch_size: batch size.
        training: shuffle and augment.
        augment_cfg: augmentation settings; None or all-off means no augmentation.
        seed: shuffle and augmentation seed.
    """
    import tensorflow as tf

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"images must be (n, S, S, 1), got {images.shape}")
    if labels is None:
        ds = tf.data.Dataset.from_tensor_slices((images,))
    else:
        labels = np.asarray(labels, dtype=np.float32).reshape(-1, 1)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        if is_enabled(augment_cfg):
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            ds = tf.data.Dataset.zip((ds, seeds)).map(
                lambda item, s: (augment_image(item[0], s, augment_cfg), *item[1:]),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
    ds = ds.map(lambda *item: item if len(item) > 1 else item[0])
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
