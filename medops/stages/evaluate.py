"""evaluate: measure the trained model on the held-out test split.

Inputs:
    model: the trained Keras model (``models/model.keras``).
    ingested_dir, split: the data and ``split.csv``; only the ``test`` rows are read.
    train_result (optional): ``models/train.json``; its ``decision_threshold`` (chosen on val)
        replaces ``evaluate.threshold`` unless ``use_train_threshold`` is false.
Outputs:
    metrics_out: ``reports/metrics.json``, a flat DVC metrics file: auc with a bootstrap 95 % CI
        (auc_ci_low, auc_ci_high), accuracy, sensitivity, specificity, ppv, npv, f1,
        average_precision, ece (expected calibration error), counts, threshold.
    plots_dir: DVC plot data: ``roc.csv`` (fpr, tpr, threshold), ``pr.csv`` (recall, precision,
        threshold), ``confusion.csv`` (actual, predicted; one row per image, for the
        ``confusion`` template), ``calibration.csv`` and ``reliability.png`` (reliability
        diagram), ``predictions.csv`` (sop_instance_uid, patient_id, label, probability,
        predicted) and ``subgroups.csv`` (the metrics per patient_sex and age band).
Params (``evaluate`` section, EvaluateConfig):
    threshold: probability at or above which an image is called positive (pneumonia), when no
        decision threshold comes from training (or ``use_train_threshold`` is false).
    bootstrap_samples: resamples for the AUC confidence interval (at least 1).
    calibration_bins: equal-width probability bins of the reliability table and the ECE.

The metrics themselves live in ``medops.metrics`` (shared with train and gate); this stage
computes them on the test split and writes the reports and plots.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from medops.atomic import atomic_path, write_text
from medops.config import EvaluateConfig
from medops.learn.inference import load_model, predict_probabilities, resolve_threshold
from medops.metrics import (
    bootstrap_auc_ci,
    compute_auc,
    compute_calibration,
    compute_metrics,
    compute_pr,
    compute_roc,
    count_confusion,
    ratio,
    check_scores,
)
from medops.data import load_split_images


AGE_BANDS = ((0, 4, "0-4"), (5, 17, "5-17"), (18, 39, "18-39"), (40, 64, "40-64"), (65, 200, "65+"))


class EvaluateResult(BaseModel):
    n: int
    n_positive: int
    n_negative: int
    threshold: float
    threshold_source: str            # "train" (chosen on val) or "config"
    auc: float
    auc_ci_low: float
    auc_ci_high: float
    accuracy: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    f1: float
    average_precision: float
    ece: float
    tp: int
    fp: int
    tn: int
    fn: int
    subgroups: list[dict]
    metrics_path: str
    plots_dir: str


def age_band(age: object) -> str:
    """The AGE_BANDS label for an age in years ("unknown" when missing)."""
    if age is None or pd.isna(age):
        return "unknown"
    for lo, hi, name in AGE_BANDS:
        if lo <= int(age) <= hi:
            return name
    return "unknown"


def compute_subgroup_metrics(rows: pd.DataFrame, y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> pd.DataFrame:
    """Metrics per patient_sex and per age band; AUC is left empty for one-class subgroups."""
    y_true, y_score = check_scores(y_true, y_score)
    groups: dict[str, pd.Series] = {}
    if "patient_sex" in rows.columns:
        groups["patient_sex"] = rows["patient_sex"].fillna("unknown").astype(str)
    if "patient_age" in rows.columns:
        groups["age_band"] = rows["patient_age"].map(age_band)
    out = []
    for attribute, values in groups.items():
        values = values.to_numpy()
        for value in sorted(set(values)):
            mask = values == value
            yt, ys = y_true[mask], y_score[mask]
            pred = (ys >= threshold).astype(int)
            c = count_confusion(yt, pred)
            out.append({
                "attribute": attribute, "value": value, "n": int(mask.sum()), "n_positive": int(yt.sum()),
                "auc": float(compute_auc(yt, ys)) if len(np.unique(yt)) == 2 else None,
                "accuracy": ratio(c["tp"] + c["tn"], int(mask.sum())),
                "sensitivity": ratio(c["tp"], c["tp"] + c["fn"]) if yt.sum() else None,
                "specificity": ratio(c["tn"], c["tn"] + c["fp"]) if (1 - yt).sum() else None,
            })
    return pd.DataFrame(out, columns=["attribute", "value", "n", "n_positive", "auc", "accuracy", "sensitivity", "specificity"])


def plot_reliability(calibration: pd.DataFrame, ece: float, path: Path) -> None:
    """Reliability diagram: observed fraction positive against mean predicted probability."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    full = calibration[calibration["count"] > 0]
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ax.plot(full["mean_probability"], full["fraction_positive"], "o-", label=f"model (ECE {ece:.3f})")
    ax.set_ylabel("fraction positive")
    ax.set_title("Reliability on the test split")
    ax.legend(loc="upper left")
    centres = (calibration["bin_low"] + calibration["bin_high"]) / 2
    hist.bar(centres, calibration["count"], width=calibration["bin_high"] - calibration["bin_low"], edgecolor="black")
    hist.set_xlabel("predicted probability")
    hist.set_ylabel("images")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_plots(
    plots_dir: Path, rows: pd.DataFrame, y_true: np.ndarray, y_score: np.ndarray, threshold: float,
    *, calibration: pd.DataFrame, ece: float, pr: pd.DataFrame, subgroups: pd.DataFrame,
) -> None:
    plots_dir.mkdir(parents=True, exist_ok=True)
    _csv(compute_roc(y_true, y_score), plots_dir / "roc.csv")
    _csv(pr, plots_dir / "pr.csv")
    y_pred = (y_score >= threshold).astype(int)
    _csv(pd.DataFrame({"actual": y_true.astype(int), "predicted": y_pred}), plots_dir / "confusion.csv")
    _csv(calibration, plots_dir / "calibration.csv")
    plot_reliability(calibration, ece, plots_dir / "reliability.png")
    _csv(subgroups, plots_dir / "subgroups.csv")
    _csv(pd.DataFrame(
        {
            "sop_instance_uid": rows["sop_instance_uid"].to_numpy(),
            "patient_id": rows["patient_id"].to_numpy(),
            "label": y_true.astype(int),
            "probability": np.round(y_score, 6),
            "predicted": y_pred,
        }
    ), plots_dir / "predictions.csv")


def _csv(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` as CSV at ``path``, written whole or not at all (medops.atomic)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def evaluate_scores(
    cfg: EvaluateConfig, rows: pd.DataFrame, y_true: np.ndarray, y_score: np.ndarray, threshold: float
) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Flat metrics, calibration table, PR table and subgroup table for one set of predictions."""
    metrics = compute_metrics(y_true, y_score, threshold)
    lo, hi = bootstrap_auc_ci(y_true, y_score, n_samples=cfg.bootstrap_samples)
    calibration, ece = compute_calibration(y_true, y_score, cfg.calibration_bins)
    pr, ap = compute_pr(y_true, y_score)
    metrics.update(auc_ci_low=lo, auc_ci_high=hi, ece=ece, average_precision=ap)
    return metrics, calibration, pr, compute_subgroup_metrics(rows, y_true, y_score, threshold)


def run(
    cfg: EvaluateConfig,
    *,
    model: Path,
    ingested_dir: Path,
    split: Path,
    metrics_out: Path,
    plots_dir: Path,
    train_result: Path | None = None,
) -> EvaluateResult:
    """Predict the test split, write metrics.json and the plot data."""
    threshold, source = resolve_threshold(cfg, train_result)
    images, labels, rows = load_split_images(ingested_dir, split, "test")
    scores = predict_probabilities(load_model(model), images)
    metrics, calibration, pr, subgroups = evaluate_scores(cfg, rows, labels, scores, threshold)
    metrics_out = Path(metrics_out)
    # the plots first, metrics.json last: a run killed half-way leaves no new metrics beside old plots
    write_plots(Path(plots_dir), rows, labels, scores, threshold, calibration=calibration, ece=metrics["ece"],
                pr=pr, subgroups=subgroups)
    write_text(metrics_out, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return EvaluateResult(
        **metrics, threshold_source=source,
        subgroups=json.loads(subgroups.to_json(orient="records")),
        metrics_path=str(metrics_out), plots_dir=str(plots_dir),
    )
