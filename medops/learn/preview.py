"""preview: a PNG grid of images next to their augmented versions, to see what training is fed.

The augmented images come from the training input pipeline itself
(medops.learn.input_pipeline.build_input_pipeline with ``training=True``: the same shuffle,
per-image stateless seeds and augment_image), not from a re-implementation, so a wrong
``augment`` setting (a rotation that turns lungs upside down, a contrast that clips to black)
shows here exactly as the model would see it. The draws are those of the first epoch over the
previewed images with ``seed``; a training run over the full train split draws others from the
same distribution.

Layout (pixel-exact, so a test or a reader can cut panels out): up to ceil(sqrt(n)) pairs per row,
each pair the original (left) and its augmentation (right), every image enlarged ``scale`` times
by pixel repetition and written as round(255 * pixel). ``pad`` px between the two panels of a
pair, ``gap`` px around and between pairs, on a white background. The PNG's ``Description`` text
chunk records the layout, the augment settings and the seed.

TensorFlow is imported inside the functions (through medops.learn.input_pipeline): importing this module is
cheap.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from medops.atomic import atomic_path
from medops.config import AugmentConfig

BACKGROUND = 255


def augment_pairs(
    images: np.ndarray, augment_cfg: AugmentConfig, *, seed: int, n: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images and their augmentations by the training pipeline, in input order.

    Args:
        images: float32 (m, S, S, 1) or (m, S, S) pixels in [0, 1].
        augment_cfg: the ``augment`` section training uses.
        seed: the pipeline seed (shuffle and augmentation draws).
        n: how many images (at most m).

    Returns:
        originals and augmented, both float32 (min(n, m), S, S).
    """
    from medops.learn.input_pipeline import build_input_pipeline

    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1 or len(x) == 0 or n < 1:
        raise ValueError(f"images must be (m, S, S, 1) with m >= 1 and n >= 1, got {np.shape(images)}, n={n}")
    x = x[:n]
    # The pipeline shuffles; carrying each image's index as its "label" pairs the outputs back up.
    index = np.arange(len(x), dtype=np.float32)
    ds = build_input_pipeline(x, index, batch_size=len(x), training=True, augment_cfg=augment_cfg, seed=seed)
    batch, order = next(iter(ds))
    augmented = np.empty_like(x[..., 0])
    augmented[np.asarray(order).reshape(-1).astype(int)] = np.asarray(batch)[..., 0]
    return x[..., 0], augmented


def to_uint8(images: np.ndarray) -> np.ndarray:
    """round(255 * pixel), pixels clipped to [0, 1]."""
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def compose_grid(
    originals: np.ndarray, augmented: np.ndarray, *, scale: int = 4, pad: int = 2, gap: int = 8
) -> np.ndarray:
    """The uint8 grid image (height, width) of original / augmented pairs (see module docstring).

    With k pairs, c = ceil(sqrt(k)) per row and r = ceil(k / c) rows of panels P = S * scale:
    width = c * (2P + pad) + (c + 1) * gap, height = r * P + (r + 1) * gap.
    """
    if originals.shape != augmented.shape or originals.ndim != 3:
        raise ValueError(f"originals {originals.shape} and augmented {augmented.shape} must both be (k, S, S)")
    k, size = originals.shape[0], originals.shape[1]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    panel = size * scale
    pair_w = 2 * panel + pad
    grid = np.full((rows * panel + (rows + 1) * gap, cols * pair_w + (cols + 1) * gap), BACKGROUND, np.uint8)
    enlarge = lambda img: np.kron(to_uint8(img), np.ones((scale, scale), np.uint8))  # noqa: E731
    for i in range(k):
        r, c = divmod(i, cols)
        y = gap + r * (panel + gap)
        x = gap + c * (pair_w + gap)
        grid[y : y + panel, x : x + panel] = enlarge(originals[i])
        grid[y : y + panel, x + panel + pad : x + 2 * panel + pad] = enlarge(augmented[i])
    return grid


def save_augmentation_preview(
    images: np.ndarray,
    augment_cfg: AugmentConfig,
    out_png: Path,
    *,
    seed: int,
    n: int = 16,
    scale: int = 4,
) -> Path:
    """Write the original / augmented grid of the first ``n`` images to ``out_png``.

    Args:
        images: float32 (m, S, S, 1) or (m, S, S) pixels in [0, 1] (e.g. the train split).
        augment_cfg: the ``augment`` section training uses.
        out_png: the PNG to write (folders created).
        seed: the pipeline seed (TrainConfig.seed shows what that run's first epoch draws).
        n: number of pairs.
        scale: pixel repetition factor.

    Returns:
        ``out_png``.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    originals, augmented = augment_pairs(images, augment_cfg, seed=seed, n=n)
    grid = compose_grid(originals, augmented, scale=scale)
    info = PngInfo()
    info.add_text("Description", json.dumps({
        "layout": "pairs of original (left) and augmented (right), row-major",
        "pairs": len(originals), "scale": scale, "seed": seed,
        "augment": augment_cfg.model_dump(mode="json"),
    }, sort_keys=True))
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        Image.fromarray(grid, mode="L").save(tmp, format="PNG", pnginfo=info)
    return out_png
