"""The project's data path into the dataset: label manifests found in the export folder and merged,
and the published dataset that DVC versions, which names no file of the export by its path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from medops.config import IngestConfig, SynthConfig
from medops.dicom import synth
from medops.errors import IngestError
from medops.paths import BUNDLED_DATASET
from medops.stages import ingest
from medops.stages.ingest.publish import file_id, publish_dataset

KEY = b"export-test-key-0123456789abcdef"
PHI_FOLDER = "Doe_John_MRN123"


@pytest.fixture
def export(tmp_path):
    """A synthetic export (labels.csv beside dicom/), a folder named after a patient holding one
    broken file, a CSV that is no manifest, and a second manifest for a study that came later."""
    root = tmp_path / "export"
    synth.run(SynthConfig(max_images_per_split=2), source_npz=BUNDLED_DATASET, out_dir=root)
    (root / PHI_FOLDER).mkdir()
    (root / PHI_FOLDER / "Doe_John_chest.dcm").write_bytes(b"DICM but not really")
    (root / "notes.csv").write_text("a,b\n1,2\n")  # a CSV without label: not a manifest
    return root


def _run(export, work, **kw):
    cfg = IngestConfig(workers=1)
    return ingest.run(cfg, source_dir=export, out_dir=work, key=KEY,
                      manifest=ingest.find_manifests(export) or None, **kw)


def test_manifests_are_found_read_as_labels_and_not_ingested(export, tmp_path):
    assert ingest.find_manifests(export) == [export / "labels.csv"]
    result = _run(export, tmp_path / "work")
    assert result.used == 6 and result.labelled == 6
    report = pd.read_csv(result.quarantine)
    # the manifest is no study; the other CSV and the broken file are, and are quarantined
    assert sorted(report["path"]) == [f"{PHI_FOLDER}/Doe_John_chest.dcm", "notes.csv"]


def test_manifests_merge_and_conflicting_ones_stop_with_both_names(export, tmp_path):
    rows = pd.read_csv(export / "labels.csv")
    first = rows.iloc[0]
    # a second delivery: a manifest in a sub-folder, DICOM keyword header, one file relabelled
    (export / "later").mkdir()
    (export / "later" / "more.csv").write_text(
        f"SOPInstanceUID,label\n{first['sop_instance_uid']},{1 - int(first['label'])}\n")
    assert ingest.find_manifests(export) == [export / "labels.csv", export / "later" / "more.csv"]
    with pytest.raises(IngestError, match=r"labels\.csv and .*more\.csv give .* labels"):
        _run(export, tmp_path / "work")
    (export / "later" / "more.csv").write_text(
        f"SOPInstanceUID,label\n{first['sop_instance_uid']},{int(first['label'])}\n")  # agrees
    assert _run(export, tmp_path / "work").labelled == 6


def test_a_label_that_arrives_later_is_applied_on_the_next_run(export, tmp_path):
    rows = pd.read_csv(export / "labels.csv")
    held_back = rows.iloc[-1]
    rows.iloc[:-1].to_csv(export / "labels.csv", index=False)
    first = _run(export, tmp_path / "work")
    assert first.used == 5 and first.quarantined_by_reason.get("no_label") == 1
    (export / "labels-late.csv").write_text(
        f"SOPInstanceUID,label\n{held_back['sop_instance_uid']},{int(held_back['label'])}\n")
    second = _run(export, tmp_path / "work")
    assert second.used == 6 and "no_label" not in second.quarantined_by_reason and second.changed


def test_the_published_dataset_names_no_export_path_and_changes_only_with_the_data(export, tmp_path):
    work, dataset = tmp_path / "work", tmp_path / "dataset"
    _run(export, work)
    assert publish_dataset(work, dataset, KEY) is True
    files = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file())
    assert "ingest_index.json" not in files and not any(f.startswith(".") for f in files)
    assert "metadata.parquet" in files and any(f.startswith("arrays/") for f in files)
    assert any(f.startswith("dicom/") for f in files)
    blob = b"".join((dataset / f).read_bytes() for f in files)
    for phi in (PHI_FOLDER, "Doe_John", "notes.csv", "PAT0000"):
        assert phi.encode() not in blob, phi
    published = pd.read_csv(dataset / "quarantine.csv")
    assert list(published.columns) == ["file_id", "reason"]
    assert sorted(published["file_id"]) == sorted(
        file_id(p, KEY) for p in (f"{PHI_FOLDER}/Doe_John_chest.dcm", "notes.csv"))
    # hard links, not copies; and the same output published again changes nothing
    assert os.path.samefile(work / "metadata.parquet", dataset / "metadata.parquet")
    assert publish_dataset(work, dataset, KEY) is False
    # a file that left the export leaves the dataset (its de-identified copy included)
    gone = next((export / "dicom").rglob("*.dcm"))
    gone.unlink()
    assert _run(export, work).changed
    assert publish_dataset(work, dataset, KEY) is True
    assert _deid_files(dataset) == _deid_files(work) == 5
    shutil.rmtree(work)
    assert len(pd.read_parquet(dataset / "metadata.parquet")) == 5  # the dataset does not need work


def _deid_files(folder: Path) -> int:
    """The de-identified files in a dataset's packs (dicom/shard-N.zip)."""
    import zipfile

    return sum(len(zipfile.ZipFile(p).namelist()) for p in (folder / "dicom").glob("shard-*.zip"))


def test_file_ids_are_keyed():
    assert file_id("a/b.dcm", KEY) == file_id("a/b.dcm", KEY) != file_id("a/b.dcm", b"other key")
    assert file_id("a/b.dcm", KEY) != file_id("a/c.dcm", KEY)


def test_synth_add_delivers_new_labelled_studies_that_ingest_picks_up(export, tmp_path):
    work = tmp_path / "work"
    before = _run(export, work)
    added = synth.add_studies(SynthConfig(max_images_per_split=2), source_npz=BUNDLED_DATASET,
                              out_dir=export, n=4)
    assert added.manifest == export / "labels-add-1.csv" and added.patients == 4
    assert 4 <= added.files <= 8 and set(added.by_split) <= {"train", "val", "test"}
    assert added.by_split["test"] == 0  # new studies never leak into the official test split
    after = _run(export, work)
    assert after.decoded == added.files  # only the new files are decoded
    assert after.used == before.used + added.files and after.labelled == before.labelled + added.files
    again = synth.add_studies(SynthConfig(max_images_per_split=2), source_npz=BUNDLED_DATASET,
                              out_dir=export, n=2)
    assert again.manifest == export / "labels-add-2.csv"
    first_uids = set(pd.read_csv(added.manifest)["sop_instance_uid"])
    assert first_uids.isdisjoint(pd.read_csv(again.manifest)["sop_instance_uid"])


def test_a_hidden_csv_is_no_manifest(export):
    """A manifest still being written under a temporary name (medops.atomic) is not read."""
    labels = export / "labels.csv"
    (export / ".labels.tmp-x1y2.csv").write_text(labels.read_text()[:200])
    (export / ".partial").mkdir()
    (export / ".partial" / "labels.csv").write_text(labels.read_text())
    assert ingest.find_manifests(export) == [labels]
