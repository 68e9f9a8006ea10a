"""The quality stage's pure parts: the suite built from params, and how outcomes are worded."""

from __future__ import annotations

import subprocess
import sys

from medops.stages import quality
from medops.config import QualityConfig
from medops.data import METADATA_COLUMNS


def _by_column(specs, type_):
    return {s.kwargs.get("column"): s for s in specs if s.type == type_}


def test_suite_follows_params() -> None:
    cfg = QualityConfig(min_rows=7, max_label_null_fraction=0.25, pixel_mean_range=(0.2, 0.6),
                        pixel_std_min=0.05, allowed_sex=["M", "F"])
    specs = quality.build_expectations(cfg)

    (rows,) = [s for s in specs if s.type == "expect_table_row_count_to_be_between"]
    assert rows.kwargs == {"min_value": 7} and rows.severity == "critical"
    (cols,) = [s for s in specs if s.type == "expect_table_columns_to_match_set"]
    assert cols.kwargs["column_set"] == list(METADATA_COLUMNS) and cols.kwargs["exact_match"] is False
    not_null = _by_column(specs, "expect_column_values_to_not_be_null")
    assert set(not_null) == {"sop_instance_uid", "patient_id", "label"}
    assert not_null["label"].kwargs["mostly"] == 0.75
    assert "mostly" not in not_null["patient_id"].kwargs
    in_set = _by_column(specs, "expect_column_values_to_be_in_set")
    assert in_set["label"].kwargs["value_set"] == [0, 1] and in_set["label"].severity == "critical"
    assert in_set["patient_sex"].kwargs["value_set"] == ["M", "F"]
    assert in_set["patient_sex"].severity == "warning"
    means = _by_column(specs, "expect_column_mean_to_be_between")
    assert means["pixel_mean"].kwargs == {"column": "pixel_mean", "min_value": 0.2, "max_value": 0.6}
    assert means["pixel_std"].kwargs == {"column": "pixel_std", "min_value": 0.05}
    assert {s.severity for s in means.values()} == {"critical"}
    between = [s for s in specs if s.type == "expect_column_values_to_be_between"]
    bounds = {(s.kwargs["column"], s.kwargs.get("min_value"), s.kwargs.get("max_value"), s.severity)
              for s in between}
    assert bounds == {
        ("pixel_min", 0.0, None, "critical"), ("pixel_max", None, 1.0, "critical"),
        ("rows", 1, None, "critical"), ("columns", 1, None, "critical"),
        ("pixel_mean", 0.2, 0.6, "warning"), ("pixel_std", 0.05, None, "warning"),
    }
    assert _by_column(specs, "expect_column_values_to_be_unique").keys() == {"sop_instance_uid"}


def test_every_spec_maps_to_a_gx_expectation_with_native_severity() -> None:
    specs = quality.build_expectations(QualityConfig())
    assert {s.severity for s in specs} == {"critical", "warning"}  # both kinds are exercised
    for spec in specs:
        expectation = quality._to_gx(spec)
        assert expectation.expectation_type == spec.type
        assert getattr(expectation.severity, "value", expectation.severity) == spec.severity
        assert "critical" not in (expectation.meta or {})  # GX's own field, not a meta flag


def test_column_map_failure_is_worded_with_counts() -> None:
    spec = quality.ExpectationSpec(type="expect_column_values_to_not_be_null",
                                   kwargs={"column": "patient_id"}, severity="critical",
                                   expected="no nulls")
    outcome = quality.summarize_outcome(
        spec, False, {"element_count": 5000, "unexpected_count": 12, "unexpected_percent": 0.24}, None)
    assert outcome.unexpected_count == 12 and outcome.element_count == 5000
    assert quality.describe_failure(outcome) == (
        "expect_column_values_to_not_be_null failed on metadata.patient_id: "
        "12 of 5,000 rows, expected no nulls (critical)")


def test_aggregate_failure_and_unevaluated_expectation() -> None:
    spec = quality.ExpectationSpec(type="expect_column_mean_to_be_between",
                                   kwargs={"column": "pixel_mean", "min_value": 0.05, "max_value": 0.95},
                                   severity="warning", expected="in [0.05, 0.95]")
    outcome = quality.summarize_outcome(spec, False, {"observed_value": 0.971234}, None)
    assert quality.describe_failure(outcome) == (
        "expect_column_mean_to_be_between failed on metadata.pixel_mean: 0.9712, "
        "expected in [0.05, 0.95] (warning)")
    broken = quality.summarize_outcome(spec, False, {}, 'Column "pixel_mean" not found')
    assert broken.error and broken.observed.startswith("not evaluated: ")


def test_quality_module_imports_without_great_expectations_or_tensorflow() -> None:
    code = ("import sys, medops.stages.quality; "
            "print('great_expectations' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
