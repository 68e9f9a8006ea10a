"""evaluate: metric math checked by hand, and the stage's files on a real trained model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from _ingested import build_trained
from medops import metrics
from medops.learn import inference
from medops.stages import evaluate
from medops.config import EvaluateConfig
from medops.errors import MedopsError

# 4 positives, 4 negatives; at threshold 0.5: tp=3 (0.9, 0.8, 0.6), fn=1 (0.4),
# tn=3 (0.1, 0.2, 0.45), fp=1 (0.7).
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
S = np.array([0.9, 0.8, 0.6, 0.4, 0.1, 0.2, 0.45, 0.7])


def test_confusion_and_rates_by_hand():
    m = metrics.compute_metrics(Y, S, 0.5)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (3, 1, 3, 1)
    assert m["accuracy"] == 6 / 8
    assert m["sensitivity"] == 3 / 4
    assert m["specificity"] == 3 / 4
    assert (m["n"], m["n_positive"], m["n_negative"]) == (8, 4, 4)
    # AUC = P(score of a positive > score of a negative), counted over the 16 pairs:
    # 0.9 and 0.8 beat all 4; 0.6 beats 3 (not 0.7); 0.4 beats 0.1 and 0.2 -> 4+4+3+2 = 13.
    assert m["auc"] == pytest.approx(13 / 16)


def test_ppv_npv_f1_by_hand():
    # threshold 0.3: called positive 0.9 0.8 0.6 0.4 (all positives) and 0.45 0.7 (negatives)
    m = metrics.compute_metrics(Y, S, 0.3)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (4, 2, 2, 0)
    assert m["ppv"] == pytest.approx(4 / 6)
    assert m["npv"] == 1.0
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 2 + 0))


def test_threshold_selection_by_hand():
    # Descending scores: 0.9+ 0.8+ 0.7- 0.6+ 0.45- 0.4+ 0.2- 0.1-. Youden's J is 0.5 at 0.8, 0.6 and
    # 0.4; ties go to the highest threshold (fewest false positives).
    assert metrics.select_threshold(Y, S, "youden") == pytest.approx(0.8)
    assert metrics.select_threshold(Y, S, "sensitivity", target_sensitivity=0.75) == pytest.approx(0.6)
    assert metrics.select_threshold(Y, S, "sensitivity", target_sensitivity=1.0) == pytest.approx(0.4)
    assert metrics.select_threshold(Y, S, "fixed") == 0.5
    with pytest.raises(MedopsError, match="threshold_strategy"):
        metrics.select_threshold(Y, S, "magic")


def test_youden_bootstrap_is_seeded_and_stratified():
    # Y/S above: J ties at 0.8, 0.6 and 0.4 (J = 0.5); resamples break the tie either way, and the
    # median of their picks is one of the scores, the same for the same seed
    t = metrics.select_threshold(Y, S, "youden_bootstrap", bootstrap_samples=201, seed=1)
    assert np.isclose(S, t).any()  # an odd number of picks: the median is one of them
    assert t == metrics.select_threshold(Y, S, "youden_bootstrap", bootstrap_samples=201, seed=1)
    # stratified: two positives among many negatives still give both classes in every resample
    y = np.array([1, 1] + [0] * 30)
    s = np.r_[[0.9, 0.7], np.linspace(0.0, 0.6, 30)]
    assert metrics.select_threshold(y, s, "youden_bootstrap", bootstrap_samples=50) == pytest.approx(0.7)
    # separable scores: every resample's J = 1 first at its lowest positive, so the median is one
    # of the lowest positives, above every negative
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(80), np.ones(60)].astype(int)
    s = np.r_[rng.uniform(0.0, 0.5, 80), rng.uniform(0.7, 1.0, 60)]
    boot = metrics.select_threshold(y, s, "youden_bootstrap", bootstrap_samples=101, seed=0)
    assert boot in np.sort(s[y == 1])[:3]
    assert metrics.select_threshold(y, s, "youden") == np.sort(s[y == 1])[0]
    with pytest.raises(MedopsError, match="bootstrap_samples"):
        metrics.select_threshold(Y, S, "youden_bootstrap", bootstrap_samples=0)


def test_expected_calibration_error_by_hand():
    y = np.array([0, 1, 1, 0])
    s = np.array([0.05, 0.95, 0.85, 0.75])
    table, ece = metrics.compute_calibration(y, s, n_bins=10)
    # one image per occupied bin: |label - score| = 0.05, 0.05, 0.15, 0.75
    assert ece == pytest.approx((0.05 + 0.05 + 0.15 + 0.75) / 4)
    assert table["count"].sum() == 4 and len(table) == 10
    assert table.loc[7, "fraction_positive"] == 0 and table.loc[7, "mean_probability"] == pytest.approx(0.75)
    assert metrics.compute_calibration(np.array([1, 0]), np.array([1.0, 0.0]))[1] == 0.0


def test_bootstrap_ci_brackets_the_auc_and_narrows_with_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    s = np.clip(y * 0.3 + rng.normal(0.35, 0.2, 400), 0, 1)
    auc = metrics.compute_auc(y, s)
    lo, hi = metrics.bootstrap_auc_ci(y, s, n_samples=300)
    assert lo < auc < hi
    lo_small, hi_small = metrics.bootstrap_auc_ci(y[:50], s[:50], n_samples=300)
    assert hi_small - lo_small > hi - lo
    assert metrics.bootstrap_auc_ci(y, s, n_samples=300) == (lo, hi)  # seeded


def test_bootstrap_ci_without_a_two_class_resample_is_a_clear_error():
    y, s = np.array([0, 1]), np.array([0.2, 0.8])
    # seed 4: each of the 3 resamples of 2 images draws the same image twice
    with pytest.raises(MedopsError, match="none of 3 bootstrap resamples of 2 images .* held both classes"):
        metrics.bootstrap_auc_ci(y, s, n_samples=3, seed=4)
    with pytest.raises(MedopsError, match="n_samples >= 1, got 0"):
        metrics.bootstrap_auc_ci(y, s, n_samples=0)


def test_a_missing_or_corrupt_train_result_is_a_clear_error(tmp_path):
    with pytest.raises(MedopsError, match=r"no train result at .*train\.json: run the stage"):
        inference.resolve_threshold(EvaluateConfig(), tmp_path / "train.json")
    (tmp_path / "train.json").write_text("{not json")
    with pytest.raises(MedopsError, match=r"cannot read train result at .*train\.json"):
        inference.resolve_threshold(EvaluateConfig(), tmp_path / "train.json")
    (tmp_path / "train.json").write_text("[0.4]")
    with pytest.raises(MedopsError, match="is not a JSON object"):
        inference.resolve_threshold(EvaluateConfig(), tmp_path / "train.json")
    (tmp_path / "train.json").write_text('{"decision_threshold": 0.4}')
    assert inference.resolve_threshold(EvaluateConfig(), tmp_path / "train.json") == (0.4, "train")
    assert inference.resolve_threshold(EvaluateConfig(use_train_threshold=False), tmp_path / "nothing") == (0.5, "config")


def test_bootstrap_samples_must_be_at_least_one():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="bootstrap_samples"):
        EvaluateConfig(bootstrap_samples=0)
    assert EvaluateConfig(bootstrap_samples=1).bootstrap_samples == 1


def test_pr_curve_and_average_precision():
    pr, ap = metrics.compute_pr(Y, S)
    assert list(pr.columns) == ["recall", "precision", "threshold"]
    # AP = sum over positives of precision at their rank / 4: ranks 1, 2, 4, 6 -> 1, 1, 3/4, 4/6
    assert ap == pytest.approx((1 + 1 + 3 / 4 + 4 / 6) / 4)


def test_subgroup_metrics():
    rows = pd.DataFrame({"patient_sex": ["F", "F", "F", "F", "M", "M", "M", None],
                         "patient_age": [3, 3, 30, 30, 70, 70, pd.NA, 10]})
    table = evaluate.compute_subgroup_metrics(rows, Y, S, 0.5).set_index(["attribute", "value"])
    female = table.loc[("patient_sex", "F")]
    assert female["n"] == 4 and female["n_positive"] == 4 and pd.isna(female["auc"])
    assert female["sensitivity"] == 3 / 4  # 0.4 is missed
    male = table.loc[("patient_sex", "M")]  # labels 0 0 0 (scores 0.1 0.2 0.45)
    assert male["specificity"] == 1.0 and pd.isna(male["sensitivity"])
    assert table.loc[("patient_sex", "unknown"), "n"] == 1
    assert table.loc[("age_band", "0-4"), "n"] == 2 and table.loc[("age_band", "unknown"), "n"] == 1
    assert table.loc[("age_band", "65+"), "n"] == 2


def test_score_equal_to_threshold_is_positive():
    m = metrics.compute_metrics(np.array([1, 0]), np.array([0.5, 0.2]), 0.5)
    assert m["tp"] == 1 and m["tn"] == 1


def test_roc_points():
    roc = metrics.compute_roc(Y, S)
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert (roc.iloc[0]["fpr"], roc.iloc[0]["tpr"], roc.iloc[0]["threshold"]) == (0, 0, 1.0)
    assert (roc.iloc[-1]["fpr"], roc.iloc[-1]["tpr"]) == (1, 1)
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(13 / 16)


def test_one_class_auc_is_an_error_not_a_number():
    with pytest.raises(MedopsError, match="only label 1"):
        metrics.compute_auc(np.ones(4), np.linspace(0, 1, 4))
    with pytest.raises(ValueError, match="labels"):
        metrics.compute_metrics(np.array([0, 2]), np.array([0.1, 0.2]), 0.5)


@pytest.mark.slow
def test_stage_writes_dvc_metrics_and_plots(tmp_path_factory):
    trained = build_trained(tmp_path_factory.mktemp("eval"), epochs=2)
    root = trained["model"].parent.parent
    metrics_out, plots = root / "reports" / "metrics.json", root / "reports" / "plots"
    result = evaluate.run(
        EvaluateConfig(threshold=0.5), model=trained["model"], ingested_dir=trained["ingested"],
        split=trained["split"], metrics_out=metrics_out, plots_dir=plots, train_result=trained["train_result"],
    )
    metrics = json.loads(metrics_out.read_text())
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # flat, as dvc metrics wants
    assert metrics["n"] == 160 == result.n  # the test split only
    assert metrics["auc"] > 0.7
    assert metrics["auc_ci_low"] < metrics["auc"] < metrics["auc_ci_high"]
    # The decision threshold chosen on val in training, not evaluate.threshold.
    chosen = json.loads(trained["train_result"].read_text())["decision_threshold"]
    assert result.threshold_source == "train" and metrics["threshold"] == chosen != 0.5
    preds = pd.read_csv(plots / "predictions.csv")
    split = pd.read_csv(trained["split"])
    assert set(preds["sop_instance_uid"]) == set(split.loc[split["split"] == "test", "sop_instance_uid"])
    # The metrics are what the written predictions give.
    from medops.metrics import compute_metrics

    recomputed = compute_metrics(preds["label"], preds["probability"], chosen)
    assert recomputed["auc"] == pytest.approx(metrics["auc"], abs=1e-4)
    assert recomputed["tp"] == metrics["tp"] and recomputed["tn"] == metrics["tn"]
    confusion = pd.read_csv(plots / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 160
    assert int(((confusion.actual == 1) & (confusion.predicted == 1)).sum()) == metrics["tp"]
    roc = pd.read_csv(plots / "roc.csv")
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].is_monotonic_increasing
    assert (plots / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pd.read_csv(plots / "calibration.csv")["count"].sum() == 160
    assert len(pd.read_csv(plots / "pr.csv")) > 2
    subgroups = pd.read_csv(plots / "subgroups.csv")
    assert subgroups.groupby("attribute")["n"].sum().to_dict() == {"age_band": 160, "patient_sex": 160}
    # Without train.json the configured threshold applies.
    again = evaluate.run(
        EvaluateConfig(threshold=0.5), model=trained["model"], ingested_dir=trained["ingested"],
        split=trained["split"], metrics_out=metrics_out, plots_dir=plots,
    )
    assert again.threshold == 0.5 and again.threshold_source == "config"
