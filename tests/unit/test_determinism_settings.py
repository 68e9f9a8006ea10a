"""medops.learn.determinism: the environment it pins, and what it records when it cannot apply."""

from __future__ import annotations

import sys

import pytest

from medops.config import TrainConfig
from medops.learn import determinism
from medops.learn.determinism import DeterminismSettings, apply_determinism, apply_environment


def test_the_pinned_environment_overrides_what_the_machine_had():
    env = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX", "OMP_NUM_THREADS": "16", "HOME": "/root"}
    replaced = apply_environment(DeterminismSettings(threads=2), env)
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2" and env["OMP_NUM_THREADS"] == "2"
    assert env["TF_NUM_INTRAOP_THREADS"] == "2" and "TF_NUM_INTEROP_THREADS" not in env
    assert env["TF_ENABLE_ONEDNN_OPTS"] == "1" and env["HOME"] == "/root"
    assert replaced == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX", "OMP_NUM_THREADS": "16"}
    apply_environment(DeterminismSettings(onednn=False), env)
    assert env["TF_ENABLE_ONEDNN_OPTS"] == "0"


def test_off_changes_nothing_and_says_so():
    record = apply_determinism(False)
    assert record.enabled is False and record.complete is True and "false" in record.notes[0]


def test_after_tensorflow_started_nothing_is_changed_and_the_record_is_incomplete(monkeypatch):
    pytest.importorskip("tensorflow")
    monkeypatch.setattr(determinism, "_APPLIED", None)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert "tensorflow" in sys.modules
    with pytest.warns(UserWarning, match="already running"):
        record = apply_determinism(True)
    assert record.enabled and not record.complete and "medops stage train" in record.notes[0]
    import os

    assert "ONEDNN_MAX_CPU_ISA" not in os.environ  # nothing half-applied


def test_train_config_defaults_to_deterministic_two_threads():
    cfg = TrainConfig()
    assert cfg.deterministic is True and cfg.threads == 2
    with pytest.raises(ValueError, match="calibration: platt"):
        TrainConfig(threshold_strategy="balanced")


def test_training_in_a_process_that_did_not_pin_records_it(monkeypatch):
    from medops.stages.train import numerics_record

    monkeypatch.setattr(determinism, "_APPLIED", None)
    record = numerics_record(TrainConfig())
    assert record.enabled and not record.complete and "medops stage train" in record.notes[0]
    assert numerics_record(TrainConfig(deterministic=False)).enabled is False
