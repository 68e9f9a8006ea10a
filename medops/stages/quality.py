"""Data-quality gate on the ingested metadata table, with Great Expectations 1.x.

Inputs:
    ``ingested_dir/metadata.parquet``: one row per usable image (columns: medops.data.METADATA_COLUMNS).
Outputs:
    ``out_dir/data_docs/index.html``: the Great Expectations Data Docs site for this validation.
    ``out_dir/result.json``: every expectation with its type, column, success, observed value and
    whether it is critical (the same content as the returned QualityResult).
    ``out_dir/expectations.json``: the expectation suite that was run.
Params (``quality`` section, QualityConfig):
    ``min_rows``, ``max_label_null_fraction``, ``pixel_mean_range``, ``pixel_std_min``, ``allowed_sex``.

A failed *critical* expectation stops the pipeline with DataQualityError, after the report and the
Data Docs are written so the failure can be inspected; a failed *warning* is reported, not fatal.

The Great Expectations context is ephemeral (in-memory stores) with one Data Docs site on disk: the
suite is built from params on every run, so there is no GX project state to drift from params.yaml,
and the docs show exactly this run. Great Expectations is imported inside the functions that use it
(it takes seconds to import).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel

from medops.config import QualityConfig
from medops.data import METADATA_COLUMNS, read_metadata
from medops.errors import DataQualityError

ASSET_NAME = "metadata"  # how the table is named in messages and in the Data Docs
DATA_DOCS_DIR = "data_docs"
CRITICAL = "critical"
WARNING = "warning"


class ExpectationSpec(BaseModel):
    """One expectation before it is handed to Great Expectations."""

    type: str                  # snake_case GX expectation type, e.g. expect_column_values_to_be_unique
    kwargs: dict[str, Any]
    severity: str              # CRITICAL or WARNING
    expected: str              # what was expected, in words, for messages


class ExpectationOutcome(BaseModel):
    type: str
    column: str | None
    success: bool
    critical: bool
    expected: str
    observed: str                      # the observed figure, in words ("12 of 5,000 rows", "0.97")
    observed_value: Any = None         # aggregate expectations: GX's observed_value
    unexpected_count: int | None = None  # column-map expectations: rows that failed
    element_count: int | None = None
    error: str | None = None           # GX could not evaluate it (e.g. the column is missing)


class QualityResult(BaseModel):
    success: bool                      # no critical expectation failed
    n_rows: int
    n_expectations: int
    n_passed: int
    critical_failures: list[str]
    warnings: list[str]
    expectations: list[ExpectationOutcome]
    data_docs: str                     # path of the Data Docs index.html
    result: str                        # path of result.json


def build_expectations(cfg: QualityConfig) -> list[ExpectationSpec]:
    """The metadata table's expectations, from the ``quality`` params.

    Critical: anything that makes the table unusable or the labels wrong (row count, schema,
    identity, labels, pixel range, image size, the table-wide mean brightness and contrast). Warnings: per-image
    oddities that training survives but a person should look at (unusual PatientSex codes, images
    darker/brighter or flatter than usual).
    """
    lo, hi = cfg.pixel_mean_range

    def spec(type_: str, severity: str, expected: str, **kwargs: Any) -> ExpectationSpec:
        return ExpectationSpec(type=type_, kwargs=kwargs, severity=severity, expected=expected)

    return [
        spec("expect_table_row_count_to_be_between", CRITICAL, f">= {cfg.min_rows:,} rows",
             min_value=cfg.min_rows),
        spec("expect_table_columns_to_match_set", CRITICAL, "all of " + ", ".join(METADATA_COLUMNS),
             column_set=list(METADATA_COLUMNS), exact_match=False),
        spec("expect_column_values_to_not_be_null", CRITICAL, "no nulls", column="sop_instance_uid"),
        spec("expect_column_values_to_be_unique", CRITICAL, "unique values", column="sop_instance_uid"),
        spec("expect_column_values_to_not_be_null", CRITICAL, "no nulls", column="patient_id"),
        spec("expect_column_values_to_not_be_null", CRITICAL,
             f"null fraction <= {cfg.max_label_null_fraction:g}",
             column="label", mostly=1.0 - cfg.max_label_null_fraction),
        spec("expect_column_values_to_be_in_set", CRITICAL, "values in {0, 1}",
             column="label", value_set=[0, 1]),
        spec("expect_column_values_to_be_between", CRITICAL, ">= 0", column="pixel_min", min_value=0.0),
        spec("expect_column_values_to_be_between", CRITICAL, "<= 1", column="pixel_max", max_value=1.0),
        spec("expect_column_values_to_be_between", CRITICAL, ">= 1", column="rows", min_value=1),
        spec("expect_column_values_to_be_between", CRITICAL, ">= 1", column="columns", min_value=1),
        # A table-wide mean outside the range means the preprocessing (window, photometric
        # interpretation) is wrong for the whole export, not that a few images are odd.
        spec("expect_column_mean_to_be_between", CRITICAL, f"in [{lo:g}, {hi:g}]",
             column="pixel_mean", min_value=lo, max_value=hi),
        # likewise: if the images are flat on average, the pixel pipeline is broken, not one image
        spec("expect_column_mean_to_be_between", CRITICAL, f">= {cfg.pixel_std_min:g}",
             column="pixel_std", min_value=cfg.pixel_std_min),
        spec("expect_column_values_to_be_between", WARNING, f"in [{lo:g}, {hi:g}]",
             column="pixel_mean", min_value=lo, max_value=hi),
        spec("expect_column_values_to_be_between", WARNING, f">= {cfg.pixel_std_min:g}",
             column="pixel_std", min_value=cfg.pixel_std_min),
        # nulls are allowed: GX column-map expectations skip missing values
        spec("expect_column_values_to_be_in_set", WARNING,
             "values in {" + ", ".join(cfg.allowed_sex) + "} or null",
             column="patient_sex", value_set=list(cfg.allowed_sex)),
    ]


def _to_gx(spec: ExpectationSpec):
    import great_expectations as gx

    cls_name = "".join(part.capitalize() for part in spec.type.split("_"))
    cls = getattr(gx.expectations, cls_name)
    return cls(**spec.kwargs, meta={"severity": spec.severity, CRITICAL: spec.severity == CRITICAL,
                                    "expected": spec.expected})


def _make_context(docs_dir: Path):
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,  # no network calls from a pipeline stage
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            "medops": {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _jsonable(value: Any) -> Any:
    """GX results hold numpy scalars and NaN; make them plain JSON values."""
    try:
        return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    except (TypeError, ValueError):
        return str(value)


def _describe(value: Any) -> str:
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def summarize_outcome(spec: ExpectationSpec, success: bool, result: dict[str, Any],
                      exception: str | None) -> ExpectationOutcome:
    """Turn one GX validation result into an ExpectationOutcome with the observed figure in words."""
    column = spec.kwargs.get("column")
    observed_value = unexpected = elements = None
    if exception:
        observed = f"not evaluated: {exception}"
    elif "unexpected_count" in result:
        unexpected = int(result["unexpected_count"])
        elements = int(result.get("element_count", 0))
        observed = f"{unexpected:,} of {elements:,} rows"
    else:
        observed_value = _jsonable(result.get("observed_value"))
        if spec.type == "expect_table_columns_to_match_set" and isinstance(observed_value, list):
            missing = sorted(set(spec.kwargs["column_set"]) - set(observed_value))
            observed = "missing " + ", ".join(missing) if missing else "all present"
        else:
            observed = _describe(observed_value)
    return ExpectationOutcome(
        type=spec.type, column=column, success=success, critical=spec.severity == CRITICAL,
        expected=spec.expected, observed=observed, observed_value=observed_value,
        unexpected_count=unexpected, element_count=elements, error=exception,
    )


def describe_failure(outcome: ExpectationOutcome) -> str:
    """``expect_... failed on metadata.<column>: <observed>, expected <...> (critical|warning)``."""
    target = f"{ASSET_NAME}.{outcome.column}" if outcome.column else ASSET_NAME
    severity = CRITICAL if outcome.critical else WARNING
    return f"{outcome.type} failed on {target}: {outcome.observed}, expected {outcome.expected} ({severity})"


def validate_metadata(table: pd.DataFrame, cfg: QualityConfig, docs_dir: Path) -> list[ExpectationOutcome]:
    """Run the expectation suite on ``table`` as a GX Checkpoint that writes Data Docs to ``docs_dir``.

    Returns one outcome per expectation, in suite order.
    """
    import great_expectations as gx

    specs = build_expectations(cfg)
    context = _make_context(docs_dir)
    batch = (
        context.data_sources.add_pandas("medops")
        .add_dataframe_asset(ASSET_NAME)
        .add_batch_definition_whole_dataframe("whole_table")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"{ASSET_NAME}_quality"))
    ids = [suite.add_expectation(_to_gx(spec)).id for spec in specs]
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{ASSET_NAME}_validation", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"{ASSET_NAME}_checkpoint",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
            result_format={"result_format": "SUMMARY"},
        )
    )
    run = checkpoint.run(batch_parameters={"dataframe": table})
    (validation,) = run.run_results.values()

    # GX groups results by column, not in suite order; match them back by expectation id.
    by_id = {res.expectation_config.id: res for res in validation.results}
    outcomes = []
    for spec, id_ in zip(specs, ids):
        res = by_id[id_]
        info = res.exception_info or {}
        exception = info.get("exception_message") if info.get("raised_exception") else None
        outcomes.append(summarize_outcome(spec, bool(res.success), dict(res.result or {}), exception))
    return outcomes


RESULT_FILE = "result.json"


def failed_result(out_dir: Path) -> QualityResult | None:
    """The report a failed quality run left in ``out_dir`` (written before it raises), or None
    when the run passed or failed before validating (nothing readable there)."""
    try:
        result = QualityResult.model_validate_json((Path(out_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None
    return None if result.success else result


def failure_error(result: QualityResult) -> DataQualityError:
    """The error that stops the pipeline: which critical expectations failed, on what."""
    return DataQualityError("; ".join(result.critical_failures))


def run(cfg: QualityConfig, *, ingested_dir: Path, out_dir: Path) -> QualityResult:
    """Validate ``ingested_dir/metadata.parquet``; write Data Docs and result.json under ``out_dir``.

    Raises:
        DataQualityError: the table is missing, or a critical expectation failed (the message names
            each failed check, the column and the observed figure).
    """
    ingested_dir, out_dir = Path(ingested_dir), Path(out_dir)
    table_path = ingested_dir / "metadata.parquet"
    if not table_path.is_file():
        raise DataQualityError(f"no metadata table at {table_path}: run the ingest stage first")
    table = read_metadata(ingested_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = out_dir / DATA_DOCS_DIR
    shutil.rmtree(docs_dir, ignore_errors=True)  # the docs show this run only
    outcomes = validate_metadata(table, cfg, docs_dir)

    failed = [o for o in outcomes if not o.success]
    result = QualityResult(
        success=not any(o.critical for o in failed),
        n_rows=len(table),
        n_expectations=len(outcomes),
        n_passed=len(outcomes) - len(failed),
        critical_failures=[describe_failure(o) for o in failed if o.critical],
        warnings=[describe_failure(o) for o in failed if not o.critical],
        expectations=outcomes,
        data_docs=str(docs_dir / "index.html"),
        result=str(out_dir / RESULT_FILE),
    )
    (out_dir / "expectations.json").write_text(
        json.dumps([s.model_dump() for s in build_expectations(cfg)], indent=2) + "\n"
    )
    (out_dir / RESULT_FILE).write_text(result.model_dump_json(indent=2) + "\n")
    if not result.success:
        raise failure_error(result)
    return result
