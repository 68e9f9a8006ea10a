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
from medops.paths import read_json
from medops.stages.split import load_split_images


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
        "ppv": _ratio(c["tp"], c["tp"] + c["fp"]),
        "npv": _ratio(c["tn"], c["tn"] + c["fn"]),
        "f1": _ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"]),
        **c,
    }


def bootstrap_auc_ci(
    y_true: np.ndarray, y_score: np.ndarray, *, n_samples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval for the AUC (images resampled with replacement;
    resamples holding one class only are skipped).

    Raises:
        MedopsError: ``n_samples`` < 1, only one class is present, or no resample held both
            classes (too few samples for a minority class this small).
    """
    from sklearn.metrics import roc_auc_score

    if n_samples < 1:
        raise MedopsError(f"the AUC bootstrap needs n_samples >= 1, got {n_samples}")
    y_true, y_score = _check_inputs(y_true, y_score)
    compute_auc(y_true, y_score)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    aucs = []
    for _ in range(n_samples):
        idx = rng.integers(0, n, n)
        yt = y_true[idx]
        if yt.min() == yt.max():
            continue
        aucs.append(roc_auc_score(yt, y_score[idx]))
    if not aucs:
        raise MedopsError(
            f"AUC confidence interval undefined: none of {n_samples} bootstrap resamples of "
            f"{n} images ({int(y_true.sum())} positive) held both classes; raise "
            "evaluate.bootstrap_samples"
        )
    alpha = (1 - level) / 2
    lo, hi = np.quantile(aucs, [alpha, 1 - alpha])
    return float(lo), float(hi)


def compute_calibration(y_true: np.ndarray, y_score: np.ndarray, n_bins: int = 10) -> tuple[pd.DataFrame, float]:
    """Reliability table over ``n_bins`` equal-width probability bins and the expected
    calibration error ECE = sum_b (n_b / n) * |mean label_b - mean score_b|."""
    y_true, y_score = _check_inputs(y_true, y_score)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed last bin, so a score of exactly 1 is counted
    bins = np.clip(np.digitize(y_score, edges[1:-1], right=False), 0, n_bins - 1)
    rows = []
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        count = int(mask.sum())
        conf = float(y_score[mask].mean()) if count else float("nan")
        frac = float(y_true[mask].mean()) if count else float("nan")
        if count:
            ece += count / len(y_true) * abs(frac - conf)
        rows.append({"bin_low": edges[b], "bin_high": edges[b + 1], "count": count,
                     "mean_probability": conf, "fraction_positive": frac})
    return pd.DataFrame(rows), float(ece)


def compute_pr(y_true: np.ndarray, y_score: np.ndarray) -> tuple[pd.DataFrame, float]:
    """Precision-recall curve points and the average precision."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y_true, y_score = _check_inputs(y_true, y_score)
    precision, recall, thr = precision_recall_curve(y_true, y_score)
    # precision_recall_curve gives one fewer threshold than points; the last point has none
    thr = np.append(thr, 1.0)
    table = pd.DataFrame({"recall": recall, "precision": precision, "threshold": thr})
    return table, float(average_precision_score(y_true, y_score))


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
    y_true, y_score = _check_inputs(y_true, y_score)
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
                "accuracy": _ratio(c["tp"] + c["tn"], int(mask.sum())),
                "sensitivity": _ratio(c["tp"], c["tp"] + c["fn"]) if yt.sum() else None,
                "specificity": _ratio(c["tn"], c["tn"] + c["fp"]) if (1 - yt).sum() else None,
            })
    return pd.DataFrame(out, columns=["attribute", "value", "n", "n_positive", "auc", "accuracy", "sensitivity", "specificity"])


def _youden_index(fpr: np.ndarray, tpr: np.ndarray) -> int:
    return int(np.argmax(tpr - fpr))  # first maximum: the highest threshold among ties


def select_threshold(
    y_true: np.ndarray, y_score: np.ndarray, strategy: str, *, target_sensitivity: float = 0.9,
    bootstrap_samples: int = 1000, seed: int = 0,
) -> float:
    """The decision threshold for ``strategy``, chosen on (validation) labels and scores.

    - ``fixed``: 0.5.
    - ``youden``: the ROC point maximising Youden's J = sensitivity + specificity - 1.
    - ``youden_bootstrap``: the median, over ``bootstrap_samples`` resamples of the labels and
      scores (stratified by class, seeded), of each resample's Youden threshold. On a validation
      split that the model separates almost perfectly, the single argmax of J sits on whichever
      few borderline images happen to be in it and moves a lot from one split (or seed) to the
      next; the bootstrap median is the same choice with that variance averaged out (the
      "maximize_boot_metric" cut-point of Thiele & Hirschfeld, cutpointr, J. Stat. Softw. 2021).
    - ``sensitivity``: the highest threshold whose sensitivity is at least ``target_sensitivity``
      (the most specific operating point that still finds that share of positives).
    """
    from sklearn.metrics import roc_curve

    if strategy == "fixed":
        return 0.5
    y_true, y_score = _check_inputs(y_true, y_score)
    compute_auc(y_true, y_score)  # both classes present, or a typed error
    fpr, tpr, thr = roc_curve(y_true, y_score)
    finite = np.isfinite(thr)
    fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    if strategy == "youden":
        value = thr[_youden_index(fpr, tpr)]
    elif strategy == "youden_bootstrap":
        if bootstrap_samples < 1:
            raise MedopsError(f"youden_bootstrap needs bootstrap_samples >= 1, got {bootstrap_samples}")
        rng = np.random.default_rng(seed)
        pos, neg = np.flatnonzero(y_true == 1), np.flatnonzero(y_true == 0)
        picks = []
        for _ in range(bootstrap_samples):
            idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
            b_fpr, b_tpr, b_thr = roc_curve(y_true[idx], y_score[idx])
            ok = np.isfinite(b_thr)
            picks.append(b_thr[ok][_youden_index(b_fpr[ok], b_tpr[ok])])
        value = float(np.median(picks))
    elif strategy == "sensitivity":
        if not 0 < target_sensitivity <= 1:
            raise MedopsError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        value = thr[int(np.nonzero(tpr >= target_sensitivity)[0][0])]
    else:
        raise MedopsError("threshold_strategy must be fixed, youden, youden_bootstrap or sensitivity, "
                          f"got {strategy!r}")
    return float(min(max(value, 1e-6), 1.0))


def compute_roc(y_true: np.ndarray, y_score: np.ndarray) -> pd.DataFrame:
    """ROC curve points (fpr, tpr, threshold); the first point's infinite threshold is written as 1."""
    from sklearn.metrics import roc_curve

    y_true, y_score = _check_inputs(y_true, y_score)
    fpr, tpr, thr = roc_curve(y_true, y_score)
    thr = np.where(np.isfinite(thr), thr, 1.0)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr})


def predict_probabilities(model, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """The model's sigmoid outputs for ``images``, shape (n,)."""
    from medops.learn.input_pipeline import make_dataset

    ds = make_dataset(images, None, batch_size=batch_size, training=False)
    return np.asarray(model.predict(ds, verbose=0), dtype=np.float64).reshape(-1)


def load_model(path: Path):
    """The Keras model saved at ``path``, uncompiled (for inference only)."""
    import keras

    return keras.saving.load_model(Path(path), compile=False)


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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(
    plots_dir: Path, rows: pd.DataFrame, y_true: np.ndarray, y_score: np.ndarray, threshold: float,
    *, calibration: pd.DataFrame, ece: float, pr: pd.DataFrame, subgroups: pd.DataFrame,
) -> None:
    plots_dir.mkdir(parents=True, exist_ok=True)
    compute_roc(y_true, y_score).to_csv(plots_dir / "roc.csv", index=False)
    pr.to_csv(plots_dir / "pr.csv", index=False)
    y_pred = (y_score >= threshold).astype(int)
    pd.DataFrame({"actual": y_true.astype(int), "predicted": y_pred}).to_csv(plots_dir / "confusion.csv", index=False)
    calibration.to_csv(plots_dir / "calibration.csv", index=False)
    plot_reliability(calibration, ece, plots_dir / "reliability.png")
    subgroups.to_csv(plots_dir / "subgroups.csv", index=False)
    pd.DataFrame(
        {
            "sop_instance_uid": rows["sop_instance_uid"].to_numpy(),
            "patient_id": rows["patient_id"].to_numpy(),
            "label": y_true.astype(int),
            "probability": np.round(y_score, 6),
            "predicted": y_pred,
        }
    ).to_csv(plots_dir / "predictions.csv", index=False)


def resolve_threshold(cfg: EvaluateConfig, train_result: Path | None) -> tuple[float, str]:
    """The decision threshold and where it came from: train.json's (chosen on val) or the config's."""
    if cfg.use_train_threshold and train_result is not None:
        record = read_json(train_result, "train result")
        if record.get("decision_threshold") is not None:
            return float(record["decision_threshold"]), "train"
    return float(cfg.threshold), "config"


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
    metrics_out.parent.mkdir(parents=True, exist_ok=True)
    metrics_out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    write_plots(Path(plots_dir), rows, labels, scores, threshold, calibration=calibration, ece=metrics["ece"],
                pr=pr, subgroups=subgroups)
    return EvaluateResult(
        **metrics, threshold_source=source,
        subgroups=json.loads(subgroups.to_json(orient="records")),
        metrics_path=str(metrics_out), plots_dir=str(plots_dir),
    )
