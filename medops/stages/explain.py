"""explain: Grad-CAM heatmaps of where a trained classifier looks, as PNG overlays for review.

Grad-CAM (Selvaraju et al., 2017): for a convolutional feature map A (h, w, k) and the class
score z, weight each channel by its spatially averaged gradient alpha_k = mean_ij dz/dA_ijk and
keep the positive part of sum_k alpha_k A_k, upsampled (bilinear) to the image and divided by its
maximum, so every heatmap lies in [0, 1]. The score is the *logit* of the ``probability`` unit,
not the probability: a confident sigmoid saturates (p == 1.0 in float32) and its gradient, and so
its heatmap, would vanish exactly where the model is surest.

By default the heatmap explains the *predicted* class: evidence for pneumonia (+z) when the
probability is at or above the decision threshold, evidence against it (-z) otherwise. A
"positive" target always explains the pneumonia score (and is mostly zero on clear negatives).

Inputs:
    model: the trained Keras model (``models/model.keras``).
    ingested_dir, split: the data and ``split.csv``; only the ``test`` rows are read.
    train_result (optional): ``models/train.json``; its decision threshold (chosen on val) picks
        the predicted class and the sample, as in evaluate.
Outputs:
    out_dir: ``gradcam-NN-<sop_instance_uid>.png`` for a sample of test images (image and
        overlay side by side, the probability, label and outcome in the title). Only the
        pseudonymous SOPInstanceUID of the ingested metadata names an image; no other header
        value is read. Earlier ``gradcam-*.png`` files in ``out_dir`` are removed first, so the
        folder always holds exactly one run's sample.
Params (``evaluate`` section, EvaluateConfig):
    gradcam_samples (8): how many test images to explain.
    gradcam_layer (None): the feature layer, as a name or ``outer/inner`` path into a nested
        model; None = the last Conv2D layer with at least a 2x2 output, found automatically (also
        inside nested models: ``efficientnetb0/block6a_expand_conv`` for efficientnet_b0 at 28 px,
        whose later convolutions are 1x1 and would give constant maps).
    threshold, use_train_threshold: the decision threshold when train.json gives none or is not
        to be used, as in evaluate.

The sample takes images round-robin from the outcomes TP, TN, FP, FN, the most confident of
each first, so a reviewer sees both what the model gets right and its most confident mistakes.

TensorFlow and matplotlib are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel

from medops.atomic import atomic_path
from medops.config import EvaluateConfig
from medops.errors import MedopsError

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import tensorflow as tf

PNG_PREFIX = "gradcam-"
OUTCOMES = ("TP", "TN", "FP", "FN")
# A 1x1 feature map gives a constant heatmap by construction (efficientnet_b0's top_conv at 28 px
# inputs, upsampled to 64, is 1x1), so the automatic choice skips such layers.
MIN_FEATURE_SIZE = 2
Target = Literal["predicted", "positive"]


class ExplainSample(BaseModel):
    sop_instance_uid: str | None
    label: int | None
    probability: float
    outcome: str | None          # TP / TN / FP / FN when the label is known
    file: str


class ExplainResult(BaseModel):
    layer: str                   # the feature layer the heatmaps come from
    threshold: float
    threshold_source: str        # "train" (chosen on val) or "config"
    n_test: int
    files: list[str]
    samples: list[ExplainSample]
    out_dir: str


# ---------------------------------------------------------------------------------------------
# Grad-CAM


def iter_layers(model: "keras.Model", prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every layer of ``model`` as ``(path, layer)``, descending into nested models; the path of a
    layer inside a nested model is ``outer/inner``."""
    import keras

    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer, prefix=f"{path}/")
        else:
            yield path, layer


def find_layer(model: "keras.Model", layer: str | None = None) -> tuple[str, Any]:
    """The Grad-CAM feature layer: ``layer`` by name or path, or the last Conv2D layer whose
    output is at least MIN_FEATURE_SIZE pixels on each side.

    Raises:
        MedopsError: no such layer, or the model has no Conv2D layer (name one explicitly).
    """
    import keras

    layers = list(iter_layers(model))
    if layer is not None:
        for path, obj in layers:
            if layer in (path, obj.name):
                return path, obj
        raise MedopsError(f"Grad-CAM layer {layer!r} not found in model {model.name}")
    convs = [
        (p, obj) for p, obj in layers
        if isinstance(obj, keras.layers.Conv2D) and spatial_size(obj) >= MIN_FEATURE_SIZE
    ]
    if not convs:
        raise MedopsError(
            f"model {model.name} has no Conv2D layer with at least {MIN_FEATURE_SIZE}x{MIN_FEATURE_SIZE} output "
            "for Grad-CAM; name a layer with 4-D output"
        )
    return convs[-1]


def spatial_size(layer: Any) -> int:
    """The smaller spatial side of a layer's (n, h, w, c) output; 0 when unknown or not 4-D."""
    try:
        shape = tuple(layer.output.shape)
    except (AttributeError, ValueError):  # never called, or called more than once
        return 0
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        return 0
    return int(min(shape[1], shape[2]))


@contextlib.contextmanager
def capture_calls(layers: dict[str, Any]) -> Iterator[dict[str, tuple[Any, Any]]]:
    """While active, record each named layer's latest (first input, output) of a forward pass.

    Intercepting the call works the same for top-level layers and layers inside nested models,
    where a ``keras.Model(model.inputs, inner.output)`` cannot be built (the inner tensor is not
    connected to the outer inputs). The original ``call`` is restored on exit.
    """
    seen: dict[str, tuple[Any, Any]] = {}
    originals = {}
    for key, layer in layers.items():
        original = layer.call
        originals[key] = original

        def recording(*args, _key=key, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            seen[_key] = (args[0] if args else None, out)
            return out

        # instance attribute: shadows the class's call for this layer only
        object.__setattr__(layer, "call", recording)
    try:
        yield seen
    finally:
        for key, layer in layers.items():
            object.__delattr__(layer, "call")


def grad_cam(
    model: "keras.Model",
    images: np.ndarray,
    layer: str | None = None,
    *,
    target: Target = "predicted",
    threshold: float = 0.5,
    batch_size: int = 64,
    return_probabilities: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps of ``images`` for ``model``'s sigmoid ``probability`` output.

    Args:
        model: a medops classifier (input ``image`` (S, S, 1), output layer ``probability``, a
            Dense unit with sigmoid activation).
        images: float32 (n, H, W, 1) or (n, H, W) pixels in [0, 1].
        layer: feature layer name or ``outer/inner`` path; None = the last Conv2D layer whose
            output is at least 2x2.
        target: "predicted" explains the predicted class (sign of the logit flipped for images
            below ``threshold``); "positive" always explains the pneumonia score.
        threshold: decision threshold on the probability, for ``target="predicted"``.
        batch_size: images per forward/backward pass.
        return_probabilities: also return the model's probabilities (n,).

    Returns:
        float32 heatmaps (n, H, W) in [0, 1] (all zero where no feature raised the score), and
        the probabilities (n,) when asked.
    """
    import tensorflow as tf

    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1 or len(x) == 0:
        raise ValueError(f"images must be (n, H, W, 1) with n >= 1, got {np.shape(images)}")
    if target not in ("predicted", "positive"):
        raise ValueError(f"target must be 'predicted' or 'positive', got {target!r}")
    _, feature_layer = find_layer(model, layer)
    head = model.get_layer("probability")
    if getattr(head, "kernel", None) is None:
        raise MedopsError(f"model {model.name}: layer 'probability' is not a Dense unit; Grad-CAM needs its logit")
    # train.json's threshold may be 1.0 (select_threshold clips to [1e-6, 1]); keep the logit finite
    t = min(max(float(threshold), 1e-7), 1 - 1e-7)
    logit_threshold = float(np.log(t / (1 - t)))
    size = x.shape[1:3]
    heatmaps, probabilities = [], []
    with capture_calls({"features": feature_layer, "head": head}) as seen:
        for start in range(0, len(x), batch_size):
            batch = tf.constant(x[start : start + batch_size])
            with tf.GradientTape() as tape:
                tape.watch(batch)
                prob = model(batch, training=False)
                features = seen["features"][1]
                # The logit from the head's input, exactly as the Dense unit computes it before
                # its sigmoid: no saturation, unlike log(p / (1 - p)).
                logit = tf.matmul(seen["head"][0], head.kernel) + head.bias
                logit = tf.reshape(logit, (-1,))
                if target == "predicted":
                    sign = tf.where(logit >= logit_threshold, 1.0, -1.0)
                    score = tf.reduce_sum(tf.stop_gradient(sign) * logit)
                else:
                    score = tf.reduce_sum(logit)
            # Images of a batch are independent in inference mode, so the gradient of the sum is
            # each image's own gradient.
            grads = tape.gradient(score, features)
            heatmaps.append(heatmaps_from_gradients(features, grads, size, layer_name=feature_layer.name))
            probabilities.append(np.asarray(prob, dtype=np.float64).reshape(-1))
    maps = np.concatenate(heatmaps)
    if return_probabilities:
        return maps, np.concatenate(probabilities)
    return maps


def heatmaps_from_gradients(features: "tf.Tensor", grads: "tf.Tensor | None", size: tuple[int, int], *,
                            layer_name: str) -> np.ndarray:
    """Grad-CAM's map from a feature layer's output (n, h, w, c) and the score's gradient there:
    each channel weighted by its mean gradient, summed, ReLU, resized bilinearly to ``size`` and
    divided by each image's peak. float32 (n, *size) in [0, 1], all zero where nothing raised the
    score.

    Raises:
        MedopsError: no gradient (the score does not depend on the layer), or a layer output that
            is not (n, h, w, c).
    """
    import tensorflow as tf

    if grads is None:
        raise MedopsError(f"Grad-CAM: the score does not depend on layer {layer_name!r}")
    if len(features.shape) != 4:
        raise MedopsError(
            f"Grad-CAM layer {layer_name!r} output is {tuple(features.shape)}, not (n, h, w, c)"
        )
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
    cam = tf.image.resize(cam, size, method="bilinear")[..., 0]
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)
    return np.clip(cam.numpy(), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Sample selection and PNGs


def classify_outcomes(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """TP / TN / FP / FN per image (a probability at or above ``threshold`` is a positive call)."""
    y = np.asarray(labels).reshape(-1).astype(int)
    pred = np.asarray(probabilities).reshape(-1) >= threshold
    return np.where(pred, np.where(y == 1, "TP", "FP"), np.where(y == 1, "FN", "TN"))


def select_samples(labels: np.ndarray, probabilities: np.ndarray, threshold: float, limit: int) -> list[int]:
    """Indices of up to ``limit`` images, round-robin over TP, TN, FP, FN, each outcome's most
    confident first (furthest from the threshold; ties by index). Deterministic."""
    outcomes = classify_outcomes(labels, probabilities, threshold)
    distance = np.abs(np.asarray(probabilities, dtype=np.float64).reshape(-1) - threshold)
    queues = []
    for name in OUTCOMES:
        idx = np.nonzero(outcomes == name)[0]
        queues.append(list(idx[np.argsort(-distance[idx], kind="stable")]))
    chosen: list[int] = []
    while len(chosen) < limit and any(queues):
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(int(q.pop(0)))
    return chosen


def safe_name(text: str) -> str:
    """``text`` with anything but letters, digits, dot, dash and underscore replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(text))[:120]


def plot_gradcam(image: np.ndarray, heatmap: np.ndarray, title: str, path: Path) -> None:
    """One PNG: the image, and the image with the heatmap overlaid (jet, alpha 0.4)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(6.4, 3.6))
    left.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    left.set_title("image", fontsize=9)
    right.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    overlay = right.imshow(heatmap, cmap="jet", vmin=0, vmax=1, alpha=0.4, interpolation="bilinear")
    right.set_title("Grad-CAM", fontsize=9)
    for ax in (left, right):
        ax.set_axis_off()
    fig.colorbar(overlay, ax=right, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def save_gradcam_pngs(
    model: "keras.Model",
    images: np.ndarray,
    out_dir: Path,
    *,
    meta: pd.DataFrame | None = None,
    limit: int = 8,
    layer: str | None = None,
    threshold: float = 0.5,
    target: Target = "predicted",
) -> list[Path]:
    """Write Grad-CAM overlays of the first ``limit`` of ``images`` to ``out_dir``.

    Args:
        model: the classifier.
        images: (n, H, W, 1) pixels in [0, 1]; the caller picks the sample (see select_samples).
        out_dir: created if needed.
        meta: rows aligned with ``images``; ``sop_instance_uid`` names the file and the title,
            ``label`` (if present) adds the label and the outcome. Nothing else is read, so no
            identifying header value can reach a file name or a title.
        limit: at most this many PNGs.
        layer, threshold, target: as for grad_cam.

    Returns:
        The PNG paths, in image order: ``gradcam-NN-<sop_instance_uid>.png``.
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    x = x[: max(int(limit), 0)]
    if meta is not None and len(meta) < len(x):
        raise ValueError(f"{len(x)} images but {len(meta)} metadata rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(x) == 0:
        return []
    layer_path, _ = find_layer(model, layer)
    maps, probs = grad_cam(model, x, layer_path, target=target, threshold=threshold, return_probabilities=True)
    paths = []
    for i in range(len(x)):
        uid = None if meta is None else meta["sop_instance_uid"].iloc[i]
        name = f"{PNG_PREFIX}{i:02d}-{safe_name(uid)}.png" if uid is not None else f"{PNG_PREFIX}{i:02d}.png"
        title = f"{uid if uid is not None else f'image {i}'}\np(pneumonia) = {probs[i]:.3f}"
        if meta is not None and "label" in meta.columns and pd.notna(meta["label"].iloc[i]):
            label = int(meta["label"].iloc[i])
            outcome = classify_outcomes(np.array([label]), probs[i : i + 1], threshold)[0]
            title += f"  label {label}  {outcome}"
        path = out_dir / name
        plot_gradcam(x[i, ..., 0], maps[i], title, path)
        paths.append(path)
    return paths


def run(
    cfg: EvaluateConfig,
    *,
    model: Path,
    ingested_dir: Path,
    split: Path,
    out_dir: Path,
    train_result: Path | None = None,
) -> ExplainResult:
    """Explain a sample of the test split: write Grad-CAM PNGs to ``out_dir``."""
    from medops.learn.inference import load_model, predict_probabilities, resolve_threshold
    from medops.data import load_split_images

    threshold, source = resolve_threshold(cfg, train_result)
    keras_model = load_model(model)
    layer_path, _ = find_layer(keras_model, cfg.gradcam_layer)
    images, labels, rows = load_split_images(ingested_dir, split, "test")
    probabilities = predict_probabilities(keras_model, images)
    chosen = select_samples(labels, probabilities, threshold, cfg.gradcam_samples)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{PNG_PREFIX}*.png"):
        stale.unlink()
    sample_rows = rows.iloc[chosen].reset_index(drop=True)
    files = save_gradcam_pngs(
        keras_model, images[chosen], out_dir, meta=sample_rows, limit=len(chosen), layer=layer_path,
        threshold=threshold,
    )
    outcomes = classify_outcomes(labels[chosen], probabilities[chosen], threshold)
    samples = [
        ExplainSample(
            sop_instance_uid=str(sample_rows["sop_instance_uid"].iloc[i]),
            label=int(labels[j]),
            probability=round(float(probabilities[j]), 6),
            outcome=str(outcomes[i]),
            file=str(files[i]),
        )
        for i, j in enumerate(chosen)
    ]
    return ExplainResult(
        layer=layer_path, threshold=threshold, threshold_source=source, n_test=len(images),
        files=[str(f) for f in files], samples=samples, out_dir=str(out_dir),
    )

