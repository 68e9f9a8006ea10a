"""The gate's INT8 rule (judge_int8) on records as the quantize stage writes them: the limits, both
sides of each, and that it never fails the gate itself. (The quantize stage on real data:
tests/unit/test_quantize.py.)"""

from __future__ import annotations

import pytest

from medops.config import GateConfig
from medops.stages.gate import judge_int8

GOOD = {"auc": 0.95, "accuracy": 0.9, "sensitivity": 0.9, "specificity": 0.8}


def record(**change):
    base = {"enabled": True, "sha256": "b" * 64, "source_sha256": "a" * 64, "golden_atol": 1e-3,
            "delta_auc": -0.002, "delta_accuracy": 0.0032, "int8": GOOD,
            "ood": {"guarded": True, "agreement": 0.995, "consistent": True},
            "speed": {"median_speedup": 1.3}}
    return base | change


def test_within_every_limit_int8_is_served_with_its_file_named():
    decision = judge_int8(GateConfig(), record())
    assert decision.serve and decision.summary == "int8 served"
    assert decision.sha256 == "b" * 64 and decision.source_sha256 == "a" * 64
    assert "|delta accuracy (points)| 0.32 <= 0.5: pass" in decision.reasons


@pytest.mark.parametrize("change, reason", [
    ({"delta_auc": 0.0051}, "|delta auc| 0.0051 > 0.005"),
    ({"delta_auc": -0.0051}, "|delta auc| 0.0051 > 0.005"),
    ({"delta_accuracy": -0.0064}, "|delta accuracy (points)| 0.64 > 0.5"),
    ({"speed": {"median_speedup": 1.05}}, "median speedup 1.05 < int8_min_speedup 1.1"),
    ({"speed": {}}, "median speedup None < int8_min_speedup 1.1"),
    ({"int8": GOOD | {"auc": 0.89}}, "int8 auc 0.890 < min_auc 0.900"),
    ({"ood": {"guarded": True, "agreement": 0.98, "consistent": True}},
     "ood in_distribution agreement with fp32 0.98 < 0.99"),
    ({"ood": {"guarded": True, "agreement": 1.0, "consistent": False}},
     "(in_distribution is not ood_score <= 1)"),
])
def test_each_limit_refuses_int8_and_says_which(change, reason):
    decision = judge_int8(GateConfig(), record(**change))
    assert not decision.serve and reason in decision.summary and decision.summary.endswith("fp32 served")


def test_the_limits_themselves_pass_and_an_unguarded_model_needs_no_agreement():
    assert judge_int8(GateConfig(), record(delta_auc=0.005, delta_accuracy=-0.005,
                                           speed={"median_speedup": 1.1})).serve
    assert judge_int8(GateConfig(), record(ood={"guarded": False})).serve


@pytest.mark.parametrize("rec, why", [(None, "no quantize record"),
                                      ({"enabled": False}, "quantize.enabled is false")])
def test_without_an_int8_model_fp32_is_served(rec, why):
    decision = judge_int8(GateConfig(), rec)
    assert not decision.serve and decision.summary == f"int8 not served ({why}): fp32 served"
