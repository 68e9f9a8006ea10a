"""ood: the out-of-distribution guard: two detectors, their combination, its threshold.

Two families, as the literature recommends for medical images (OpenMIBOOD, CVPR 2025):

- **reconstruction**: a small convolutional autoencoder trained on the training split; its score
  is ``log(mean squared reconstruction error)`` of the image. It sees pixels: an inverted film,
  a CT window or noise are far from anything it learned to reconstruct.
- **feature space**: the Mahalanobis distance of the classifier's penultimate features (the input
  of its ``probability`` layer) to the nearest class mean, with one shared covariance, all fitted
  on the training split (Lee et al., NeurIPS 2018); its score is ``log(min_c d_c^2)``. It sees
  what the classifier sees: an image that lands where no training image did.

Each score is standardized with the mean and standard deviation of in-distribution validation
images; the combined score is the larger of the two (either detector may raise the alarm), and
``ood_score`` is that combined score divided by its threshold, chosen on validation images for a
stated false-alarm rate: **1.0 is the threshold**, above it the image is out of distribution.

The Mahalanobis distance is written as matrix products so it exports to ONNX as MatMuls:
with ``W`` the Cholesky factor of the shrunk precision matrix (``P = W W^T``),
``d_c^2 = ||f W - mu_c W||^2``. Everything here but the Keras functions is numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medops.errors import MedopsError

OOD_SCORE = "ood_score"
IN_DISTRIBUTION = "in_distribution"
FEATURE_LAYER = "probability"  # the features are this layer's input: the penultimate activations
EPS = 1e-12
DETECTORS = ("reconstruction", "mahalanobis")


@dataclass(frozen=True)
class Detector:
    """The fitted guard: everything the served graph computes, as arrays.

    ``whiten`` (D, D) and ``class_means_w`` (C, D) give the Mahalanobis distance; ``mean``/``std``
    (2,) standardize the two log-scores (reconstruction, mahalanobis); ``threshold`` is the
    combined (max) standardized score at the chosen false-alarm rate.
    """

    whiten: np.ndarray
    class_means_w: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    threshold: float

    def save(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, whiten=self.whiten, class_means_w=self.class_means_w, mean=self.mean,
                 std=self.std, threshold=np.float64(self.threshold))

    @classmethod
    def load(cls, path: Path) -> "Detector":
        with np.load(path) as z:
            return cls(z["whiten"], z["class_means_w"], z["mean"], z["std"], float(z["threshold"]))


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, *,
                    shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """Class-conditional means and one shared covariance of ``features`` (n, D).

    The covariance is shrunk towards a scaled identity (``(1-s) S + s tr(S)/D I``): ReLU features
    have dead units, and an exact inverse would give them infinite weight.

    Returns:
        ``(whiten (D, D), class_means_w (C, D))`` with ``whiten`` the Cholesky factor of the
        precision matrix, so that ``d_c^2 = ||f @ whiten - class_means_w[c]||^2``.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    classes = np.unique(y)
    if f.ndim != 2 or len(f) != len(y) or len(classes) < 1:
        raise MedopsError(f"cannot fit Mahalanobis: features {f.shape}, labels {y.shape}")
    means = np.stack([f[y == c].mean(axis=0) for c in classes])
    centred = f - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / max(len(f) - len(classes), 1)
    d = cov.shape[0]
    cov = (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d + EPS) * np.eye(d)
    whiten = np.linalg.cholesky(np.linalg.inv(cov))
    return whiten, means @ whiten


def mahalanobis_log(features: np.ndarray, whiten: np.ndarray, class_means_w: np.ndarray) -> np.ndarray:
    """``log(min_c d_c^2 + eps)`` per row of ``features``, in float64."""
    g = np.asarray(features, dtype=np.float64) @ whiten
    d2 = ((g[:, None, :] - class_means_w[None, :, :]) ** 2).sum(axis=-1)
    return np.log(d2.min(axis=1) + EPS)


def reconstruction_log(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """``log(mean squared error + eps)`` per image."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    r = np.asarray(reconstructions, dtype=np.float64).reshape(len(images), -1)
    return np.log(((x - r) ** 2).mean(axis=1) + EPS)


def standardize_stats(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each column of ``scores`` (n, 2) (in-distribution images)."""
    s = np.asarray(scores, dtype=np.float64)
    std = s.std(axis=0)
    if not np.all(std > 0):
        raise MedopsError(f"an OOD detector gives the same score to every validation image (std {std})")
    return s.mean(axis=0), std


def combine(scores: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The larger of the two standardized log-scores, per row of ``scores`` (n, 2); the
    reconstruction one two-sided (its absolute value): an image reconstructed *better* than
    training images are (a blurred one: no fine detail left to get wrong) is atypical too."""
    z = (np.asarray(scores, dtype=np.float64) - mean) / std
    return np.maximum(np.abs(z[:, 0]), z[:, 1])


def choose_threshold(combined: np.ndarray, false_alarm_rate: float) -> float:
    """The combined score above which a fraction ``false_alarm_rate`` of ``combined`` (scores of
    in-distribution images) lies. It must be positive (``ood_score`` is the score over it)."""
    t = float(np.quantile(np.asarray(combined, dtype=np.float64), 1.0 - false_alarm_rate))
    if not t > 0:
        raise MedopsError(f"OOD threshold {t:.3g} at false-alarm rate {false_alarm_rate} is not "
                          "positive: the detectors do not separate anything on val")
    return t


def ood_scores(scores: np.ndarray, det: Detector) -> np.ndarray:
    """``ood_score`` (the combined score over the threshold; > 1 = out of distribution)."""
    return combine(scores, det.mean, det.std) / det.threshold


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(score of an out-of-distribution image > that of an in-distribution one), ties half."""
    a = np.asarray(in_scores, dtype=np.float64).reshape(-1)
    b = np.asarray(out_scores, dtype=np.float64).reshape(-1)
    if not len(a) or not len(b):
        raise MedopsError("AUROC needs scores of both in- and out-of-distribution images")
    ranks = _ranks(np.concatenate([a, b]))
    return float((ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


# -- corruptions of chest films: near-OOD probes (the stage's own check and the benchmark) --------

CORRUPTIONS = ("inverted", "rotated90", "noise", "blur", "corner")


def corrupt(images: np.ndarray, kind: str, *, seed: int = 0) -> np.ndarray:
    """``images`` (n, S, S[, 1]) in [0, 1], corrupted by ``kind`` (one of CORRUPTIONS):
    inverted (1 - x), rotated by 90 degrees, heavy Gaussian noise (std 0.3), strong blur (a box
    filter a third of the image wide) or cropped to its top-left quarter and scaled back up."""
    x = np.asarray(images, dtype=np.float32)
    squeeze = x.ndim == 3
    x = x[..., None] if squeeze else x
    s = x.shape[1]
    if kind == "inverted":
        out = 1.0 - x
    elif kind == "rotated90":
        out = np.rot90(x, k=1, axes=(1, 2))
    elif kind == "noise":
        out = np.clip(x + np.random.default_rng(seed).normal(0, 0.3, x.shape), 0, 1)
    elif kind == "blur":
        out = _box_blur(x, max(3, s // 3))
    elif kind == "corner":
        half = x[:, : s // 2, : s // 2]
        out = np.repeat(np.repeat(half, 2, axis=1), 2, axis=2)[:, :s, :s]
    else:
        raise ValueError(f"unknown corruption {kind!r}; choose from {CORRUPTIONS}")
    out = np.ascontiguousarray(out, dtype=np.float32)
    return out[..., 0] if squeeze else out


def _box_blur(x: np.ndarray, k: int) -> np.ndarray:
    pad = k // 2
    p = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    c = p.cumsum(axis=1).cumsum(axis=2)
    c = np.pad(c, ((0, 0), (1, 0), (1, 0), (0, 0)))
    s = x.shape[1]
    return (c[:, k:k + s, k:k + s] - c[:, :s, k:k + s] - c[:, k:k + s, :s] + c[:, :s, :s]) / (k * k)


# -- Keras: the autoencoder, the feature extractor, the guarded model export converts --------------

def build_autoencoder(input_size: int, filters: tuple[int, ...] = (16, 32)) -> Any:
    """A small convolutional autoencoder (S, S, 1) -> (S, S, 1), sigmoid output: strided 3x3
    convolutions down, transposed convolutions up. ``input_size`` must be divisible by
    ``2 ** len(filters)``."""
    import keras
    from keras import layers

    if input_size % (2 ** len(filters)):
        raise MedopsError(f"autoencoder: image size {input_size} is not divisible by "
                          f"2**{len(filters)} (ood.ae_filters)")
    inputs = keras.Input((input_size, input_size, 1), name="image")
    x = inputs
    for i, f in enumerate(filters):
        x = layers.Conv2D(f, 3, strides=2, padding="same", activation="relu", name=f"enc{i}")(x)
    for i, f in enumerate(reversed(filters)):
        x = layers.Conv2DTranspose(f, 3, strides=2, padding="same", activation="relu", name=f"dec{i}")(x)
    outputs = layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="reconstruction")(x)
    return keras.Model(inputs, outputs, name="ood_autoencoder")


def feature_model(classifier: Any) -> Any:
    """The classifier cut before its ``probability`` layer: image -> penultimate features."""
    import keras

    try:
        layer = classifier.get_layer(FEATURE_LAYER)
    except ValueError as exc:
        raise MedopsError(f"model {classifier.name} has no layer {FEATURE_LAYER!r}") from exc
    return keras.Model(classifier.inputs, layer.input, name="features")


def build_guarded_model(classifier: Any, autoencoder: Any, det: Detector) -> Any:
    """One Keras model: image -> (probability, ood_score, in_distribution), what export converts.

    The same arithmetic as ``ood_scores`` (float32): Mahalanobis as a MatMul against ``whiten``,
    the reconstruction error of ``autoencoder``, each log-score standardized, the larger one over
    the threshold; ``in_distribution`` is ``ood_score <= 1``.
    """
    import keras
    from keras import ops

    image = classifier.inputs[0]
    probability = classifier.outputs[0]
    feats = feature_model(classifier)(image)
    whiten = ops.convert_to_tensor(det.whiten.astype(np.float32))
    means_w = ops.convert_to_tensor(det.class_means_w.astype(np.float32))
    g = ops.matmul(feats, whiten)
    # ||g - m||^2 = ||g||^2 - 2 g.m + ||m||^2, all classes at once
    d2 = (ops.sum(g * g, axis=1, keepdims=True) - 2.0 * ops.matmul(g, ops.transpose(means_w))
          + ops.convert_to_tensor((det.class_means_w ** 2).sum(axis=1)[None, :].astype(np.float32)))
    maha = ops.log(ops.maximum(ops.min(d2, axis=1, keepdims=True), 0.0) + EPS)
    err = ops.mean(ops.square(ops.reshape(image - autoencoder(image), (-1, int(np.prod(image.shape[1:]))))),
                   axis=1, keepdims=True)
    recon = ops.log(err + EPS)
    mean, std = det.mean.astype(np.float32), det.std.astype(np.float32)
    combined = ops.maximum(ops.abs((recon - mean[0]) / std[0]), (maha - mean[1]) / std[1])
    score = combined / np.float32(det.threshold)
    inside = ops.less_equal(score, 1.0)
    return keras.Model(image, [probability, score, inside], name="guarded_classifier")


def reference_outputs(classifier: Any, autoencoder: Any, det: Detector,
                      images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the guarded graph must answer for ``images``, computed apart from it (Keras for the
    networks, float64 numpy for the rest): ``(probability (n, 1), ood_score (n, 1),
    in_distribution (n, 1) bool)``."""
    probs = np.asarray(classifier.predict(images, batch_size=256, verbose=0), dtype=np.float32)
    feats = feature_model(classifier).predict(images, batch_size=256, verbose=0)
    recon = autoencoder.predict(images, batch_size=256, verbose=0)
    scores = np.stack([reconstruction_log(images, recon),
                       mahalanobis_log(feats, det.whiten, det.class_means_w)], axis=1)
    score = ood_scores(scores, det).reshape(-1, 1)
    return probs, score, score <= 1.0
