"""The quality stage on metadata tables built from the bundled PneumoniaMNIST images, through a real
Great Expectations checkpoint (Data Docs written to disk)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medops.stages import quality
from medops.config import QualityConfig
from medops.data import METADATA_COLUMNS, shard_path
from medops.errors import DataQualityError
from medops.paths import BUNDLED_DATASET

N_IMAGES = 120


def build_ingested(folder: Path, n: int = N_IMAGES) -> pd.DataFrame:
    """An ingest output folder (shard + metadata.parquet) from the first ``n`` bundled train images.

    The pixel statistics are computed from the real images, as ingest computes them.
    """
    with np.load(BUNDLED_DATASET) as data:
        images = data["train_images"][:n].astype(np.float32) / 255.0
        labels = data["train_labels"][:n, 0]
    folder.mkdir(parents=True, exist_ok=True)
    path = shard_path(folder, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, images)
    table = pd.DataFrame(
        {
            "sop_instance_uid": [f"2.25.{1000 + i}" for i in range(n)],
            "study_instance_uid": [f"2.25.{5000 + i}" for i in range(n)],
            "series_instance_uid": [f"2.25.{9000 + i}" for i in range(n)],
            "patient_id": [f"PSEUDO-{i // 3:04d}" for i in range(n)],
            "patient_sex": [("M", "F", None)[i % 3] for i in range(n)],
            "patient_age": pd.array([i % 12 for i in range(n)], dtype="Int64"),
            "modality": "CR",
            "rows": 28,
            "columns": 28,
            "label": pd.array(labels, dtype="Int64"),
            "manifest_split": "train",
            "pixel_mean": images.mean(axis=(1, 2)).astype(float),
            "pixel_std": images.std(axis=(1, 2)).astype(float),
            "pixel_min": images.min(axis=(1, 2)).astype(float),
            "pixel_max": images.max(axis=(1, 2)).astype(float),
            "content_sha256": [f"{i:064x}" for i in range(n)],
            "deid_path": [f"dicom/{i:05d}.dcm" for i in range(n)],
            "shard": 0,
            "shard_index": np.arange(n),
        }
    )
    assert tuple(table.columns) == METADATA_COLUMNS
    table.to_parquet(folder / "metadata.parquet", index=False)
    return table


def test_good_table_passes_and_writes_data_docs(tmp_path: Path) -> None:
    build_ingested(tmp_path / "ingested")
    out = tmp_path / "quality"

    result = quality.run(QualityConfig(), ingested_dir=tmp_path / "ingested", out_dir=out)

    assert result.success and result.critical_failures == []
    assert quality.failed_result(out) is None  # a passed run leaves nothing for the flow to raise
    assert result.n_rows == N_IMAGES
    assert result.n_passed == result.n_expectations == len(quality.build_expectations(QualityConfig()))
    index = out / "data_docs" / "index.html"
    assert index.is_file() and Path(result.data_docs) == index
    # the validation page itself was rendered, not just an empty index
    pages = list((out / "data_docs" / "validations").rglob("*.html"))
    assert pages, "UpdateDataDocsAction wrote no validation page"
    page = pages[0].read_text()
    assert "sop_instance_uid" in page and "must never be null" in page
    report = json.loads((out / "result.json").read_text())
    assert report["success"] is True
    by_type_col = {(e["type"], e["column"]): e for e in report["expectations"]}
    rows = by_type_col[("expect_table_row_count_to_be_between", None)]
    assert rows["observed_value"] == N_IMAGES and rows["critical"] is True
    sex = by_type_col[("expect_column_values_to_be_in_set", "patient_sex")]
    assert sex["critical"] is False and sex["unexpected_count"] == 0  # nulls allowed
    mean = by_type_col[("expect_column_mean_to_be_between", "pixel_mean")]
    assert mean["observed_value"] == pytest.approx(
        pd.read_parquet(tmp_path / "ingested" / "metadata.parquet")["pixel_mean"].mean())


def test_bad_table_fails_naming_check_column_and_figure(tmp_path: Path) -> None:
    ingested = tmp_path / "ingested"
    table = build_ingested(ingested)
    table.loc[:11, "patient_id"] = None                      # 12 nulls
    table.loc[5, "sop_instance_uid"] = table.loc[6, "sop_instance_uid"]  # a duplicate pair
    table["pixel_mean"] = 0.99                               # every image saturated
    table.to_parquet(ingested / "metadata.parquet", index=False)
    out = tmp_path / "quality"

    with pytest.raises(DataQualityError) as err:
        quality.run(QualityConfig(), ingested_dir=ingested, out_dir=out)

    message = str(err.value)
    assert (f"expect_column_values_to_not_be_null failed on metadata.patient_id: "
            f"12 of {N_IMAGES:,} rows") in message
    assert "expect_column_values_to_be_unique failed on metadata.sop_instance_uid: 2 of" in message
    assert "expect_column_mean_to_be_between failed on metadata.pixel_mean: 0.99" in message
    assert "(critical)" in message
    # the report and the docs are written before the stage fails, for inspection
    report = json.loads((out / "result.json").read_text())
    assert report["success"] is False and len(report["critical_failures"]) == 3
    # what the flow reads back after `dvc repro` failed: the same message
    failed = quality.failed_result(out)
    assert failed is not None and str(quality.failure_error(failed)) == message
    assert quality.failed_result(tmp_path / "nowhere") is None
    assert any("metadata.pixel_mean" in w and "(warning)" in w for w in report["warnings"])
    assert (out / "data_docs" / "index.html").is_file()


def test_warnings_are_reported_not_fatal(tmp_path: Path) -> None:
    ingested = tmp_path / "ingested"
    table = build_ingested(ingested)
    table.loc[:2, "patient_sex"] = "X"  # not a PS3.3 C.7.1.1 PatientSex code
    table.to_parquet(ingested / "metadata.parquet", index=False)

    result = quality.run(QualityConfig(), ingested_dir=ingested, out_dir=tmp_path / "q")

    assert result.success
    assert result.warnings == [
        "expect_column_values_to_be_in_set failed on metadata.patient_sex: "
        f"3 of {N_IMAGES:,} rows, expected values in {{M, F, O}} or null (warning)"
    ]


def test_flat_images_fail_even_if_their_brightness_is_plausible(tmp_path: Path) -> None:
    ingested = tmp_path / "ingested"
    table = build_ingested(ingested)
    table["pixel_std"] = 0.0  # e.g. a window so narrow that every image is one grey level
    table["pixel_min"] = table["pixel_max"] = table["pixel_mean"] = 0.5
    table.to_parquet(ingested / "metadata.parquet", index=False)

    with pytest.raises(DataQualityError) as err:
        quality.run(QualityConfig(), ingested_dir=ingested, out_dir=tmp_path / "q")
    assert str(err.value) == ("expect_column_mean_to_be_between failed on metadata.pixel_std: 0, "
                              "expected >= 0.01 (critical)")


def test_small_table_missing_column_and_bad_labels(tmp_path: Path) -> None:
    ingested = tmp_path / "ingested"
    table = build_ingested(ingested, n=20)
    table["label"] = pd.array([0, 1, 2, None] * 5, dtype="Int64")
    table.drop(columns=["content_sha256"]).to_parquet(ingested / "metadata.parquet", index=False)

    with pytest.raises(DataQualityError) as err:
        quality.run(QualityConfig(min_rows=50), ingested_dir=ingested, out_dir=tmp_path / "q")

    message = str(err.value)
    assert "expect_table_row_count_to_be_between failed on metadata: 20, expected >= 50 rows" in message
    assert "expect_table_columns_to_match_set failed on metadata: missing content_sha256" in message
    assert "expect_column_values_to_be_in_set failed on metadata.label: 5 of" in message
    assert "expect_column_values_to_not_be_null failed on metadata.label: 5 of 20 rows" in message


def test_label_null_fraction_is_a_parameter(tmp_path: Path) -> None:
    ingested = tmp_path / "ingested"
    table = build_ingested(ingested, n=60)
    table.loc[:2, "label"] = pd.NA  # 3 of 60 = 5 %
    table.to_parquet(ingested / "metadata.parquet", index=False)

    assert quality.run(QualityConfig(max_label_null_fraction=0.1), ingested_dir=ingested,
                       out_dir=tmp_path / "a").success
    with pytest.raises(DataQualityError, match=r"metadata\.label: 3 of 60 rows, expected null fraction <= 0\.01"):
        quality.run(QualityConfig(max_label_null_fraction=0.01), ingested_dir=ingested,
                    out_dir=tmp_path / "b")


def test_missing_table_is_a_stage_error(tmp_path: Path) -> None:
    with pytest.raises(DataQualityError, match="no metadata table"):
        quality.run(QualityConfig(), ingested_dir=tmp_path / "nothing", out_dir=tmp_path / "q")


def _suite_file(gx_root: Path) -> dict:
    return json.loads((gx_root / "gx" / "expectations" / f"{quality.SUITE}.json").read_text())


def test_the_suite_is_a_file_backed_gx_project_with_native_severity(tmp_path: Path) -> None:
    build_ingested(tmp_path / "ingested")
    out = tmp_path / "quality"
    quality.run(QualityConfig(), ingested_dir=tmp_path / "ingested", out_dir=out, gx_root=tmp_path)

    gx_dir = tmp_path / "gx"
    for rel in ("great_expectations.yml", f"validation_definitions/{quality.VALIDATION}.json",
                f"checkpoints/{quality.CHECKPOINT}.json"):
        assert (gx_dir / rel).is_file(), rel
    stored = _suite_file(tmp_path)["expectations"]
    specs = quality.build_expectations(QualityConfig())
    assert [(e["type"], e["severity"]) for e in stored] == [(s.type, s.severity) for s in specs]
    assert {e["severity"] for e in stored} == {"critical", "warning"}
    assert all("severity" not in e["meta"] and quality.MANAGED in e["meta"] for e in stored)

    # unchanged params: the suite file is not rewritten; a changed threshold keeps the id
    before = (gx_dir / "expectations" / f"{quality.SUITE}.json").read_text()
    quality.run(QualityConfig(), ingested_dir=tmp_path / "ingested", out_dir=out, gx_root=tmp_path)
    assert (gx_dir / "expectations" / f"{quality.SUITE}.json").read_text() == before
    quality.run(QualityConfig(min_rows=60), ingested_dir=tmp_path / "ingested", out_dir=out, gx_root=tmp_path)
    rows = [e for e in _suite_file(tmp_path)["expectations"]
            if e["type"] == "expect_table_row_count_to_be_between"]
    assert len(rows) == 1 and rows[0]["kwargs"]["min_value"] == 60 and rows[0]["id"] == stored[0]["id"]


def test_expectations_a_gx_user_adds_run_with_their_severity(tmp_path: Path) -> None:
    import great_expectations as gx

    build_ingested(tmp_path / "ingested")
    out = tmp_path / "quality"
    quality.run(QualityConfig(), ingested_dir=tmp_path / "ingested", out_dir=out, gx_root=tmp_path)

    # what a GX user does in their own session: open the project, add to the suite, save
    context = gx.get_context(mode="file", project_root_dir=str(tmp_path))
    suite = context.suites.get(quality.SUITE)
    suite.add_expectation(gx.expectations.ExpectColumnValuesToBeBetween(
        column="patient_age", max_value=5, severity="warning"))  # ages 6-11 fail: 60 of 120
    suite.save()
    result = quality.run(QualityConfig(), ingested_dir=tmp_path / "ingested", out_dir=out, gx_root=tmp_path)
    assert result.success and result.n_expectations == len(quality.build_expectations(QualityConfig())) + 1
    assert result.warnings == ["expect_column_values_to_be_between failed on metadata.patient_age: "
                               f"60 of {N_IMAGES:,} rows, expected max_value=5 (warning)"]

    suite = context.suites.get(quality.SUITE)
    suite.add_expectation(gx.expectations.ExpectColumnValuesToBeInSet(
        column="modality", value_set=["DX"], severity="critical", description="digital radiographs only"))
    suite.save()
    with pytest.raises(DataQualityError, match=r"^expect_column_values_to_be_in_set failed on metadata\.modality: "
                       rf"{N_IMAGES} of {N_IMAGES} rows, expected digital radiographs only \(critical\)$"):
        quality.run(QualityConfig(), ingested_dir=tmp_path / "ingested", out_dir=out, gx_root=tmp_path)
    # the managed expectations were left as they were, the user's kept after them
    types = [e["type"] for e in _suite_file(tmp_path)["expectations"]]
    assert types[-2:] == ["expect_column_values_to_be_between", "expect_column_values_to_be_in_set"]


def test_data_docs_keep_every_validation_and_load_nothing_from_the_internet(tmp_path: Path) -> None:
    from medops.datadocs import remote_urls

    ingested = tmp_path / "ingested"
    table = build_ingested(ingested)
    out = tmp_path / "quality"
    quality.run(QualityConfig(), ingested_dir=ingested, out_dir=out)
    table.loc[:11, "patient_id"] = None
    table.to_parquet(ingested / "metadata.parquet", index=False)
    with pytest.raises(DataQualityError):
        quality.run(QualityConfig(), ingested_dir=ingested, out_dir=out)

    docs = out / "data_docs"
    pages = sorted((docs / "validations").rglob("*.html"))
    assert len(pages) == 2  # the first run's page is still there
    index = (docs / "index.html").read_text()
    assert all(page.parent.name in index for page in pages)  # both runs listed
    for page in [docs / "index.html", *pages]:
        assert remote_urls(page.read_text()) == [], page
    assert (docs / "static" / "vendor" / "jquery" / "dist" / "jquery.min.js").is_file()


def test_a_run_killed_while_gx_writes_its_project_leaves_every_file_whole(tmp_path: Path) -> None:
    # GX writes its files in place; medops makes each write a hidden temporary renamed over the
    # file (quality.whole_file_writes). Killed inside such a write (after the temporary is
    # written, before the rename), the project keeps the file as it was and the next run loads it.
    import os
    import subprocess
    import sys

    import yaml

    from medops.atomic import CRASH_ENV

    ingested, out = tmp_path / "ingested", tmp_path / "q"
    build_ingested(ingested)
    quality.run(QualityConfig(), ingested_dir=ingested, out_dir=out)
    suite_file = out / "gx" / "expectations" / f"{quality.SUITE}.json"
    before = suite_file.read_bytes()

    # other params: the suite is rewritten, and the process dies in that write
    code = ("from pathlib import Path; from medops.stages import quality; "
            "from medops.config import QualityConfig; "
            f"quality.run(QualityConfig(min_rows=60), ingested_dir=Path({str(ingested)!r}), "
            f"out_dir=Path({str(out)!r}))")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env={**os.environ, CRASH_ENV: "quality.gx_save"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    partials = list(out.rglob(f"*{quality.PARTIAL}"))
    assert [p.name.startswith(f".{quality.SUITE}.json.") for p in partials] == [True]
    assert suite_file.read_bytes() == before
    for path in (out / "gx").rglob("*"):  # every project file whole
        if path.is_file() and not path.name.endswith(quality.PARTIAL):
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".yml":
                yaml.safe_load(path.read_text())

    result = quality.run(QualityConfig(min_rows=60), ingested_dir=ingested, out_dir=out)
    assert result.success
    assert not list(out.rglob(f"*{quality.PARTIAL}"))  # the killed write's leftover removed
    suite = json.loads(suite_file.read_text())
    rows = next(e for e in suite["expectations"] if e["type"] == "expect_table_row_count_to_be_between")
    assert rows["kwargs"]["min_value"] == 60
