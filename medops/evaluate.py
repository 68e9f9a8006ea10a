"""evaluate: measure the trained model on the held-out test split.

Inputs:
    model: the trained Keras model (``models/model.keras``).
    ingested_dir, split: the data and ``split.csv``; only the ``test`` rows are read.
Outputs:
    metrics_out: ``reports/metrics.json``, a flat DVC metrics file (auc, accuracy, sensitivity,
        specificity, counts, threshold).
    plots_dir: DVC plot data: ``roc.csv`` (fpr, tpr, threshold), ``confusion.csv`` (actual,
        predicted; one row per image, for the ``confusion`` template) and ``predictions.csv``
        (sop_instance_uid, patient_id, label, probability, predicted).
Params (``evaluate`` section, EvaluateConfig):
    threshold: probability at or above which an image is called positive (pneumonia).

The metric functions are pure numpy / scikit-learn and tested on hand-made arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from medops.config import EvaluateConfig
from medops.errors import MedopsError
from medops.split import load_split_images


class EvaluateResult(BaseModel):
    n: int
    n_positive: int
    n_negative: int
    threshold: float
    auc: float
    accuracy: float
    sensitivity: float
    specificity: float
    tp: int
    fp: int
    tn: int
    fn: int
    metrics_path: str
    plots_dir: str


def _check_inputs(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).reshape(-1).astype(int)
    y_score = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if y_true.shape != y_score.shape:
        raise ValueError(f"{len(y_true)} labels but {len(y_score)} scores")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y_true, y_score


def count_confusion(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, int]:
    """tp, fp, tn, fn for 0/1 labels and 0/1 predictions."""
    y_true = np.asarray(y_true).reshape(-1).astype(int)
    y_pred = np.asarray(y_pred).reshape(-1).astype(int)
    return {
        "tp": int(((y_true == 1) & (y_pred == 1)).sum()),
        "fp": int(((y_true == 0) & (y_pred == 1)).sum()),
        "tn": int(((y_true == 0) & (y_pred == 0)).sum()),
        "fn": int(((y_true == 1) & (y_pred == 0)).sum()),
    }


def _ratio(num: int, den: int) -> float:
    # An empty class has no defined rate; NaN would break JSON, so report 0 (and the gate fails it).
    return float(num / den) if den else 0.0


def compute_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC; raises MedopsError when only one class is present (AUC is undefined)."""
    from sklearn.metrics import roc_auc_score

    y_true, y_score = _check_inputs(y_true, y_score)
    if len(np.unique(y_true)) < 2:
        raise MedopsError(f"AUC undefined: the evaluation set has only label {int(y_true[0])}")
    return float(roc_auc_score(y_true, y_score))


def compute_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> dict[str, float | int]:
    """AUC, accuracy, sensitivity (recall of 1), specificity (recall of 0) and counts.

    A score at or above ``threshold`` is a positive call.
    """
    y_true, y_score = _check_inputs(y_true, y_score)
    y_pred = (y_score >= threshold).astype(int)
    c = count_confusion(y_true, y_pred)
    n = len(y_true)
    return {
        "n": n,
        "n_positive": int(y_true.sum()),
        "n_negative": int(n - y_true.sum()),
        "threshold": float(threshold),
        "auc": compute_auc(y_true, y_score),
        "accuracy": _ratio(c["tp"] + c["tn"], n),
        "sensitivity": _ratio(c["tp"], c["tp"] + c["fn"]),
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        **c,
    }


def compute_roc(y_true: np.ndarray, y_score: np.ndarray) -> pd.DataFrame:
    """ROC curve points (fpr, tpr, threshold); the first point's infinite threshold is written as 1."""
    from sklearn.metrics import roc_curve

    y_true, y_score = _check_inputs(y_true, y_score)
    fpr, tpr, thr = roc_curve(y_true, y_score)
    thr = np.where(np.isfinite(thr), thr, 1.0)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr})


def predict_probabilities(model, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """The model's sigmoid outputs for ``images``, shape (n,)."""
    from medops.augment import make_dataset

    ds = make_dataset(images, None, batch_size=batch_size, training=False)
    return np.asarray(model.predict(ds, verbose=0), dtype=np.float64).reshape(-1)


def load_model(path: Path):
    import keras

    return keras.saving.load_model(Path(path), compile=False)


def write_plots(plots_dir: Path, rows: pd.DataFrame, y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> None:
    plots_dir.mkdir(parents=True, exist_ok=True)
    compute_roc(y_true, y_score).to_csv(plots_dir / "roc.csv", index=False)
    y_pred = (y_score >= threshold).astype(int)
    pd.DataFrame({"actual": y_true.astype(int), "predicted": y_pred}).to_csv(plots_dir / "confusion.csv", index=False)
    pd.DataFrame(
        {
            "sop_instance_uid": rows["sop_instance_uid"].to_numpy(),
            "patient_id": rows["patient_id"].to_numpy(),
            "label": y_true.astype(int),
            "probability": np.round(y_score, 6),
            "predicted": y_pred,
        }
    ).to_csv(plots_dir / "predictions.csv", index=False)


def run(cfg: EvaluateConfig, *, model: Path, ingested_dir: Path, split: Path, metrics_out: Path, plots_dir: Path) -> EvaluateResult:
    """Predict the test split, write metrics.json and the plot CSVs."""
    images, labels, rows = load_split_images(ingested_dir, split, "test")
    scores = predict_probabilities(load_model(model), images)
    metrics = compute_metrics(labels, scores, cfg.threshold)
    metrics_out = Path(metrics_out)
    metrics_out.parent.mkdir(parents=True, exist_ok=True)
    metrics_out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    write_plots(Path(plots_dir), rows, labels, scores, cfg.threshold)
    return EvaluateResult(**metrics, metrics_path=str(metrics_out), plots_dir=str(plots_dir))
