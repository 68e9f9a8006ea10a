"""augment: random ops from AugmentConfig, applied in tf.data to training images only."""

from __future__ import annotations

import numpy as np
import pytest

from _ingested import load_bundled
import tensorflow as tf

from medops.learn.input_pipeline import affine_transform, augment_image, build_input_pipeline, is_enabled
from medops.config import AugmentConfig

STRONG = AugmentConfig(rotation=0.2, flip="horizontal_and_vertical", zoom=0.3, contrast=0.9)


@pytest.fixture(scope="module")
def images():
    data = load_bundled()
    return (data["train_images"][:64].astype(np.float32) / 255.0)[..., None]


def _collect(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def test_all_off_is_not_enabled():
    assert not is_enabled(AugmentConfig(rotation=0, flip="none", zoom=0, contrast=0))
    assert not is_enabled(None)
    assert is_enabled(AugmentConfig(rotation=0, flip="none", zoom=0, contrast=0.1))


def test_affine_transform_by_hand():
    # No rotation, no zoom: the identity.
    np.testing.assert_allclose(affine_transform(tf.constant(0.0), tf.constant(1.0), 5).numpy(), [1, 0, 0, 0, 1, 0, 0, 0])
    # A quarter turn of a 3x3 image about its centre (1, 1): out (0, 0) reads in (2, 0).
    t = affine_transform(tf.constant(np.pi / 2, tf.float32), tf.constant(1.0), 3).numpy()
    x_in = t[0] * 0 + t[1] * 0 + t[2]
    y_in = t[3] * 0 + t[4] * 0 + t[5]
    assert (x_in, y_in) == pytest.approx((2.0, 0.0), abs=1e-6)
    # Zoom by 2 about the centre of a 5x5 image: out (0, 0) reads in (1, 1).
    t = affine_transform(tf.constant(0.0), tf.constant(2.0), 5).numpy()
    assert (t[2], t[5]) == pytest.approx((1.0, 1.0))


def test_flip_only_gives_the_image_or_its_mirror(images):
    cfg = AugmentConfig(rotation=0, flip="vertical", zoom=0, contrast=0)
    outs = [augment_image(images[0], tf.constant([i, 7], tf.int64), cfg).numpy() for i in range(12)]
    same = [np.array_equal(o, images[0]) for o in outs]
    mirrored = [np.array_equal(o, images[0][::-1]) for o in outs]
    assert all(a or b for a, b in zip(same, mirrored))
    assert any(same) and any(mirrored)


def test_augment_image_is_a_function_of_its_seed(images):
    a = augment_image(images[1], tf.constant([1, 2], tf.int64), STRONG).numpy()
    b = augment_image(images[1], tf.constant([1, 2], tf.int64), STRONG).numpy()
    c = augment_image(images[1], tf.constant([1, 3], tf.int64), STRONG).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_training_pipeline_changes_images_and_stays_in_unit_range(images):
    labels = np.arange(len(images)) % 2
    x, y = _collect(build_input_pipeline(images, labels, batch_size=16, training=True, augment_cfg=STRONG,
                                         seed=1))
    assert x.shape == images.shape and x.dtype == np.float32
    assert y.shape == (len(images), 1)
    assert x.min() >= 0.0 and x.max() <= 1.0
    # Shuffled, so compare as sets: no augmented image equals any original image.
    flat_in = images.reshape(len(images), -1)
    flat_out = x.reshape(len(x), -1)
    nearest = np.abs(flat_out[:, None, :] - flat_in[None, :, :]).max(axis=2).min(axis=1)
    assert (nearest > 1e-3).all()


def test_evaluation_pipeline_is_untouched_and_in_order(images):
    labels = np.arange(len(images)) % 2
    x, y = _collect(build_input_pipeline(images, labels, batch_size=16, training=False, augment_cfg=STRONG))
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y[:, 0], labels)


def test_training_pipeline_is_repeatable_per_seed_and_varies_per_epoch(images):
    labels = np.arange(len(images)) % 2
    ds = build_input_pipeline(images, labels, batch_size=16, training=True, augment_cfg=STRONG, seed=3)
    again = build_input_pipeline(images, labels, batch_size=16, training=True, augment_cfg=STRONG, seed=3)
    first, second = _collect(ds)[0], _collect(ds)[0]
    np.testing.assert_array_equal(first, _collect(again)[0])
    assert not np.allclose(first, second)


def test_training_pipeline_shuffles_each_epoch_but_keeps_pairs(images):
    labels = images.reshape(len(images), -1).mean(axis=1)  # a label that identifies its image
    ds = build_input_pipeline(images, labels, batch_size=64, training=True, augment_cfg=None, seed=3)
    (x1, y1), (x2, y2) = _collect(ds.take(1)), _collect(ds.take(1))
    assert not np.array_equal(y1, y2)  # reshuffled
    np.testing.assert_allclose(x1.reshape(len(x1), -1).mean(axis=1), y1[:, 0], rtol=1e-5)
    assert sorted(y1[:, 0]) == pytest.approx(sorted(labels))


def test_bad_shapes_are_rejected(images):
    with pytest.raises(ValueError, match=r"\(n, S, S, 1\)"):
        build_input_pipeline(images[..., 0], None, batch_size=4, training=False)
    with pytest.raises(ValueError, match="labels"):
        build_input_pipeline(images, np.zeros(3), batch_size=4, training=False)


def test_noise_alone_is_enabled_seeded_and_of_the_configured_strength(images):
    cfg = AugmentConfig(rotation=0, flip="none", zoom=0, contrast=0, noise=0.05)
    assert is_enabled(cfg)
    seed = tf.constant([7, 11], tf.int64)
    # mid-grey image, so clipping to [0, 1] does not bias the measured noise
    grey = np.full((28, 28, 1), 0.5, np.float32)
    a = augment_image(grey, seed, cfg).numpy()
    b = augment_image(grey, seed, cfg).numpy()
    np.testing.assert_array_equal(a, b)
    assert abs(float((a - grey).std()) - 0.05) < 0.01
    off = augment_image(images[0], seed, AugmentConfig(rotation=0, flip="none", zoom=0, contrast=0)).numpy()
    np.testing.assert_allclose(off, images[0], atol=1e-6)
