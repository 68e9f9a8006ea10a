"""metrics: how well scores separate the classes, and where to cut them.

Shared by every stage that judges a model (train chooses its threshold on val, evaluate reports
the test split, gate compares the champion): pure numpy / scikit-learn / pandas, tested on
hand-made arrays. No stage owns them, so editing a plot in evaluate does not retrain the model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medops.errors import MedopsError


def check_scores(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def ratio(num: int, den: int) -> float:
    # An empty class has no defined rate; NaN would break JSON, so report 0 (and the gate fails it).
    return float(num / den) if den else 0.0


def compute_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC; raises MedopsError when only one class is present (AUC is undefined)."""
    from sklearn.metrics import roc_auc_score

    y_true, y_score = check_scores(y_true, y_score)
    if len(np.unique(y_true)) < 2:
        raise MedopsError(f"AUC undefined: the evaluation set has only label {int(y_true[0])}")
    return float(roc_auc_score(y_true, y_score))


def compute_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> dict[str, float | int]:
    """AUC, accuracy, sensitivity (recall of 1), specificity (recall of 0) and counts.

    A score at or above ``threshold`` is a positive call.
    """
    y_true, y_score = check_scores(y_true, y_score)
    y_pred = (y_score >= threshold).astype(int)
    c = count_confusion(y_true, y_pred)
    n = len(y_true)
    return {
        "n": n,
        "n_positive": int(y_true.sum()),
        "n_negative": int(n - y_true.sum()),
        "threshold": float(threshold),
        "auc": compute_auc(y_true, y_score),
        "accuracy": ratio(c["tp"] + c["tn"], n),
        "sensitivity": ratio(c["tp"], c["tp"] + c["fn"]),
        "specificity": ratio(c["tn"], c["tn"] + c["fp"]),
        "ppv": ratio(c["tp"], c["tp"] + c["fp"]),
        "npv": ratio(c["tn"], c["tn"] + c["fn"]),
        "f1": ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"]),
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
    y_true, y_score = check_scores(y_true, y_score)
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
    y_true, y_score = check_scores(y_true, y_score)
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

    y_true, y_score = check_scores(y_true, y_score)
    precision, recall, thr = precision_recall_curve(y_true, y_score)
    # precision_recall_curve gives one fewer threshold than points; the last point has none
    thr = np.append(thr, 1.0)
    table = pd.DataFrame({"recall": recall, "precision": precision, "threshold": thr})
    return table, float(average_precision_score(y_true, y_score))


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
    y_true, y_score = check_scores(y_true, y_score)
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

    y_true, y_score = check_scores(y_true, y_score)
    fpr, tpr, thr = roc_curve(y_true, y_score)
    thr = np.where(np.isfinite(thr), thr, 1.0)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr})


def logit(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """log(p / (1 - p)), with p clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), without overflow."""
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def fit_platt(y_true: np.ndarray, z: np.ndarray, *, max_iter: int = 100) -> tuple[float, float]:
    """Platt scaling: (a, b) of p = sigmoid(a * z + b) fitted by maximum likelihood to ``y_true``
    on logits ``z`` (Newton's method with a backtracking line search), with Platt's smoothed targets (N+ + 1) / (N+ + 2) and
    1 / (N- + 2), which keep ``a`` finite on a split the model separates perfectly (Platt 1999).
    ``a`` is the inverse temperature, ``b`` the shift to the split's class prior."""
    y_true, z = check_scores(y_true, z)
    compute_auc(y_true, z)  # both classes present, or a typed error
    n_pos = float(y_true.sum())
    n_neg = float(len(y_true) - n_pos)
    t = np.where(y_true == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(a: float, b: float) -> float:  # cross-entropy against t, without overflow
        s = a * z + b
        return float(np.sum(t * np.logaddexp(0.0, -s) + (1 - t) * np.logaddexp(0.0, s)))

    a, b = 1.0 / max(float(np.std(z)), 1e-12), 0.0  # start with the logits at unit scale
    current = loss(a, b)
    for _ in range(max_iter):
        p = sigmoid(a * z + b)
        w = np.maximum(p * (1 - p), 1e-12)
        grad = np.array([np.sum((p - t) * z), np.sum(p - t)])
        hess = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]])
        step = np.linalg.solve(hess + 1e-9 * np.eye(2), grad)
        scale = 1.0
        while scale > 1e-10 and loss(a - scale * step[0], b - scale * step[1]) > current:
            scale /= 2  # Newton with backtracking: the loss never increases
        a, b = a - scale * step[0], b - scale * step[1]
        previous, current = current, loss(a, b)
        if np.abs(scale * step).max() < 1e-10 or previous - current < 1e-12:
            break
    if not (np.isfinite(a) and np.isfinite(b)) or a <= 0:
        raise MedopsError(f"Platt scaling did not find an increasing calibration (a={a}, b={b})")
    return float(a), float(b)


def balanced_cutpoint(y_true: np.ndarray, z: np.ndarray) -> tuple[float, float, float]:
    """The ``balanced`` rule: Platt-calibrate logits ``z`` on (validation) labels, then call positive
    where the calibrated probability reaches the split's positive fraction pi, i.e. where the
    likelihood ratio is 1: the Bayes decision for equal class priors (minimum balanced error, what
    Youden's J aims at), from two parameters fitted on every image instead of an argmax over a few
    borderline ones. Returns (a, b, z*): the calibration and the cut-point on the raw logit."""
    a, b = fit_platt(y_true, z)
    prior = float(np.mean(check_scores(y_true, z)[0]))
    return a, b, (float(logit(np.array([prior]))[0]) - b) / a


def threshold_interval(
    y_true: np.ndarray, z: np.ndarray, strategy: str, *, a: float = 1.0, b: float = 0.0,
    bootstrap_samples: int = 200, seed: int = 0, coverage: float = 0.9,
) -> tuple[float, float]:
    """How stable the decision threshold is on (validation) data: the ``coverage`` interval, over
    stratified bootstrap resamples, of the cut-point ``strategy`` picks, expressed as a
    probability of the calibrated model sigmoid(a * z + b) (the model that is served).

    ``strategy``: ``balanced`` (refit each resample: ``balanced_cutpoint``) or a
    ``select_threshold`` strategy applied to the calibrated probabilities (``youden`` and
    ``youden_bootstrap`` both use each resample's Youden point; ``fixed`` is always 0.5)."""
    y_true, z = check_scores(y_true, z)
    if strategy == "fixed":
        return 0.5, 0.5
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y_true == 1), np.flatnonzero(y_true == 0)
    probs = sigmoid(a * z + b)
    picks = []
    for _ in range(bootstrap_samples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        if strategy == "balanced":
            picks.append(float(sigmoid(a * balanced_cutpoint(y_true[idx], z[idx])[2] + b)))
        else:
            point = "youden" if strategy == "youden_bootstrap" else strategy
            picks.append(select_threshold(y_true[idx], probs[idx], point))
    tail = (1 - coverage) / 2 * 100
    lo, hi = np.percentile(picks, [tail, 100 - tail])
    return float(lo), float(hi)
