"""evaluate: metric math checked by hand, and the stage's files on a real trained model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from _ingested import build_trained
from medops import evaluate
from medops.config import EvaluateConfig
from medops.errors import MedopsError

# 4 positives, 4 negatives; at threshold 0.5: tp=3 (0.9, 0.8, 0.6), fn=1 (0.4),
# tn=3 (0.1, 0.2, 0.45), fp=1 (0.7).
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
S = np.array([0.9, 0.8, 0.6, 0.4, 0.1, 0.2, 0.45, 0.7])


def test_confusion_and_rates_by_hand():
    m = evaluate.compute_metrics(Y, S, 0.5)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (3, 1, 3, 1)
    assert m["accuracy"] == 6 / 8
    assert m["sensitivity"] == 3 / 4
    assert m["specificity"] == 3 / 4
    assert (m["n"], m["n_positive"], m["n_negative"]) == (8, 4, 4)
    # AUC = P(score of a positive > score of a negative), counted over the 16 pairs:
    # 0.9 and 0.8 beat all 4; 0.6 beats 3 (not 0.7); 0.4 beats 0.1 and 0.2 -> 4+4+3+2 = 13.
    assert m["auc"] == pytest.approx(13 / 16)


def test_score_equal_to_threshold_is_positive():
    m = evaluate.compute_metrics(np.array([1, 0]), np.array([0.5, 0.2]), 0.5)
    assert m["tp"] == 1 and m["tn"] == 1


def test_roc_points():
    roc = evaluate.compute_roc(Y, S)
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert (roc.iloc[0]["fpr"], roc.iloc[0]["tpr"], roc.iloc[0]["threshold"]) == (0, 0, 1.0)
    assert (roc.iloc[-1]["fpr"], roc.iloc[-1]["tpr"]) == (1, 1)
    assert np.trapz(roc["tpr"], roc["fpr"]) == pytest.approx(13 / 16)


def test_one_class_auc_is_an_error_not_a_number():
    with pytest.raises(MedopsError, match="only label 1"):
        evaluate.compute_auc(np.ones(4), np.linspace(0, 1, 4))
    with pytest.raises(ValueError, match="labels"):
        evaluate.compute_metrics(np.array([0, 2]), np.array([0.1, 0.2]), 0.5)


@pytest.mark.slow
def test_stage_writes_dvc_metrics_and_plots(tmp_path_factory):
    trained = build_trained(tmp_path_factory.mktemp("eval"), epochs=2)
    root = trained["model"].parent.parent
    metrics_out, plots = root / "reports" / "metrics.json", root / "reports" / "plots"
    result = evaluate.run(
        EvaluateConfig(threshold=0.5), model=trained["model"], ingested_dir=trained["ingested"],
        split=trained["split"], metrics_out=metrics_out, plots_dir=plots,
    )
    metrics = json.loads(metrics_out.read_text())
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # flat, as dvc metrics wants
    assert metrics["n"] == 160 == result.n  # the test split only
    assert metrics["auc"] > 0.7
    preds = pd.read_csv(plots / "predictions.csv")
    split = pd.read_csv(trained["split"])
    assert set(preds["sop_instance_uid"]) == set(split.loc[split["split"] == "test", "sop_instance_uid"])
    # The metrics are what the written predictions give.
    recomputed = evaluate.compute_metrics(preds["label"], preds["probability"], 0.5)
    assert recomputed["auc"] == pytest.approx(metrics["auc"], abs=1e-4)
    assert recomputed["tp"] == metrics["tp"] and recomputed["tn"] == metrics["tn"]
    confusion = pd.read_csv(plots / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 160
    assert int(((confusion.actual == 1) & (confusion.predicted == 1)).sum()) == metrics["tp"]
    roc = pd.read_csv(plots / "roc.csv")
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].is_monotonic_increasing
