"""gate: one reason per check with value and threshold; the decision file is what deploy reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.metrics import roc_auc_score

from _ingested import build_ingested
from medops import results
from medops.stages import gate
from medops.stages import split as split_stage
from medops.config import GateConfig, SplitConfig
from medops.errors import GateRejectedError, MedopsError
from medops.hashing import sha256_file
from medops.serving.contract import INPUT_NAME, ONNX_FILENAME, OUTPUT_NAME
from medops.data import load_split_images

GOOD = {"auc": 0.912, "accuracy": 0.86, "sensitivity": 0.93, "specificity": 0.74, "n": 624}


@pytest.fixture()
def files(tmp_path):
    def write(metrics):
        (tmp_path / "metrics.json").write_text(json.dumps(metrics))
        (tmp_path / "train.json").write_text(json.dumps({"data_version": "abc123", "model": "simple_cnn"}))
        return {"metrics": tmp_path / "metrics.json", "train_result": tmp_path / "train.json", "out": tmp_path / "gate.json"}

    return write


def test_pass_writes_a_decision_with_every_reason(files):
    paths = files(GOOD)
    decision = gate.run(GateConfig(), **paths)
    assert decision.passed
    assert decision.reasons == [
        "auc 0.912 >= min_auc 0.900: pass",
        "accuracy 0.860 >= min_accuracy 0.750: pass",
        "sensitivity 0.930 >= min_sensitivity 0.700: pass",
        "specificity 0.740 >= min_specificity 0.500: pass",
        "no model repository given: nothing to compare: pass",
    ]
    assert decision.champion is not None and not decision.champion.compared
    assert decision.data_version == "abc123"
    assert results.read_decision(paths["out"]) == decision
    assert results.require_passed(paths["out"]).passed
    assert decision.failed_reasons == []


def test_one_failed_check_fails_the_gate_and_deploy_refuses(files):
    paths = files({**GOOD, "sensitivity": 0.61})
    decision = gate.run(GateConfig(), **paths)
    assert not decision.passed
    assert "sensitivity 0.610 < min_sensitivity 0.700: fail" in decision.reasons
    assert sum(r.endswith(": pass") for r in decision.reasons) == 4  # 3 metrics + nothing to compare
    assert decision.failed_reasons == ["sensitivity 0.610 < min_sensitivity 0.700: fail"]
    assert json.loads(paths["out"].read_text())["passed"] is False
    with pytest.raises(GateRejectedError, match="sensitivity 0.610 < min_sensitivity 0.700"):
        results.require_passed(paths["out"])


def test_threshold_is_inclusive_and_configurable(files):
    paths = files(GOOD)
    assert gate.run(GateConfig(min_auc=0.912), **paths).passed
    assert not gate.run(GateConfig(min_auc=0.95), **paths).passed


def test_missing_metric_fails_rather_than_passes(files):
    metrics = {k: v for k, v in GOOD.items() if k != "specificity"}
    decision = gate.run(GateConfig(), **files(metrics))
    assert not decision.passed
    assert decision.reasons[-2] == "specificity missing from metrics (need min_specificity 0.500): fail"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "0.95"])
def test_a_nan_or_non_numeric_metric_fails_and_the_decision_stays_readable(files, bad):
    paths = files({**GOOD, "auc": bad})
    decision = gate.run(GateConfig(), **paths)
    assert not decision.passed
    assert decision.reasons[0] == f"auc is not a finite number ({bad!r}) (need min_auc 0.900): fail"
    assert "auc" not in decision.metrics and decision.metrics["accuracy"] == GOOD["accuracy"]
    assert results.read_decision(paths["out"]) == decision  # no null written where a float belongs
    with pytest.raises(GateRejectedError, match="auc is not a finite number"):
        results.require_passed(paths["out"])


def test_missing_inputs_and_decisions_are_typed_errors(tmp_path):
    with pytest.raises(MedopsError, match="no metrics at"):
        gate.run(GateConfig(), metrics=tmp_path / "no.json", train_result=tmp_path / "no2.json", out=tmp_path / "g.json")
    (tmp_path / "m.json").write_text(json.dumps(GOOD))
    (tmp_path / "t.json").write_text("{truncated")
    with pytest.raises(MedopsError, match="cannot read train result at"):
        gate.run(GateConfig(), metrics=tmp_path / "m.json", train_result=tmp_path / "t.json", out=tmp_path / "g.json")
    with pytest.raises(GateRejectedError, match="no gate decision"):
        results.read_decision(tmp_path / "gate.json")
    (tmp_path / "gate.json").write_text('{"passed": "maybe"}')
    with pytest.raises(GateRejectedError, match="not valid"):
        results.read_decision(tmp_path / "gate.json")


# ---------------------------------------------------------------- champion / challenger

MODEL = "pneumonia_classifier"


def linear_onnx(weights: np.ndarray, bias: float, *, size: int = 28) -> bytes:
    """A real ONNX classifier on the serving contract: probability = sigmoid(w . pixels + b),
    input "image" (batch, size, size, 1), output "probability" (batch, 1)."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", [INPUT_NAME, "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logit0"]),
            helper.make_node("Add", ["logit0", "b"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], [OUTPUT_NAME]),
        ],
        "linear",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", size, size, 1])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(np.array([-1, size * size], dtype=np.int64), "flat_shape"),
            numpy_helper.from_array(weights.reshape(size * size, 1).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([bias], dtype=np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small ingested dataset, its split and a logistic-regression champion fitted on train."""
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("champion")
    ingested = build_ingested(root / "ingested", n_per_split={"train": 240, "val": 30, "test": 120})
    split_csv = root / "split.csv"
    split_stage.run(SplitConfig(), metadata=ingested / "metadata.parquet", out=split_csv)
    x, y, _ = load_split_images(ingested, split_csv, "train")
    fit = LogisticRegression(C=0.05, max_iter=2000).fit(x.reshape(len(x), -1), y.astype(int))
    test_x, test_y, test_rows = load_split_images(ingested, split_csv, "test")
    good = linear_onnx(fit.coef_[0], float(fit.intercept_[0]))
    good_scores = 1 / (1 + np.exp(-(test_x.reshape(len(test_x), -1) @ fit.coef_[0] + fit.intercept_[0])))
    assert roc_auc_score(test_y, good_scores) > 0.85  # a champion worth defending
    return {
        "root": root, "ingested": ingested, "split": split_csv, "good": good,
        "test_y": test_y.astype(int), "test_uids": test_rows["sop_instance_uid"].to_numpy(),
        "good_scores": good_scores,
    }


def serve(repository: Path, version: int, payload: bytes) -> Path:
    """Place ``payload`` as <repository>/<MODEL>/<version>/model.onnx (the embedded layout)."""
    path = repository / MODEL / str(version) / ONNX_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def degrade(scores: np.ndarray, labels: np.ndarray, target_auc: float) -> np.ndarray:
    """Scores whose AUC is about ``target_auc``: the good scores with rising noise added."""
    rng = np.random.default_rng(0)
    noise = rng.normal(size=len(scores))
    for scale in np.linspace(0, 20, 401):
        mixed = scores + scale * noise * scores.std()
        if roc_auc_score(labels, mixed) <= target_auc:
            return 1 / (1 + np.exp(-(mixed - mixed.mean()) / mixed.std()))
    raise AssertionError("could not degrade the scores")


def gate_with(tmp_path, data, candidate_scores, *, repository, cfg=None, metrics=None, uids=None):
    """Run the gate with metrics.json (GOOD unless given) and a predictions.csv of candidate_scores."""
    (tmp_path / "metrics.json").write_text(json.dumps(metrics or GOOD))
    (tmp_path / "train.json").write_text(json.dumps({"data_version": "abc123", "model": "simple_cnn"}))
    predictions = tmp_path / "predictions.csv"
    pd.DataFrame({
        "sop_instance_uid": data["test_uids"] if uids is None else uids,
        "patient_id": "P", "label": data["test_y"][: len(candidate_scores)],
        "probability": np.round(candidate_scores, 6), "predicted": 0,
    }).to_csv(predictions, index=False)
    return gate.run(
        cfg or GateConfig(), metrics=tmp_path / "metrics.json", train_result=tmp_path / "train.json",
        out=tmp_path / "gate.json", predictions=predictions, ingested_dir=data["ingested"], split=data["split"],
        repository=repository, model_name=MODEL,
    )


def test_a_champion_better_by_more_than_the_margin_fails_the_candidate(tmp_path, data):
    onnx_path = serve(tmp_path / "repo", 3, data["good"])
    weaker = degrade(data["good_scores"], data["test_y"], roc_auc_score(data["test_y"], data["good_scores"]) - 0.06)
    decision = gate_with(tmp_path, data, weaker, repository=tmp_path / "repo")

    champ = decision.champion
    assert champ.compared and not champ.passed
    assert champ.version == 3 and champ.sha256 == sha256_file(onnx_path) and champ.n == len(data["test_y"])
    # both AUCs are the real ones on the same rows: recomputed here independently
    assert champ.auc == pytest.approx(roc_auc_score(data["test_y"], data["good_scores"]), abs=1e-6)
    assert champ.candidate_auc == pytest.approx(roc_auc_score(data["test_y"], np.round(weaker, 6)), abs=1e-9)
    assert champ.difference == pytest.approx(champ.candidate_auc - champ.auc)
    assert champ.difference < -0.05
    reason = (f"champion v3 auc {champ.auc:.3f}, candidate auc {champ.candidate_auc:.3f}: "
              f"worse by {-champ.difference:.3f} > margin 0.010: fail")
    assert decision.reasons[-1] == reason
    assert not decision.passed  # every absolute threshold passed; the champion alone blocks it
    assert all(r.endswith(": pass") for r in decision.reasons[:-1])
    with pytest.raises(GateRejectedError, match="champion v3 auc .* worse by"):
        results.require_passed(tmp_path / "gate.json")
    # a wider margin lets the same candidate through
    assert gate_with(tmp_path, data, weaker, repository=tmp_path / "repo",
                     cfg=GateConfig(champion_margin=0.2)).passed


def test_a_candidate_within_the_margin_passes(tmp_path, data):
    serve(tmp_path / "repo", 1, data["good"])
    slightly = degrade(data["good_scores"], data["test_y"], roc_auc_score(data["test_y"], data["good_scores"]) - 0.004)
    decision = gate_with(tmp_path, data, slightly, repository=tmp_path / "repo")
    champ = decision.champion
    assert champ.compared and champ.passed and -0.01 < champ.difference < 0
    assert decision.reasons[-1] == (
        f"champion v1 auc {champ.auc:.3f}, candidate auc {champ.candidate_auc:.3f}: within margin 0.010: pass")
    assert decision.passed and results.require_passed(tmp_path / "gate.json").champion.version == 1
    # with margin 0 the same candidate is refused
    assert not gate_with(tmp_path, data, slightly, repository=tmp_path / "repo",
                         cfg=GateConfig(champion_margin=0.0)).passed


def test_the_champion_is_the_served_version_not_the_newest_folder(tmp_path, data):
    repo = tmp_path / "repo"
    serve(repo, 1, data["good"])
    serve(repo, 2, linear_onnx(np.zeros(28 * 28), 0.0))  # a constant model: AUC 0.5
    decision = gate_with(tmp_path, data, data["good_scores"], repository=repo)
    assert decision.champion.version == 2 and decision.champion.auc == pytest.approx(0.5)
    # rolled back: config.pbtxt pins version 1, so v1 is the champion
    (repo / MODEL / "config.pbtxt").write_text(
        f'name: "{MODEL}"\nversion_policy {{ specific {{ versions: 1 }} }}\n')
    decision = gate_with(tmp_path, data, data["good_scores"], repository=repo)
    assert decision.champion.version == 1 and decision.champion.difference == pytest.approx(0, abs=1e-5)
    assert decision.passed


def test_no_repository_or_no_served_model_passes_with_a_reason(tmp_path, data):
    decision = gate_with(tmp_path, data, data["good_scores"], repository=None)
    assert decision.passed and decision.reasons[-1] == "no model repository given: nothing to compare: pass"
    (tmp_path / "empty").mkdir()
    decision = gate_with(tmp_path, data, data["good_scores"], repository=tmp_path / "empty")
    assert decision.passed and not decision.champion.compared
    assert decision.reasons[-1].startswith("no model is serving") and decision.reasons[-1].endswith(
        "nothing to compare: pass")
    serve(tmp_path / "repo", 1, data["good"])
    off = gate_with(tmp_path, data, data["good_scores"] * 0.0 + 0.5, repository=tmp_path / "repo",
                    cfg=GateConfig(compare_with_serving=False))
    assert off.passed and off.reasons[-1] == "compare_with_serving is off: champion not compared: pass"


@pytest.mark.parametrize("broken", ["corrupted", "other_size"])
def test_a_champion_that_cannot_be_evaluated_does_not_block_but_thresholds_still_apply(tmp_path, data, broken):
    payload = b"not an onnx model" if broken == "corrupted" else linear_onnx(np.zeros(64 * 64), 0.0, size=64)
    serve(tmp_path / "repo", 4, payload)
    decision = gate_with(tmp_path, data, data["good_scores"], repository=tmp_path / "repo")
    assert decision.passed and not decision.champion.compared
    assert decision.reasons[-1].startswith("champion v4 could not be evaluated (")
    assert decision.reasons[-1].endswith("not compared, absolute thresholds only: pass")
    if broken == "other_size":
        assert "takes image of shape ['batch', 64, 64, 1], the test images are [" in decision.reasons[-1]
        assert ", 28, 28, 1]" in decision.reasons[-1]
    else:
        assert "does not load in onnxruntime" in decision.reasons[-1]
    # the same unusable champion does not rescue a candidate below the absolute thresholds
    bad = gate_with(tmp_path, data, data["good_scores"], repository=tmp_path / "repo",
                    metrics={**GOOD, "auc": 0.6})
    assert not bad.passed and "auc 0.600 < min_auc 0.900: fail" in bad.reasons


def test_candidate_predictions_must_cover_the_test_split(tmp_path, data):
    serve(tmp_path / "repo", 1, data["good"])
    with pytest.raises(MedopsError, match=r"no probability for 1 of \d+ test images"):
        gate_with(tmp_path, data, data["good_scores"][:-1], repository=tmp_path / "repo",
                  uids=data["test_uids"][:-1])
    (tmp_path / "metrics.json").write_text(json.dumps(GOOD))
    (tmp_path / "train.json").write_text("{}")
    with pytest.raises(MedopsError, match="not given the candidate's test predictions"):
        gate.run(GateConfig(), metrics=tmp_path / "metrics.json", train_result=tmp_path / "train.json",
                 out=tmp_path / "g.json", repository=tmp_path / "repo", model_name=MODEL)


def test_an_old_decision_without_champion_still_reads(tmp_path):
    old = {"passed": True, "reasons": ["auc 0.9 >= min_auc 0.85: pass"], "data_version": "x",
           "timestamp": "2026-11-21T00:00:00+00:00"}
    (tmp_path / "gate.json").write_text(json.dumps(old))
    assert results.require_passed(tmp_path / "gate.json").champion is None


def test_evidence_checks_refuse_a_miscalibrated_or_unstable_threshold(tmp_path):
    """gate.max_ece (test ECE) and gate.max_threshold_interval (train.json's val bootstrap
    interval of the threshold) each refuse with the value in the reason; null switches them off."""
    train = {"data_version": "v", "model": "resnet", "threshold_interval": [0.70, 0.78]}
    cfg = GateConfig(max_ece=0.03, max_threshold_interval=0.2)
    ok = gate.decide(cfg, {**GOOD, "ece": 0.021}, train)
    assert ok.passed and any("ece 0.021 <= max_ece 0.030: pass" in r for r in ok.reasons)
    assert any("width 0.080" in r and r.endswith("pass") for r in ok.reasons)
    assert ok.thresholds["max_ece"] == 0.03

    hot = gate.decide(cfg, {**GOOD, "ece": 0.045}, train)
    assert not hot.passed and hot.failed_reasons == ["ece 0.045 not <= max_ece 0.030: fail"]

    wobbly = gate.decide(cfg, {**GOOD, "ece": 0.02}, {**train, "threshold_interval": [0.055, 0.57]})
    assert not wobbly.passed and "width 0.515" in wobbly.failed_reasons[0]

    missing = gate.decide(cfg, GOOD, {"data_version": "v"})
    assert not missing.passed and len(missing.failed_reasons) == 2  # no evidence is not a pass

    off = gate.decide(GateConfig(), GOOD, {"data_version": "v"})
    assert off.passed and not any("max_ece" in r or "interval" in r for r in off.reasons)
