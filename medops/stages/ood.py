"""ood: fit the out-of-distribution guard served beside the classifier (medops.learn.ood).

From the training split only: a small convolutional autoencoder (reconstruction detector) and the
class means and shared covariance of the classifier's penultimate features (Mahalanobis
detector). From the validation split (in-distribution images, never seen by either fit): the
standardization of each score and the threshold of the combined score at ``false_alarm_rate``.
The threshold is taken on all of val; the false-alarm rate the gate checks is measured out of
sample, two-fold on val (threshold from one half, rate on the other, averaged), so it says how
the threshold holds on images it was not chosen on. The test split is never read here.

Near-OOD probes (val images corrupted by medops.learn.ood.CORRUPTIONS) give an AUROC per
corruption, recorded for the reader; the benchmark (benchmarks/ood) measures the served graph.

Inputs:
    model: ``models/model.keras`` (its features, the input of its ``probability`` layer).
    ingested_dir, split: the data and ``split.csv``; ``train`` fits, ``val`` calibrates.
    train_result: ``models/train.json`` (data_version).
Outputs:
    out_dir: ``models/ood/``: ``autoencoder.keras``, ``detector.npz`` (medops.learn.ood.Detector)
        and ``ood.json`` (OodResult).
Params (``ood`` section, OodConfig):
    false_alarm_rate, ae_filters, ae_epochs, ae_batch_size, ae_learning_rate,
    covariance_shrinkage, seed.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from medops.atomic import atomic_path, write_text
from medops.config import OodConfig
from medops.data import load_split_images
import medops.learn.ood as ood
from medops.paths import read_json

AUTOENCODER_FILE = "autoencoder.keras"
DETECTOR_FILE = "detector.npz"
RESULT_FILE = "ood.json"


class OodResult(BaseModel):
    data_version: str
    detectors: list[str]
    combination: str
    false_alarm_rate_target: float
    threshold: float                 # of the combined standardized score; ood_score = it / this
    val_false_alarm_rate: float      # two-fold on val, out of sample: what the gate checks
    val_false_alarm_rate_in_sample: float
    n_train: int
    n_val: int
    feature_dim: int
    autoencoder_params: int
    autoencoder_val_mse: float
    near_ood_val_auroc: dict[str, float]
    autoencoder_path: str
    detector_path: str
    created: str


def train_autoencoder(cfg: OodConfig, train: np.ndarray, val: np.ndarray):
    """The autoencoder fitted on ``train`` (seeded), and its mean squared error on ``val``."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    ae = ood.build_autoencoder(int(train.shape[1]), tuple(cfg.ae_filters))
    ae.compile(optimizer=keras.optimizers.Adam(cfg.ae_learning_rate), loss="mse")
    ae.fit(train, train, epochs=cfg.ae_epochs, batch_size=cfg.ae_batch_size, shuffle=True,
           verbose=0)
    return ae, float(ae.evaluate(val, val, batch_size=256, verbose=0))


def raw_scores(images: np.ndarray, features, autoencoder, det_w: np.ndarray,
               det_m: np.ndarray) -> np.ndarray:
    """(n, 2): the reconstruction and Mahalanobis log-scores of ``images``."""
    recon = autoencoder.predict(images, batch_size=256, verbose=0)
    feats = features.predict(images, batch_size=256, verbose=0)
    return np.stack([ood.reconstruction_log(images, recon),
                     ood.mahalanobis_log(feats, det_w, det_m)], axis=1)


def cross_fitted_false_alarms(scores: np.ndarray, cfg: OodConfig) -> float:
    """The false-alarm rate of a threshold chosen (with the standardization) on one half of the
    in-distribution ``scores`` and applied to the other, both ways, averaged."""
    perm = np.random.default_rng(cfg.seed).permutation(len(scores))
    halves = (perm[: len(perm) // 2], perm[len(perm) // 2:])
    rates = []
    for fit, held in (halves, halves[::-1]):
        mean, std = ood.standardize_stats(scores[fit])
        t = ood.choose_threshold(ood.combine(scores[fit], mean, std), cfg.false_alarm_rate)
        rates.append(float((ood.combine(scores[held], mean, std) > t).mean()))
    return float(np.mean(rates))


def run(cfg: OodConfig, *, model: Path, ingested_dir: Path, split: Path, train_result: Path,
        out_dir: Path) -> OodResult:
    """Fit both detectors on train, calibrate on val, write models/ood/."""
    from medops.learn.inference import load_model

    record = read_json(train_result, "train result")
    classifier = load_model(model)
    features = ood.feature_model(classifier)
    x_train, y_train, _ = load_split_images(ingested_dir, split, "train")
    x_val, _, _ = load_split_images(ingested_dir, split, "val")
    ae, ae_val_mse = train_autoencoder(cfg, x_train, x_val)
    f_train = features.predict(x_train, batch_size=256, verbose=0)
    whiten, means_w = ood.fit_mahalanobis(f_train, y_train, shrinkage=cfg.covariance_shrinkage)
    s_val = raw_scores(x_val, features, ae, whiten, means_w)
    mean, std = ood.standardize_stats(s_val)
    combined = ood.combine(s_val, mean, std)
    det = ood.Detector(whiten, means_w, mean, std, ood.choose_threshold(combined, cfg.false_alarm_rate))
    in_val = ood.ood_scores(s_val, det)
    near = {kind: round(ood.auroc(in_val, ood.ood_scores(raw_scores(
        ood.corrupt(x_val, kind, seed=cfg.seed), features, ae, whiten, means_w), det)), 4)
        for kind in ood.CORRUPTIONS}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / AUTOENCODER_FILE) as tmp:
        ae.save(tmp)
    with atomic_path(out_dir / DETECTOR_FILE) as tmp:
        det.save(tmp)
    result = OodResult(
        data_version=str(record.get("data_version", "unknown")),
        detectors=list(ood.DETECTORS),
        combination="max(|z_reconstruction|, z_mahalanobis) over the threshold",
        false_alarm_rate_target=cfg.false_alarm_rate,
        threshold=det.threshold,
        val_false_alarm_rate=cross_fitted_false_alarms(s_val, cfg),
        val_false_alarm_rate_in_sample=float((in_val > 1.0).mean()),
        n_train=len(x_train), n_val=len(x_val), feature_dim=int(whiten.shape[0]),
        autoencoder_params=int(ae.count_params()), autoencoder_val_mse=ae_val_mse,
        near_ood_val_auroc=near,
        autoencoder_path=str(out_dir / AUTOENCODER_FILE), detector_path=str(out_dir / DETECTOR_FILE),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_text(out_dir / RESULT_FILE, result.model_dump_json(indent=2) + "\n")
    return result
