"""Data-quality gate on the ingested metadata table, with Great Expectations 1.x.

Inputs:
    ``ingested_dir/metadata.parquet``: one row per usable image (columns: medops.data.METADATA_COLUMNS).
    ``gx_root/gx/``: the Great Expectations project (file-backed; created when missing): the suite
    ``metadata_quality``, the validation definition and the checkpoint, as GX stores them.
Outputs:
    ``out_dir/result.json``: every expectation with its type, column, success, observed value and
    whether it is critical (the same content as the returned QualityResult).
    ``out_dir/expectations.json``: the expectations built from params (see build_expectations).
    The Data Docs site of the GX project (``out_dir/data_docs/index.html`` for a new project;
    the repository's ``gx/`` points it at ``reports/quality/data_docs``), one page per validation
    kept across runs, readable offline; the validation results in ``gx/uncommitted/validations``.
Params (``quality`` section, QualityConfig):
    ``min_rows``, ``max_label_null_fraction``, ``pixel_mean_range``, ``pixel_std_min``, ``allowed_sex``.

A failed *critical* expectation stops the pipeline with DataQualityError, after the report and the
Data Docs are written so the failure can be inspected; a failed *warning* is reported, not fatal.
Severity is GX's own (``Expectation.severity``), so GX users and the Data Docs see it too.

The GX project is an ordinary one a GX user can open (``gx.get_context(project_root_dir=...)``)
and edit. The expectations built from params.yaml are marked in their ``meta`` (MANAGED) and kept
in step with params on every run (rewritten only when params changed, so their ids stay);
expectations a user adds to the suite run too, with their own severity. Great Expectations is
imported inside the functions that use it (it takes seconds to import).
"""

from __future__ import annotations

import builtins
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pandas as pd
from pydantic import BaseModel

from medops.atomic import write_text
from medops.config import QualityConfig
from medops.data import METADATA_COLUMNS, read_metadata
from medops.errors import DataQualityError

ASSET_NAME = "metadata"  # how the table is named in messages and in the Data Docs
DATA_DOCS_DIR = "data_docs"
# the GX project's parts, by name (gx/great_expectations.yml, gx/expectations/, ...)
GX_DIR = "gx"
DATA_SOURCE = "medops"
BATCH = "whole_table"
SUITE = f"{ASSET_NAME}_quality"
VALIDATION = f"{ASSET_NAME}_validation"
CHECKPOINT = f"{ASSET_NAME}_checkpoint"
SITE = "local_site"
# ``meta`` key of the expectations medops builds from params.yaml (and rewrites when params change)
MANAGED = "managed_by"
MANAGED_NOTE = "medops: built from params.yaml `quality` (edit params.yaml, not this expectation)"
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


def _to_gx(spec: ExpectationSpec, id_: str | None = None):
    import great_expectations as gx

    cls_name = "".join(part.capitalize() for part in spec.type.split("_"))
    cls = getattr(gx.expectations, cls_name)
    return cls(**spec.kwargs, severity=spec.severity, id=id_,
               meta={MANAGED: MANAGED_NOTE, "expected": spec.expected})


def _key(type_: str, kwargs: dict[str, Any]) -> tuple[str, Any]:
    """How a managed expectation is recognised across runs: its type and column (unique per suite)."""
    return type_, kwargs.get("column")


PARTIAL = ".medops-partial"  # a GX file being written (no store's suffix: GX never lists it)


@contextmanager
def _whole_file(target: Path, mode: str, encoding: str | None = None) -> Iterator[IO[Any]]:
    """A hidden temporary beside ``target``, fsynced and renamed over it when the block ends
    without an error (removed otherwise)."""
    from medops.atomic import _FILE_MODE, crash_point

    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL, dir=target.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding or "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        crash_point("quality.gx_save")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _gx_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    """``open`` for the GX modules that write project files: a write goes through _whole_file."""
    if mode in ("w", "wb") and not args and set(kwargs) <= {"encoding"}:
        return _whole_file(Path(file), mode, kwargs.get("encoding"))
    return builtins.open(file, mode, *args, **kwargs)


def whole_file_writes() -> None:
    """Make Great Expectations write each project file whole or not at all.

    GX (1.x) writes its stores' files (the suite, checkpoint, validation definition, validation
    results, Data Docs pages) and great_expectations.yml in place, ``open(path, "w")``: a process
    killed in the middle leaves a cut file, and every later run fails to load the project. The two
    modules that write them get an ``open`` of their own (a module global, ahead of the builtin)
    that writes a hidden temporary and renames it over the file; reading is unchanged."""
    from great_expectations.data_context.data_context import file_data_context
    from great_expectations.data_context.store import tuple_store_backend

    for module in (tuple_store_backend, file_data_context):
        module.open = _gx_open


def _remove_partials(*folders: Path) -> None:
    """What a killed write left (hidden, never read): removed."""
    for folder in folders:
        if Path(folder).is_dir():
            for path in Path(folder).rglob(f".*{PARTIAL}"):
                path.unlink(missing_ok=True)


def open_project(gx_root: Path, docs_dir: Path):
    """The file-backed GX project ``gx_root/gx``. A missing one is created: GX's own layout, no
    analytics or progress bars, its Data Docs site at ``docs_dir`` (relative, so it moves with
    the project). An existing one is used as it is configured. Every file GX writes is written
    whole (``whole_file_writes``)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    whole_file_writes()
    new = not (Path(gx_root) / GX_DIR / "great_expectations.yml").is_file()
    context = gx.get_context(mode="file", project_root_dir=str(gx_root))
    if new:
        relative = os.path.relpath(Path(docs_dir).resolve(), Path(context.root_directory).resolve())
        context.variables.data_docs_sites = {SITE: {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": Path(relative).as_posix() + "/"},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }}
        context.variables.analytics_enabled = False  # no network calls from a pipeline stage
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        context.variables.save()
    # what a killed write left, in the project and in its Data Docs site wherever that is
    _remove_partials(Path(gx_root) / GX_DIR, site_dir(context))
    return context


def site_dir(context) -> Path:
    """The folder of the project's Data Docs site (SITE, else its first one)."""
    sites = context.variables.data_docs_sites or {}
    config = sites.get(SITE) or next(iter(sites.values()))
    return Path(context.root_directory, config["store_backend"]["base_directory"]).resolve()


def _get_or_add(get: Any, name: str, make: Any) -> Any:
    """``get(name)``, or ``make()`` when GX says there is none (each store has its own error)."""
    from great_expectations.exceptions import DataContextError

    try:
        return get(name)
    except (LookupError, ValueError, DataContextError):
        return make()


def ensure_checkpoint(context):
    """The project's checkpoint over the metadata table, its parts created where missing
    (pandas data source, dataframe asset, suite, validation definition, checkpoint)."""
    import great_expectations as gx

    source = _get_or_add(context.data_sources.get, DATA_SOURCE,
                         lambda: context.data_sources.add_pandas(DATA_SOURCE))
    asset = _get_or_add(source.get_asset, ASSET_NAME, lambda: source.add_dataframe_asset(ASSET_NAME))
    batch = _get_or_add(asset.get_batch_definition, BATCH,
                        lambda: asset.add_batch_definition_whole_dataframe(BATCH))
    suite = _get_or_add(context.suites.get, SUITE,
                        lambda: context.suites.add(gx.ExpectationSuite(name=SUITE)))
    definition = _get_or_add(context.validation_definitions.get, VALIDATION, lambda: (
        context.validation_definitions.add(gx.ValidationDefinition(name=VALIDATION, data=batch, suite=suite))))
    return _get_or_add(context.checkpoints.get, CHECKPOINT, lambda: context.checkpoints.add(gx.Checkpoint(
        name=CHECKPOINT, validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
        result_format={"result_format": "SUMMARY"},
    )))


def sync_suite(suite, specs: list[ExpectationSpec]) -> bool:
    """Make the suite's managed expectations those of ``specs`` (in their order, keeping the ids of
    unchanged ones); a user's own expectations stay, after them. Saves only on a change; returns
    whether it saved."""
    current = list(suite.expectations)
    managed = {_key(e.expectation_type, e.configuration.kwargs): e for e in current
               if (e.meta or {}).get(MANAGED)}
    wanted = []
    for spec in specs:
        old = managed.get(_key(spec.type, spec.kwargs))
        wanted.append(_to_gx(spec, old.id if old is not None else None))
    wanted += [e for e in current if not (e.meta or {}).get(MANAGED)]

    def config(e: Any) -> dict[str, Any]:
        return e.configuration.to_json_dict()
    if [config(e) for e in wanted] == [config(e) for e in current]:
        return False
    suite.expectations = wanted
    suite.save()
    return True


def spec_of(expectation) -> ExpectationSpec:
    """An expectation from the suite as an ExpectationSpec (for one a GX user added: ``expected``
    is its ``meta.expected`` or description, else its kwargs; severity ``info`` counts as a warning)."""
    cfg = expectation.configuration
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    severity = CRITICAL if str(getattr(expectation.severity, "value", expectation.severity)) == CRITICAL else WARNING
    expected = ((cfg.meta or {}).get("expected") or expectation.description
                or ", ".join(f"{k}={_describe(v)}" for k, v in kwargs.items() if k != "column"))
    return ExpectationSpec(type=cfg.type, kwargs=kwargs, severity=severity, expected=expected)


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


def validate_metadata(table: pd.DataFrame, cfg: QualityConfig, *, gx_root: Path,
                      docs_dir: Path) -> tuple[list[ExpectationOutcome], Path]:
    """Run the project's checkpoint on ``table``, after bringing the suite in step with ``cfg``.

    The checkpoint stores the validation result and adds its page to the Data Docs, which are then
    made to work offline. Returns one outcome per expectation, in suite order, and the Data Docs
    site's folder.
    """
    from medops.datadocs import make_offline

    context = open_project(gx_root, docs_dir)
    checkpoint = ensure_checkpoint(context)
    (definition,) = checkpoint.validation_definitions
    sync_suite(definition.suite, build_expectations(cfg))
    suite = context.suites.get(definition.suite.name)  # as saved, with every id
    run = checkpoint.run(batch_parameters={"dataframe": table})
    (validation,) = run.run_results.values()
    site = site_dir(context)
    make_offline(site)

    # GX groups results by column, not in suite order; match them back by expectation id.
    by_id = {res.expectation_config.id: res for res in validation.results}
    outcomes = []
    for expectation in suite.expectations:
        res = by_id[expectation.id]
        info = res.exception_info or {}
        exception = info.get("exception_message") if info.get("raised_exception") else None
        outcomes.append(summarize_outcome(spec_of(expectation), bool(res.success), dict(res.result or {}),
                                          exception))
    return outcomes, site


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


def run(cfg: QualityConfig, *, ingested_dir: Path, out_dir: Path, gx_root: Path | None = None) -> QualityResult:
    """Validate ``ingested_dir/metadata.parquet`` with the GX project in ``gx_root/gx`` (default:
    ``out_dir/gx``); write result.json under ``out_dir`` and a page in the project's Data Docs.

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
    outcomes, site = validate_metadata(table, cfg, gx_root=Path(gx_root) if gx_root else out_dir,
                                       docs_dir=out_dir / DATA_DOCS_DIR)

    failed = [o for o in outcomes if not o.success]
    result = QualityResult(
        success=not any(o.critical for o in failed),
        n_rows=len(table),
        n_expectations=len(outcomes),
        n_passed=len(outcomes) - len(failed),
        critical_failures=[describe_failure(o) for o in failed if o.critical],
        warnings=[describe_failure(o) for o in failed if not o.critical],
        expectations=outcomes,
        data_docs=str(site / "index.html"),
        result=str(out_dir / RESULT_FILE),
    )
    write_text(out_dir / "expectations.json",
        json.dumps([s.model_dump() for s in build_expectations(cfg)], indent=2) + "\n"
    )
    write_text(out_dir / RESULT_FILE, result.model_dump_json(indent=2) + "\n")
    if not result.success:
        raise failure_error(result)
    return result
