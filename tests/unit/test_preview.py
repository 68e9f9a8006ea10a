"""preview: the augmentation grid shows real training-pipeline augmentations next to the originals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from _ingested import load_bundled
from medops.config import AugmentConfig
from medops.learn.preview import save_augmentation_preview

OFF = AugmentConfig(rotation=0, flip="none", zoom=0, contrast=0)
SCALE, PAD, GAP, PANEL = 4, 2, 8, 28 * 4


@pytest.fixture(scope="module")
def images():
    data = load_bundled()
    return (data["train_images"][:40].astype(np.float32) / 255.0)[..., None]


def read_pairs(path, k, cols):
    """Cut the k (original, augmented) panels out of the PNG, by the documented layout, and undo
    the enlargement (each pixel repeated SCALE x SCALE)."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        grid = np.asarray(im)
    pairs = []
    for i in range(k):
        r, c = divmod(i, cols)
        y = GAP + r * (PANEL + GAP)
        x = GAP + c * (2 * PANEL + PAD + GAP)
        left = grid[y : y + PANEL, x : x + PANEL]
        right = grid[y : y + PANEL, x + PANEL + PAD : x + 2 * PANEL + PAD]
        for panel in (left, right):  # really enlarged by repetition
            assert (panel == np.repeat(np.repeat(panel[::SCALE, ::SCALE], SCALE, 0), SCALE, 1)).all()
        pairs.append((left[::SCALE, ::SCALE], right[::SCALE, ::SCALE]))
    return grid, pairs


def as_uint8(img):
    return np.round(img[..., 0] * 255).astype(np.uint8)


def test_grid_size_and_originals_in_order(images, tmp_path):
    out = save_augmentation_preview(images, AugmentConfig(), tmp_path / "a" / "preview.png", seed=1)
    assert out == tmp_path / "a" / "preview.png"
    # 16 pairs: 4 per row, 4 rows of 112 px panels.
    grid, pairs = read_pairs(out, 16, 4)
    assert grid.shape == (4 * PANEL + 5 * GAP, 4 * (2 * PANEL + PAD) + 5 * GAP) == (488, 944)
    for i, (orig, _) in enumerate(pairs):
        np.testing.assert_array_equal(orig, as_uint8(images[i]))
    # the gaps are background
    assert (grid[:GAP] == 255).all() and (grid[:, :GAP] == 255).all()
    with Image.open(out) as im:
        described = json.loads(im.text["Description"])
    assert described["augment"] == AugmentConfig().model_dump(mode="json") and described["seed"] == 1


def test_augmented_panels_differ_when_augmentation_is_on(images, tmp_path):
    out = save_augmentation_preview(images, AugmentConfig(), tmp_path / "on.png", seed=1)
    _, pairs = read_pairs(out, 16, 4)
    # the default rotation (up to 0.03 turn) and zoom make every image different
    for orig, aug in pairs:
        assert np.abs(orig.astype(int) - aug.astype(int)).mean() > 1.0
    # the same seed draws the same augmentations; another seed, others
    again = save_augmentation_preview(images, AugmentConfig(), tmp_path / "again.png", seed=1)
    other = save_augmentation_preview(images, AugmentConfig(), tmp_path / "other.png", seed=2)
    assert again.read_bytes() == out.read_bytes()
    assert not np.array_equal(np.asarray(Image.open(other)), np.asarray(Image.open(out)))


def test_flip_only_shows_the_image_or_its_mirror(images, tmp_path):
    cfg = AugmentConfig(rotation=0, flip="horizontal", zoom=0, contrast=0)
    _, pairs = read_pairs(save_augmentation_preview(images, cfg, tmp_path / "flip.png", seed=4), 16, 4)
    same = [np.array_equal(o, a) for o, a in pairs]
    mirrored = [np.array_equal(o[:, ::-1], a) for o, a in pairs]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(same) and any(mirrored)


def test_augmented_panels_equal_the_originals_when_all_off(images, tmp_path):
    out = save_augmentation_preview(images, OFF, tmp_path / "off.png", seed=1, n=7)
    # 7 pairs: 3 per row, 3 rows; the two cells after the last pair stay background.
    grid, pairs = read_pairs(out, 7, 3)
    assert grid.shape == (3 * PANEL + 4 * GAP, 3 * (2 * PANEL + PAD) + 4 * GAP)
    for i, (orig, aug) in enumerate(pairs):
        np.testing.assert_array_equal(orig, as_uint8(images[i]))
        np.testing.assert_array_equal(aug, orig)
    last_row = grid[GAP + 2 * (PANEL + GAP) :, GAP + (2 * PANEL + PAD + GAP) :]
    assert (last_row == 255).all()


def test_bad_input(images, tmp_path):
    with pytest.raises(ValueError, match="images must be"):
        save_augmentation_preview(images[:0], OFF, tmp_path / "x.png", seed=0)
    with pytest.raises(ValueError, match="images must be"):
        save_augmentation_preview(np.zeros((4, 28, 28, 3), np.float32), OFF, tmp_path / "x.png", seed=0)
