"""gate: one reason per check with value and threshold; the decision file is what deploy reads."""

from __future__ import annotations

import json

import pytest

from medops import gate
from medops.config import GateConfig
from medops.errors import GateRejectedError, MedopsError

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
        "auc 0.912 >= min_auc 0.850: pass",
        "accuracy 0.860 >= min_accuracy 0.750: pass",
        "sensitivity 0.930 >= min_sensitivity 0.700: pass",
        "specificity 0.740 >= min_specificity 0.500: pass",
    ]
    assert decision.data_version == "abc123"
    assert gate.read_decision(paths["out"]) == decision
    assert gate.require_passed(paths["out"]).passed


def test_one_failed_check_fails_the_gate_and_deploy_refuses(files):
    paths = files({**GOOD, "sensitivity": 0.61})
    decision = gate.run(GateConfig(), **paths)
    assert not decision.passed
    assert "sensitivity 0.610 < min_sensitivity 0.700: fail" in decision.reasons
    assert sum(r.endswith(": pass") for r in decision.reasons) == 3
    assert json.loads(paths["out"].read_text())["passed"] is False
    with pytest.raises(GateRejectedError, match="sensitivity 0.610 < min_sensitivity 0.700"):
        gate.require_passed(paths["out"])


def test_threshold_is_inclusive_and_configurable(files):
    paths = files(GOOD)
    assert gate.run(GateConfig(min_auc=0.912), **paths).passed
    assert not gate.run(GateConfig(min_auc=0.95), **paths).passed


def test_missing_metric_fails_rather_than_passes(files):
    metrics = {k: v for k, v in GOOD.items() if k != "specificity"}
    decision = gate.run(GateConfig(), **files(metrics))
    assert not decision.passed
    assert decision.reasons[-1] == "specificity missing from metrics (need min_specificity 0.500): fail"


def test_missing_inputs_and_decisions_are_typed_errors(tmp_path):
    with pytest.raises(MedopsError, match="metrics"):
        gate.run(GateConfig(), metrics=tmp_path / "no.json", train_result=tmp_path / "no2.json", out=tmp_path / "g.json")
    with pytest.raises(GateRejectedError, match="no gate decision"):
        gate.read_decision(tmp_path / "gate.json")
    (tmp_path / "gate.json").write_text('{"passed": "maybe"}')
    with pytest.raises(GateRejectedError, match="not valid"):
        gate.read_decision(tmp_path / "gate.json")
