"""gate: the edges its other tests leave open (found by mutation testing, benchmarks/mutation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medops import results
from medops.config import GateConfig
from medops.errors import MedopsError
from medops.stages import gate

GOOD = {"auc": 0.912, "accuracy": 0.86, "sensitivity": 0.93, "specificity": 0.74}


def _inputs(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(GOOD))
    (tmp_path / "train.json").write_text(json.dumps({"data_version": "abc123", "model": "simple_cnn"}))
    return {"metrics": tmp_path / "metrics.json", "train_result": tmp_path / "train.json"}


def test_the_decision_is_written_into_a_folder_that_does_not_exist_yet(tmp_path):
    out = tmp_path / "reports" / "new" / "gate.json"
    assert gate.run(GateConfig(), out=out, **_inputs(tmp_path)).passed
    assert results.read_decision(out).passed


def _scores(pairs: int) -> np.ndarray:
    """Scores of 10 positives then 10 negatives (0..9) whose AUC is pairs / 100: each positive
    sits just above as many negatives as its share of ``pairs``."""
    above = [pairs // 10 + (1 if i < pairs % 10 else 0) for i in range(10)]
    return np.concatenate([np.array(above) - 0.5, np.arange(10, dtype=float)])


def test_worse_by_exactly_the_margin_passes_despite_float_rounding():
    """Champion AUC 0.60, candidate 0.56, margin 0.04: the difference comes out as
    -0.040000000000000036 in floating point; the tolerance lets "worse by exactly the margin"
    pass, as documented, and no more."""
    y = np.array([1] * 10 + [0] * 10)
    result = gate.compare_with_champion(0.04, version=1, y_true=y, candidate=_scores(56), champion=_scores(60))
    assert (result.auc, result.candidate_auc) == (pytest.approx(0.60), pytest.approx(0.56))
    assert result.difference < -0.04  # the rounding the tolerance is for
    assert result.passed and result.reason.endswith("within margin 0.040: pass")
    worse = gate.compare_with_champion(0.039, version=1, y_true=y, candidate=_scores(56), champion=_scores(60))
    assert not worse.passed and worse.reason.endswith("> margin 0.039: fail")


def test_the_champion_is_looked_for_under_the_default_model_name(tmp_path):
    """run() without model_name compares with the served pneumonia_classifier."""
    version = tmp_path / "repo" / "pneumonia_classifier" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(MedopsError, match="champion v1 of pneumonia_classifier is serving"):
        gate.run(GateConfig(), out=tmp_path / "gate.json", repository=tmp_path / "repo", **_inputs(tmp_path))


@pytest.mark.parametrize("missing", ["ingested_dir", "split", "both"])
def test_scoring_the_champion_needs_both_the_data_and_the_split(tmp_path, missing):
    version = tmp_path / "repo" / "pneumonia_classifier" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"not a model")
    (tmp_path / "predictions.csv").write_text("sop_instance_uid,probability\n1,0.5\n")
    given = {"ingested_dir": tmp_path / "ingested", "split": tmp_path / "split.csv"}
    if missing == "both":
        given = {}
    else:
        given.pop(missing)
    with pytest.raises(MedopsError, match="needs ingested_dir and split"):
        gate.run(GateConfig(), out=tmp_path / "gate.json", repository=tmp_path / "repo",
                 predictions=tmp_path / "predictions.csv", **given, **_inputs(tmp_path))


def test_no_test_images_give_no_scores(tmp_path):
    from test_gate import linear_onnx

    path = tmp_path / "model.onnx"
    path.write_bytes(linear_onnx(np.zeros(28 * 28), 0.0))
    scores = gate.score_onnx(path, np.zeros((0, 28, 28, 1), dtype=np.float32))
    assert scores.shape == (0,)
    assert gate.score_onnx(path, np.zeros((3, 28, 28, 1), dtype=np.float32), batch_size=2).tolist() == [0.5] * 3


def test_a_comparison_switched_off_is_recorded_as_not_compared(tmp_path):
    result = gate.judge_champion(GateConfig(compare_with_serving=False), repository=tmp_path,
                                 model_name="m", load_test=lambda: None, predictions=None)
    assert (result.compared, result.passed) == (False, True)
    decision = gate.run(GateConfig(), out=tmp_path / "gate.json", **_inputs(tmp_path))
    assert decision.model == "simple_cnn" and decision.data_version == "abc123"


def test_candidate_scores_are_matched_by_uid_as_text_even_when_it_looks_like_a_number(tmp_path):
    (tmp_path / "p.csv").write_text("sop_instance_uid,probability\n0012,0.25\n7,0.75\n")
    scores = gate.read_candidate_scores(tmp_path / "p.csv", np.array(["7", "0012"]))
    assert scores.tolist() == [0.75, 0.25]


def test_a_train_result_without_data_version_is_recorded_as_unknown_and_the_file_is_stable(tmp_path):
    paths = _inputs(tmp_path)
    paths["train_result"].write_text("{}")
    decision = gate.run(GateConfig(), out=tmp_path / "gate.json", **paths)
    assert decision.data_version == "unknown" and decision.model is None
    # the decision file is reviewed in diffs: 2-space JSON, one trailing newline
    text = (tmp_path / "gate.json").read_text()
    assert text == decision.model_dump_json(indent=2) + "\n" and text.startswith('{\n  "passed": true')
