"""ingest: a small real export (synthetic studies + pydicom's own files + broken files) end to end."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from _small_export import small_ct as _small_ct
from conftest import pydicom_file
from medops.stages import ingest
from medops.stages.ingest import executors, index, pool, stage, worker, writers
from medops.config import DeidConfig, IngestConfig, SynthConfig
from medops.data import METADATA_COLUMNS, load_images, pack_path, read_deidentified, read_metadata, shard_path
from medops.dicom import synth
from medops.errors import IngestError
from medops.paths import BUNDLED_DATASET

KEY = b"ingest-test-key-0123456789abcdef"
PYDICOM_GOOD = {"ct/CT_small.dcm": "CT_small.dcm", "mr/MR_small.dcm": "MR_small.dcm",
                "compressed/J2K": "JPEG2000.dcm"}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _deid_files(out: Path) -> dict[str, bytes]:
    """Every de-identified file in the ingest folder's packs, by its name there (``deid_path``)."""
    import zipfile

    found: dict[str, bytes] = {}
    for pack in sorted((out / "dicom").glob("shard-*.zip")):
        with zipfile.ZipFile(pack) as z:
            for name in z.namelist():
                assert name not in found, name
                found[name] = z.read(name)
    return found


def _dcmread(out: Path, row, **kwargs):
    import io

    return pydicom.dcmread(io.BytesIO(read_deidentified(out, row)), **kwargs)


def _by_uid(out: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Metadata without the placement columns, sorted by UID, and the images in that order: what
    a dataset holds, wherever its rows were placed."""
    md = read_metadata(out)
    images = load_images(out, md)[np.argsort(md["sop_instance_uid"].to_numpy(), kind="stable")]
    md = md.sort_values("sop_instance_uid", kind="stable").drop(columns=["shard", "shard_index"])
    return md.reset_index(drop=True), images


def _same_dataset(a: Path, b: Path) -> None:
    (ma, ia), (mb, ib) = _by_uid(a), _by_uid(b)
    pd.testing.assert_frame_equal(ma, mb)
    np.testing.assert_array_equal(ia, ib)
    assert _deid_files(a) == _deid_files(b)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict:
    """A hospital-like folder: 12 synthetic images, 3 real pydicom images and 6 problem files."""
    root = tmp_path_factory.mktemp("export")
    synth_out = root / "synth"
    synth.run(SynthConfig(max_images_per_split=4), source_npz=BUNDLED_DATASET, out_dir=synth_out)
    src = root / "source"
    shutil.copytree(synth_out / "dicom", src / "synthetic")
    rows = _read_csv(synth_out / "labels.csv")
    manifest_rows = [dict(r, path="synthetic/" + r["path"]) for r in rows]
    unlabelled = manifest_rows.pop()  # its file stays in the folder: no_label
    for rel, name in PYDICOM_GOOD.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pydicom_file(name), src / rel)
        uid = pydicom.dcmread(src / rel, stop_before_pixels=True).SOPInstanceUID
        manifest_rows.append({"sop_instance_uid": uid, "path": rel, "label": "1", "split": ""})
    bad = src / "bad"
    bad.mkdir()
    ct = pydicom_file("CT_small.dcm").read_bytes()
    (bad / "garbage.bin").write_bytes(np.random.default_rng(0).bytes(3000))
    (bad / "notes.txt").write_text("patient called back\n")
    (bad / "truncated.dcm").write_bytes(ct[: len(ct) // 2])
    shutil.copy(pydicom_file("rtplan.dcm"), bad / "rtplan.dcm")  # no pixel data
    first = src / "synthetic" / rows[0]["path"]
    shutil.copy(first, bad / "copy-of-first.dcm")  # same bytes: duplicate
    burned = pydicom.dcmread(src / "synthetic" / rows[1]["path"])
    burned.BurnedInAnnotation = "YES"
    burned.SOPInstanceUID = pydicom.uid.generate_uid()
    burned.file_meta.MediaStorageSOPInstanceUID = burned.SOPInstanceUID
    burned.save_as(bad / "burned")
    manifest_rows.append({"sop_instance_uid": burned.SOPInstanceUID, "path": "bad/burned", "label": "0", "split": "train"})
    manifest = root / "labels.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["sop_instance_uid", "path", "label", "split"])
        w.writeheader()
        w.writerows(manifest_rows)
    phi = set()
    for path in sorted((src / "synthetic").rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        phi |= {str(ds.PatientID), str(ds.PatientName), ds.AccessionNumber, ds.PatientBirthDate,
                str(ds.ReferringPhysicianName), str(ds.PatientName.family_name), ds.StudyInstanceUID,
                ds.SOPInstanceUID, ds.PatientAddress}
    phi.add(SynthConfig().institution)
    return {"src": src, "manifest": manifest, "rows": rows, "unlabelled": unlabelled, "phi": phi}


@pytest.fixture(scope="module")
def result(export, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingested")
    cfg = IngestConfig(shard_size=4, workers=2)
    return ingest.run(cfg, source_dir=export["src"], out_dir=out, manifest=export["manifest"], key=KEY)


def test_every_file_is_used_or_quarantined_with_its_reason(export, result):
    assert result.files_seen == 12 + 3 + 6
    quarantine = {r["path"]: r for r in _read_csv(result.quarantine)}
    reasons = {p: r["reason"] for p, r in quarantine.items()}
    assert reasons == {
        "bad/garbage.bin": "not_dicom",
        "bad/notes.txt": "not_dicom",
        "bad/truncated.dcm": "truncated",
        "bad/rtplan.dcm": "no_pixel_data",
        "bad/burned": "burned_in_annotation",
        "synthetic/" + export["rows"][0]["path"]: "duplicate",  # sorted after bad/copy-of-first.dcm
        export["unlabelled"]["path"]: "no_label",
    }
    assert all(r["detail"] for r in quarantine.values())
    # 12 synthetic - 1 unlabelled (its copy in bad/ is used, the original is the duplicate) + 3 real
    assert result.used == 12 - 1 + 3 == 14
    assert result.quarantined == 7 and result.used + result.quarantined == result.files_seen
    assert result.quarantined_by_reason["not_dicom"] == 2
    assert result.shards == 4  # 14 images, 4 per shard


def test_metadata_follows_the_documented_format(export, result):
    md = read_metadata(result.out_dir)
    assert list(md.columns) == list(METADATA_COLUMNS)
    assert len(md) == result.used
    assert str(md["label"].dtype) == "Int64" and str(md["patient_age"].dtype) == "Int64"
    assert md["label"].notna().all() and set(md["label"]) <= {0, 1}
    assert set(md["modality"]) == {"CR", "CT", "MR", "NM"}
    assert md["sop_instance_uid"].is_unique and md["content_sha256"].is_unique
    assert md["sop_instance_uid"].str.startswith("2.25.").all()
    synthetic = md[md["modality"] == "CR"]
    assert set(synthetic["manifest_split"]) <= {"train", "val", "test"}
    assert synthetic["patient_age"].between(1, 6).all()
    assert set(synthetic["patient_sex"]) <= {"M", "F"}
    assert (synthetic["rows"] == 28).all() and (synthetic["columns"] == 28).all()
    assert sorted(_deid_files(result.out_dir)) == sorted(md["deid_path"])
    for shard in range(result.shards):
        arr = np.load(shard_path(result.out_dir, shard))
        assert arr.dtype == np.float32 and arr.shape[1:] == (28, 28) and len(arr) <= 4
        rows = md[md["shard"] == shard].sort_values("shard_index")
        assert rows["shard_index"].tolist() == list(range(len(arr)))
        # the pack holds exactly its shard's rows' files, in the same order
        import zipfile

        with zipfile.ZipFile(pack_path(result.out_dir, shard)) as z:
            assert z.namelist() == rows["deid_path"].tolist()
            assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    assert sorted(p.relative_to(result.out_dir).as_posix() for p in result.out_dir.rglob("*") if p.is_file()) \
        == sorted([".medops-ingest", "metadata.parquet", "quarantine.csv", ingest.INDEX_NAME]
                  + [f"arrays/shard-{i:05d}.npy" for i in range(4)] + [f"dicom/shard-{i:05d}.zip" for i in range(4)])


def test_load_images_returns_the_preprocessed_pixels(export, result):
    md = read_metadata(result.out_dir)
    images = load_images(result.out_dir, md)
    assert images.shape == (len(md), 28, 28, 1) and images.dtype == np.float32
    np.testing.assert_allclose(images[..., 0].mean(axis=(1, 2)), md["pixel_mean"], rtol=1e-5)
    # synthetic rows hold exactly original / 255; find each one's original by its de-identified file
    for i, row in md[md["modality"] == "CR"].iterrows():
        original = _dcmread(result.out_dir, row).pixel_array
        assert np.array_equal(images[i, ..., 0], (original / 255).astype(np.float32))


def test_no_phi_in_any_output(export, result):
    blobs = [p.read_bytes() for p in result.out_dir.rglob("*") if p.is_file() and p.suffix != ".npy"]
    for canary in export["phi"]:
        needle = canary.encode()
        assert not any(needle in blob for blob in blobs), canary


def test_deidentified_files_are_valid_and_grouped(result):
    md = read_metadata(result.out_dir)
    for _, row in md.iterrows():
        ds = _dcmread(result.out_dir, row)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.SOPInstanceUID == row["sop_instance_uid"] == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.PatientID == row["patient_id"]
    synthetic = md[md["modality"] == "CR"]
    assert synthetic["patient_id"].nunique() < len(synthetic)  # several images per patient remain linked


def test_labels_come_from_the_manifest_by_original_uid(export, result):
    md = read_metadata(result.out_dir)
    # the real pydicom files were labelled 1, the synthetic ones carry their own labels
    assert (md[md["modality"] != "CR"]["label"] == 1).all()
    expected = sorted(int(r["label"]) for r in export["rows"]
                      if r["sop_instance_uid"] != export["unlabelled"]["sop_instance_uid"])
    assert sorted(int(v) for v in md[md["modality"] == "CR"]["label"]) == expected


def test_same_inputs_give_byte_identical_outputs_whatever_the_workers(export, result, tmp_path):
    """DVC hashes data/ingested: the same export, params and key must give the same bytes."""
    os.utime(next(export["src"].rglob("*.dcm")), ns=(1, 1))  # a fresh checkout has other mtimes
    serial = ingest.run(IngestConfig(shard_size=4, workers=1), source_dir=export["src"], out_dir=tmp_path,
                        manifest=export["manifest"], key=KEY)
    pd.testing.assert_frame_equal(read_metadata(tmp_path), read_metadata(result.out_dir))
    assert serial.quarantined_by_reason == result.quarantined_by_reason
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(result.out_dir) for p in result.out_dir.rglob("*") if p.is_file())
    for rel in files:
        assert (tmp_path / rel).read_bytes() == (result.out_dir / rel).read_bytes(), rel


def test_without_a_manifest_everything_readable_is_used_unlabelled(export, tmp_path):
    calls = []
    res = ingest.run(IngestConfig(workers=1), source_dir=export["src"], out_dir=tmp_path, key=KEY,
                     progress=lambda done, total: calls.append((done, total)))
    md = read_metadata(tmp_path)
    assert res.used == 12 + 3 and md["label"].isna().all() and md["manifest_split"].isna().all()
    assert "no_label" not in res.quarantined_by_reason
    assert calls and calls[-1] == (res.files_seen, res.files_seen)
    assert "ingested 15 of 21 files" in ingest.format_summary(res)
    again = ingest.run(IngestConfig(workers=1), source_dir=export["src"], out_dir=tmp_path, key=KEY)
    assert "nothing changed" in ingest.format_summary(again)


def test_quarantine_csv_is_written_even_when_empty(tmp_path):
    synth.run(SynthConfig(max_images_per_split=1), source_npz=BUNDLED_DATASET, out_dir=tmp_path / "raw")
    res = ingest.run(IngestConfig(workers=1), source_dir=tmp_path / "raw" / "dicom", out_dir=tmp_path / "out",
                     manifest=tmp_path / "raw" / "labels.csv", key=KEY)
    assert res.quarantined == 0 and res.used == 3
    assert res.quarantine.read_text() == "path,reason,detail\n"


def test_rerun_replaces_previous_outputs(tmp_path):
    synth.run(SynthConfig(max_images_per_split=2), source_npz=BUNDLED_DATASET, out_dir=tmp_path / "raw")
    out = tmp_path / "out"
    ingest.run(IngestConfig(workers=1, shard_size=1), source_dir=tmp_path / "raw" / "dicom", out_dir=out, key=KEY)
    res = ingest.run(IngestConfig(workers=1, shard_size=4), source_dir=tmp_path / "raw" / "dicom", out_dir=out, key=KEY)
    assert sorted(p.name for p in (out / "arrays").iterdir()) == ["shard-00000.npy", "shard-00001.npy"]
    assert sorted(p.name for p in (out / "dicom").iterdir()) == ["shard-00000.zip", "shard-00001.zip"]
    assert len(_deid_files(out)) == res.used == 6


def test_stage_failures_are_typed(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        ingest.run(IngestConfig(), source_dir=tmp_path / "missing", out_dir=tmp_path / "out", key=KEY)
    (tmp_path / "src").mkdir()
    bad = tmp_path / "labels.csv"
    bad.write_text("uid,label\n1.2.3,0\n")
    with pytest.raises(IngestError, match="sop_instance_uid"):
        ingest.run(IngestConfig(), source_dir=tmp_path / "src", out_dir=tmp_path / "out", manifest=bad, key=KEY)
    bad.write_text("sop_instance_uid,label\n1.2.3,yes\n")
    with pytest.raises(IngestError, match="line 2"):
        ingest.run(IngestConfig(), source_dir=tmp_path / "src", out_dir=tmp_path / "out", manifest=bad, key=KEY)
    bad.write_text("sop_instance_uid,path,label\n1.2.3,,0\n,a/b.dcm,1\n ,,1\n")
    with pytest.raises(IngestError, match="line 4: neither sop_instance_uid nor path"):
        ingest.read_manifest(bad)


def test_key_defaults_to_the_environment(deid_key, tmp_path):
    synth.run(SynthConfig(max_images_per_split=1), source_npz=BUNDLED_DATASET, out_dir=tmp_path / "raw")
    a = ingest.run(IngestConfig(workers=1), source_dir=tmp_path / "raw" / "dicom", out_dir=tmp_path / "a")
    b = ingest.run(IngestConfig(workers=1), source_dir=tmp_path / "raw" / "dicom", out_dir=tmp_path / "b",
                   key=deid_key)
    pd.testing.assert_frame_equal(read_metadata(tmp_path / "a"), read_metadata(tmp_path / "b"))
    assert a.used == 3


def test_manifest_by_path_and_as_parquet(tmp_path):
    synth.run(SynthConfig(max_images_per_split=1), source_npz=BUNDLED_DATASET, out_dir=tmp_path / "raw")
    rows = _read_csv(tmp_path / "raw" / "labels.csv")
    by_path = pd.DataFrame({"path": [r["path"] for r in rows[:2]], "label": [1, 0]})
    by_path.to_parquet(tmp_path / "labels.parquet")
    res = ingest.run(IngestConfig(workers=1), source_dir=tmp_path / "raw" / "dicom", out_dir=tmp_path / "out",
                     manifest=tmp_path / "labels.parquet", key=KEY)
    assert (res.used, res.quarantined_by_reason) == (2, {"no_label": 1})
    md = read_metadata(tmp_path / "out")
    assert sorted(md["label"].tolist()) == [0, 1]
    assert sorted(ingest.read_manifest(tmp_path / "labels.parquet")) == sorted(f"path:{r['path']}" for r in rows[:2])


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def grown(tmp_path) -> dict:
    """A synthetic export in two halves: ``src`` holds the first, ``extra`` the rest."""
    synth.run(SynthConfig(max_images_per_split=4), source_npz=BUNDLED_DATASET, out_dir=tmp_path / "raw")
    patients = sorted((tmp_path / "raw" / "dicom").iterdir())
    src, extra = tmp_path / "src", tmp_path / "extra"
    for i, p in enumerate(patients):
        shutil.copytree(p, (src if i < len(patients) // 2 else extra) / p.name)
    return {"src": src, "extra": extra, "manifest": tmp_path / "raw" / "labels.csv", "tmp": tmp_path}


def test_incremental_run_decodes_only_new_files_and_matches_a_full_run(grown):
    cfg = IngestConfig(workers=1, shard_size=5)
    out, src = grown["tmp"] / "out", grown["src"]
    first = ingest.run(cfg, source_dir=src, out_dir=out, manifest=grown["manifest"], key=KEY)
    assert first.decoded == first.files_seen and first.reused == 0
    for p in sorted(grown["extra"].iterdir()):
        shutil.copytree(p, src / p.name)
    second = ingest.run(cfg, source_dir=src, out_dir=out, manifest=grown["manifest"], key=KEY)
    assert second.reused == first.files_seen and second.decoded == second.files_seen - first.files_seen > 0
    full = ingest.run(cfg.model_copy(update={"incremental": False}), source_dir=src,
                      out_dir=grown["tmp"] / "full", manifest=grown["manifest"], key=KEY)
    # the same rows, pixels and de-identified files; placed otherwise: the earlier rows stayed where
    # they were, the new ones topped up the last shard and filled new ones
    _same_dataset(out, grown["tmp"] / "full")
    assert second.shards == full.shards == -(-second.used // 5)


def test_rerun_on_the_same_folder_changes_nothing(grown):
    cfg = IngestConfig(workers=1)
    out = grown["tmp"] / "out"
    ingest.run(cfg, source_dir=grown["src"], out_dir=out, manifest=grown["manifest"], key=KEY)
    before = _mtimes(out)
    again = ingest.run(cfg, source_dir=grown["src"], out_dir=out, manifest=grown["manifest"], key=KEY)
    assert again.changed is False and again.decoded == 0
    assert _mtimes(out) == before


def test_rerun_with_an_unlabelled_file_changes_nothing(grown):
    """A no_label file is looked at again on every run (the manifest may have gained it); when it
    is still unlabelled, nothing changed and nothing is written."""
    rows = _read_csv(grown["manifest"])
    in_src = {p.relative_to(grown["src"]).as_posix() for p in grown["src"].rglob("*.dcm")}
    unlabelled = next(r for r in rows if r["path"] in in_src)
    manifest = grown["tmp"] / "partial.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r is not unlabelled)
    cfg = IngestConfig(workers=1)
    out = grown["tmp"] / "out"
    first = ingest.run(cfg, source_dir=grown["src"], out_dir=out, manifest=manifest, key=KEY)
    assert first.quarantined_by_reason == {"no_label": 1}
    before = _mtimes(out)
    again = ingest.run(cfg, source_dir=grown["src"], out_dir=out, manifest=manifest, key=KEY)
    assert again.decoded == 1 and again.quarantined_by_reason == {"no_label": 1}
    assert again.changed is False and "nothing changed" in ingest.format_summary(again)
    assert _mtimes(out) == before


def test_removed_files_lose_their_rows_and_deidentified_copies(grown):
    cfg = IngestConfig(workers=1)
    out = grown["tmp"] / "out"
    first = ingest.run(cfg, source_dir=grown["src"], out_dir=out, manifest=grown["manifest"], key=KEY)
    victim = sorted(grown["src"].iterdir())[0]
    n_removed = sum(1 for p in victim.rglob("*.dcm"))
    shutil.rmtree(victim)
    second = ingest.run(cfg, source_dir=grown["src"], out_dir=out, manifest=grown["manifest"], key=KEY)
    assert second.decoded == 0 and second.used == first.used - n_removed
    md = read_metadata(out)
    assert sorted(_deid_files(out)) == sorted(md["deid_path"])


def test_a_changed_manifest_relabels_without_decoding(grown):
    cfg = IngestConfig(workers=1)
    out = grown["tmp"] / "out"
    ingest.run(cfg, source_dir=grown["src"], out_dir=out, manifest=grown["manifest"], key=KEY)
    rows = _read_csv(grown["manifest"])
    flipped = grown["tmp"] / "flipped.csv"
    with flipped.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([dict(r, label=str(1 - int(r["label"]))) for r in rows])
    before = read_metadata(out)
    res = ingest.run(cfg, source_dir=grown["src"], out_dir=out, manifest=flipped, key=KEY)
    after = read_metadata(out)
    assert res.decoded == 0 and res.changed
    assert (after["label"] == 1 - before["label"]).all()


def test_a_full_rebuild_is_reused_by_the_incremental_runs_after_it(grown):
    cfg = IngestConfig(workers=1)
    out = grown["tmp"] / "out"
    full = ingest.run(cfg.model_copy(update={"incremental": False}), source_dir=grown["src"], out_dir=out,
                      manifest=grown["manifest"], key=KEY)
    assert full.decoded == full.files_seen
    again = ingest.run(cfg, source_dir=grown["src"], out_dir=out, manifest=grown["manifest"], key=KEY)
    assert again.decoded == 0 and again.changed is False


def test_the_fingerprint_holds_what_changes_an_output_byte_and_only_that():
    cfg = IngestConfig()
    same = [cfg.model_copy(update={"workers": 7}), cfg.model_copy(update={"incremental": False}),
            cfg.model_copy(update={"file_timeout_s": 5})]
    assert {index._fingerprint(c, KEY) for c in same} == {index._fingerprint(cfg, KEY)}
    other = [cfg.model_copy(update={"frame": "max"}), cfg.model_copy(update={"image_size": 16})]
    assert index._fingerprint(cfg, KEY) not in {index._fingerprint(c, KEY) for c in other}
    assert index._fingerprint(cfg, b"another-key-0123456789abcdef") != index._fingerprint(cfg, KEY)


def test_changed_settings_rebuild_everything(grown):
    out = grown["tmp"] / "out"
    first = ingest.run(IngestConfig(workers=1), source_dir=grown["src"], out_dir=out, key=KEY)
    res = ingest.run(IngestConfig(workers=1, image_size=16), source_dir=grown["src"], out_dir=out, key=KEY)
    assert res.decoded == first.files_seen and load_images(out, read_metadata(out)).shape[1:] == (16, 16, 1)
    other_key = ingest.run(IngestConfig(workers=1, image_size=16), source_dir=grown["src"], out_dir=out,
                           key=b"a-different-key-0123456789abcdef")
    assert other_key.decoded == first.files_seen


def test_labels_and_splits_from_folder_names_without_a_manifest(tmp_path):
    synth.run(SynthConfig(max_images_per_split=2), source_npz=BUNDLED_DATASET, out_dir=tmp_path / "raw")
    files = sorted((tmp_path / "raw" / "dicom").rglob("*.dcm"))
    layout = {"train/NORMAL": files[:2], "train/PNEUMONIA": files[2:4], "test/Pneumonia/batch 1": files[4:]}
    for folder, group in layout.items():
        (tmp_path / "src" / folder).mkdir(parents=True)
        for i, f in enumerate(group):
            shutil.copy(f, tmp_path / "src" / folder / f"img{i}.dcm")
    res = ingest.run(IngestConfig(workers=1), source_dir=tmp_path / "src", out_dir=tmp_path / "out", key=KEY)
    md = read_metadata(tmp_path / "out")
    assert res.labelled == res.used == len(files)
    assert sorted(zip(md["manifest_split"], md["label"])) == sorted(
        [("train", 0)] * 2 + [("train", 1)] * 2 + [("test", 1)] * (len(files) - 4))
    assert ingest.labels_from_path("PAT00001/ST001/IM00001.dcm") == (None, None)


def test_burned_in_annotation_is_used_only_when_allowed(export, tmp_path):
    cfg = IngestConfig(workers=1, deid=DeidConfig(allow_burned_in=True))
    res = ingest.run(cfg, source_dir=export["src"], out_dir=tmp_path, manifest=export["manifest"], key=KEY)
    assert "burned_in_annotation" not in res.quarantined_by_reason
    assert res.used == 14 + 1


def test_pixel_spacing_resamples_files_that_have_one_and_quarantines_the_rest(tmp_path):
    # two 16 x 16 CT slices, one at 0.5 mm, one without any spacing: at 1 mm per pixel on an
    # 8 x 8 canvas the first is the whole slice shrunk 2x, the second cannot be resampled
    src = tmp_path / "src"
    src.mkdir()
    with_spacing, without = _small_ct(1), _small_ct(2)
    with_spacing.PixelSpacing = [0.5, 0.5]
    with_spacing.save_as(src / "a.dcm", enforce_file_format=True)
    without.save_as(src / "b.dcm", enforce_file_format=True)
    cfg = IngestConfig(workers=1, image_size=8, pixel_spacing=1.0)
    res = ingest.run(cfg, source_dir=src, out_dir=tmp_path / "out", key=KEY)
    assert (res.used, res.quarantined_by_reason) == (1, {"unsupported_pixels": 1})
    quarantined = _read_csv(res.quarantine)
    assert [(r["path"], r["reason"]) for r in quarantined] == [("b.dcm", "unsupported_pixels")]
    assert "cannot resample to ingest.pixel_spacing = 1 mm" in quarantined[0]["detail"]
    from medops.dicom.pixels import apply_grayscale_pipeline, resample_to_spacing

    stored = with_spacing.pixel_array
    expected = resample_to_spacing(apply_grayscale_pipeline(stored, with_spacing, None, "MONOCHROME2"),
                                   (0.5, 0.5), 1.0, 8)
    images = np.load(next((tmp_path / "out" / "arrays").glob("*.npy")))
    np.testing.assert_allclose(images[0], expected, atol=1e-6)
    # without the setting both are resized whole, so the setting is part of the fingerprint
    res = ingest.run(IngestConfig(workers=1, image_size=8), source_dir=src, out_dir=tmp_path / "out", key=KEY)
    assert (res.used, res.decoded) == (2, 2)


def test_folders_that_would_lose_data_are_refused(tmp_path):
    synth.run(SynthConfig(max_images_per_split=1), source_npz=BUNDLED_DATASET, out_dir=tmp_path / "raw")
    raw = tmp_path / "raw"
    with pytest.raises(IngestError, match="contain one another"):
        ingest.run(IngestConfig(workers=1), source_dir=raw / "dicom", out_dir=raw / "dicom" / "out", key=KEY)
    with pytest.raises(IngestError, match="contain one another"):
        ingest.run(IngestConfig(workers=1), source_dir=raw / "dicom", out_dir=raw, key=KEY)
    other = tmp_path / "someone-elses"
    (other / "dicom").mkdir(parents=True)
    (other / "dicom" / "keep.dcm").write_bytes(b"precious")
    with pytest.raises(IngestError, match="not empty"):
        ingest.run(IngestConfig(workers=1), source_dir=raw / "dicom", out_dir=other, key=KEY)
    assert (other / "dicom" / "keep.dcm").read_bytes() == b"precious"


def test_a_run_that_crashed_half_way_does_not_block_the_next(tmp_path, monkeypatch):
    # what `make demo` met: a run died after writing shards but before metadata.parquet
    synth.run(SynthConfig(max_images_per_split=2), source_npz=BUNDLED_DATASET, out_dir=tmp_path / "raw")
    raw, out = tmp_path / "raw", tmp_path / "ingested"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stage, "_write_metadata", crash)  # where metadata.parquet is written
    with pytest.raises(OSError):
        ingest.run(IngestConfig(workers=1), source_dir=raw / "dicom", out_dir=out,
                   manifest=raw / "labels.csv", key=KEY)
    assert not (out / "metadata.parquet").exists() and any(out.iterdir())
    monkeypatch.undo()
    res = ingest.run(IngestConfig(workers=1), source_dir=raw / "dicom", out_dir=out,
                     manifest=raw / "labels.csv", key=KEY)
    assert res.used == 6 and (out / "metadata.parquet").is_file()


def test_an_output_that_cannot_be_written_fails_the_stage_not_the_file(tmp_path, monkeypatch):
    """Disk full or no permission on the output is the stage's failure: a deid_failed row would be
    kept by every later run although nothing is wrong with the file."""
    import errno

    synth.run(SynthConfig(max_images_per_split=1), source_npz=BUNDLED_DATASET, out_dir=tmp_path / "raw")
    raw, out = tmp_path / "raw", tmp_path / "out"

    def disk_full(pack, name, data, spills):
        raise OSError(errno.ENOSPC, "No space left on device")

    from medops.stages.ingest import writers

    monkeypatch.setattr(writers, "_add_member", disk_full)
    with pytest.raises(IngestError, match=r"cannot write .*dicom/shard-00000\.zip: No space left on device"):
        ingest.run(IngestConfig(workers=1), source_dir=raw / "dicom", out_dir=out, key=KEY)
    assert not (out / "quarantine.csv").exists() and not (out / ingest.INDEX_NAME).exists()
    monkeypatch.undo()
    res = ingest.run(IngestConfig(workers=1), source_dir=raw / "dicom", out_dir=out, key=KEY)
    assert (res.used, res.quarantined) == (3, 0)


def test_a_pack_written_from_spill_files_is_byte_for_byte_what_zipfile_writes(tmp_path, monkeypatch):
    """The local pool's workers leave the de-identified files in spill files, with their CRC-32,
    and the main process copies them into the pack inside the kernel: the pack must be exactly
    what ``ZipFile.writestr`` makes of the same bytes (DVC hashes it; the Dask path returns bytes),
    with the kernel copy and without it (a file system that cannot copy_file_range)."""
    import errno
    import zipfile
    import zlib

    from medops.stages.ingest import writers
    from medops.stages.ingest.worker import Spilled

    members = [(f"dicom/2.25.1/2.25.{i}.dcm", np.random.default_rng(i).bytes(n))
               for i, n in enumerate([0, 1, 131, 70_000, 1 << 20])]
    with zipfile.ZipFile(tmp_path / "reference.zip", "w", zipfile.ZIP_STORED) as ref:
        for name, data in members:
            ref.writestr(writers._zip_entry(name), data)
    spill = tmp_path / "chunk.bin"
    spill.write_bytes(b"".join(data for _, data in members))
    offsets = np.cumsum([0] + [len(d) for _, d in members])

    def write(target: Path) -> bytes:
        spills = writers._SpillFiles()
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as pack:
            for i, (name, data) in enumerate(members):
                source = data if i % 2 else Spilled(str(spill), int(offsets[i]), len(data), zlib.crc32(data))
                writers._add_member(pack, name, source, spills)
        assert spills.path == str(spill)  # still open: deleted when the next one is asked for
        spills.close()
        assert not spill.exists()
        spill.write_bytes(b"".join(data for _, data in members))
        return target.read_bytes()

    reference = (tmp_path / "reference.zip").read_bytes()
    assert write(tmp_path / "kernel.zip") == reference

    def unsupported(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(writers.os, "copy_file_range", unsupported)
    assert write(tmp_path / "copied.zip") == reference
    monkeypatch.delattr(writers.os, "copy_file_range")  # not Linux
    assert write(tmp_path / "copied.zip") == reference
    with zipfile.ZipFile(tmp_path / "copied.zip") as z:
        assert z.testzip() is None and [z.read(n) for n, _ in members] == [d for _, d in members]


def test_the_local_pools_workers_spill_the_deidentified_files_and_nothing_is_left(export, result, tmp_path,
                                                                                   monkeypatch):
    """On two workers, the de-identified files come to the pack through spill files (read by the
    main process), which are all gone once the run ends; the outputs are the serial run's."""
    from medops.stages.ingest import writers

    opened: list[str] = []
    fd_of = writers._SpillFiles.fd_of

    def spy(self, path):
        if path != self.path:
            opened.append(path)
        return fd_of(self, path)

    monkeypatch.setattr(writers._SpillFiles, "fd_of", spy)
    again = ingest.run(IngestConfig(shard_size=4, workers=2), source_dir=export["src"], out_dir=tmp_path / "out",
                       manifest=export["manifest"], key=KEY)
    assert len(opened) >= 2 and all(Path(p).parent == tmp_path / "out" / ".staging" / "spill" for p in opened)
    assert not (tmp_path / "out" / ".staging").exists() and again.used == result.used
    for rel in sorted(p.relative_to(result.out_dir) for p in result.out_dir.rglob("*") if p.is_file()):
        assert (tmp_path / "out" / rel).read_bytes() == (result.out_dir / rel).read_bytes(), rel


def test_a_file_that_cannot_be_deidentified_is_quarantined(tmp_path, monkeypatch):
    from medops.dicom import deid

    synth.run(SynthConfig(max_images_per_split=1), source_npz=BUNDLED_DATASET, out_dir=tmp_path / "raw")

    def fails(ds, key, **kwargs):
        raise ValueError("CANARY value that must not reach quarantine.csv")

    monkeypatch.setattr(deid, "deidentify", fails)
    res = ingest.run(IngestConfig(workers=1), source_dir=tmp_path / "raw" / "dicom", out_dir=tmp_path / "out",
                     key=KEY)
    assert (res.used, res.quarantined_by_reason) == (0, {"deid_failed": 3})
    assert "CANARY" not in res.quarantine.read_text()
    assert not _deid_files(tmp_path / "out")


def test_a_header_value_that_fails_when_first_read_quarantines_only_that_file(tmp_path, monkeypatch):
    """Headers are parsed as they are used, so reading the patient's sex (say) may be the first to
    meet a corrupt value: that file is quarantined as decode_error without quoting the value, the
    others are used, and nothing of it is written."""
    from medops.dicom import deid

    synth.run(SynthConfig(max_images_per_split=1), source_npz=BUNDLED_DATASET, out_dir=tmp_path / "raw")
    real, calls = deid.patient_sex, []

    def sex(ds):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("CANARY value that must not reach quarantine.csv")
        return real(ds)

    monkeypatch.setattr(deid, "patient_sex", sex)
    res = ingest.run(IngestConfig(workers=1), source_dir=tmp_path / "raw" / "dicom", out_dir=tmp_path / "out",
                     key=KEY)
    assert (res.used, res.quarantined_by_reason) == (2, {"decode_error": 1})
    [row] = _read_csv(res.quarantine)
    assert row["detail"] == "corrupt header: a value cannot be parsed (ValueError)"
    assert len(_deid_files(tmp_path / "out")) == 2


def test_a_worker_writes_nothing_it_returns_the_deidentified_bytes(tmp_path):
    """So a cluster's workers need no shared output folder: the main process packs what they return."""
    src = tmp_path / "src"
    src.mkdir()
    _small_ct(1).save_as(src / "a.dcm", enforce_file_format=True)
    spec = ingest.WorkerSpec(IngestConfig(workers=1, image_size=8), KEY, None, src)
    before = sorted(tmp_path.rglob("*"))
    outcome = ingest.process_file(spec, "a.dcm")
    assert outcome.reason is None and sorted(tmp_path.rglob("*")) == before
    ds = pydicom.dcmread(__import__("io").BytesIO(outcome.deid))
    assert ds.SOPInstanceUID == outcome.record["sop_instance_uid"] and ds.PatientIdentityRemoved == "YES"
    assert outcome.record["deid_path"] == f"dicom/{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"
    assert KEY.decode() not in repr(spec) and "key=" not in repr(spec)


def test_a_worker_process_that_dies_costs_only_the_file_it_was_reading(export, tmp_path):
    """A decoder that kills its process (a crashing plugin) on one file: the pool restarts, the
    chunk it held is retried one file per task, and only that file is quarantined. Run as a
    script, so that its spawned workers import it (as __mp_main__) and get the crashing decoder."""
    import json
    import subprocess
    import sys

    source = export["src"] / "synthetic"
    victim = sorted(p.relative_to(source).as_posix() for p in source.rglob("*.dcm"))[4]
    script = tmp_path / "crashing_decoder.py"
    script.write_text(f"""
import json, os
from pathlib import Path

if __name__ == "__mp_main__":  # a worker process
    from medops.stages.ingest import worker

    real = worker._read_original

    def read_original(ds, spec, rel):
        if rel == {victim!r}:
            os._exit(3)
        return real(ds, spec, rel)

    worker._read_original = read_original

if __name__ == "__main__":
    from medops.config import IngestConfig
    from medops.stages import ingest

    res = ingest.run(IngestConfig(workers=2, shard_size=4), source_dir=Path({str(source)!r}),
                     out_dir=Path({str(tmp_path / "out")!r}), key=b"k" * 32, progress=False)
    print(json.dumps({{"used": res.used, "quarantined": res.quarantined_by_reason}}))
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"used": 11, "quarantined": {"decode_error": 1}}
    [row] = _read_csv(tmp_path / "out" / "quarantine.csv")
    assert row == {"path": victim, "reason": "decode_error",
                   "detail": "the decoder crashed the worker process reading this file"}


def test_a_duplicate_sop_uid_with_other_content_leaves_the_kept_file_as_it_was(tmp_path):
    """Workers write nothing, so a duplicate (same SOP Instance UID, other content) cannot
    overwrite the kept file's de-identified copy: the pack holds the first file's bytes."""
    src = tmp_path / "src"
    src.mkdir()
    _small_ct(1).save_as(src / "a.dcm", enforce_file_format=True)
    twin = _small_ct(1)
    twin.PixelData = bytes(len(twin.PixelData))  # same SOP Instance UID, other content
    twin.save_as(src / "b.dcm", enforce_file_format=True)
    spec = ingest.WorkerSpec(IngestConfig(workers=1, image_size=8), KEY, None, src)
    res = ingest.run(spec.cfg, source_dir=src, out_dir=tmp_path / "out", key=KEY)
    assert res.quarantined_by_reason == {"duplicate": 1}
    assert list(_deid_files(tmp_path / "out").values()) == [ingest.process_file(spec, "a.dcm").deid]


def test_process_file_takes_its_settings_as_an_argument(tmp_path):
    """No settings live in a module global: two runs' specs in one process, used in turn, each
    de-identify with their own key."""
    src = tmp_path / "src"
    src.mkdir()
    _small_ct(1).save_as(src / "a.dcm", enforce_file_format=True)
    cfg = IngestConfig(workers=1, image_size=8)
    one = ingest.WorkerSpec(cfg, KEY, None, src)
    two = ingest.WorkerSpec(cfg, b"another-key-0123456789abcdef", {"path:a.dcm": (1, "test")}, src)
    first, second, again = (ingest.process_file(s, "a.dcm") for s in (one, two, one))
    assert first.reason is None and second.reason is None
    assert first.record["sop_instance_uid"] != second.record["sop_instance_uid"]
    assert (first.record["label"], second.record["label"]) == (None, 1)
    assert again.record == first.record and again.deid == first.deid != second.deid


# --- memory flat in the number of files: everything streamed, outputs unchanged ----------------

def test_listing_streams_in_the_order_sorted_gives(tmp_path):
    names = ["a-b/x", "a/x", "a/b/c", "a/b-c", "a.dcm", "a0", "ab/y", "a b/z", "Z/1", "é/2", "a/b/d/e",
             "sub/.hidden", "sub/IM0001"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    (tmp_path / "link-to-file").symlink_to(tmp_path / "a0")
    (tmp_path / "link-to-dir").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "a" / "broken-link").symlink_to(tmp_path / "missing")
    os.mkfifo(tmp_path / "sub" / "pipe")
    (tmp_path / "empty").mkdir()
    listing = ingest.iter_source_files(tmp_path)
    assert not isinstance(listing, list)
    # nothing is skipped: what is no file to read is listed for process_file to quarantine
    assert list(listing) == sorted(names + ["link-to-file", "link-to-dir", "a/broken-link", "sub/pipe"])


def _refuse_listing(monkeypatch, folder_name: str) -> None:
    """os.scandir of any folder named ``folder_name`` fails as an unreadable folder does."""
    scandir = os.scandir

    def locked(path):
        if isinstance(path, (str, Path)) and os.fspath(path).endswith(os.sep + folder_name):
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked)


def test_a_folder_that_cannot_be_listed_is_listed_in_its_place(tmp_path, monkeypatch):
    for name in ("a-b/x", "a/x", "a/y/z", "a0"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    _refuse_listing(monkeypatch, "a")
    assert list(ingest.iter_source_files(tmp_path)) == ["a-b/x", "a/", "a0"]  # sorted() order still
    with pytest.raises(IngestError, match="cannot be listed: Permission denied"):
        list(ingest.iter_source_files(tmp_path / "a"))


def test_entries_that_are_no_files_are_quarantined_with_the_reason(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "series").mkdir(parents=True)
    _small_ct(1).save_as(src / "series" / "IM1.dcm", enforce_file_format=True)
    (src / "series" / "IM2.dcm").symlink_to(src / "gone.dcm")
    (src / "series-link").symlink_to(src / "series", target_is_directory=True)
    os.mkfifo(src / "pipe")
    (src / "locked").mkdir()
    _small_ct(2).save_as(src / "locked" / "IM3.dcm", enforce_file_format=True)
    _refuse_listing(monkeypatch, "locked")
    res = ingest.run(IngestConfig(workers=1, image_size=8), source_dir=src, out_dir=tmp_path / "out", key=KEY)
    assert (res.files_seen, res.used, res.quarantined_by_reason) == (5, 1, {"not_dicom": 4})
    assert {r["path"]: r["detail"] for r in _read_csv(res.quarantine)} == {
        "locked/": "cannot read: a folder that cannot be listed (Permission denied)",
        "pipe": "cannot read: not a regular file (a device, pipe or socket)",
        "series-link": "cannot read: a link to a folder, not followed",
        "series/IM2.dcm": "cannot read: a link whose target cannot be reached (No such file or directory)",
    }
    # an incremental run reads them the same way (never opening the pipe) and keeps their rows
    again = ingest.run(IngestConfig(workers=1, image_size=8), source_dir=src, out_dir=tmp_path / "out", key=KEY)
    assert (again.decoded, again.changed) == (0, False)


@pytest.mark.parametrize("files", [{}, {"a.dcm": "0" * 64}, {"a": "1" * 64, "b/\"x\"\n.dcm": "",
                                                              "fingerprint": "2" * 64, "é": "3" * 64}])
def test_index_written_entry_by_entry_is_the_json_it_always_was(tmp_path, files):
    import json

    path = tmp_path / ingest.INDEX_NAME
    with path.open("w") as fh:
        fh.write('{\n"files": {')
        for i, rel in enumerate(sorted(files)):
            index._write_index_entry(fh, i == 0, rel, files[rel])
        index._close_index(fh, len(files), "f" * 64)
    assert path.read_text() == json.dumps({"fingerprint": "f" * 64, "files": files}, sort_keys=True,
                                          indent=0) + "\n"
    assert json.loads(path.read_text())["files"] == files
    assert index._index_fingerprint(path) == "f" * 64
    assert list(index._index_entries(path)) == sorted(files.items())


def _row(i: int, **overrides) -> dict:
    row = {"sop_instance_uid": f"2.25.{i}", "study_instance_uid": "2.25.7", "series_instance_uid": None,
           "patient_id": f"P{i % 3}", "patient_sex": None, "patient_age": None if i % 2 else 40 + i,
           "modality": "CT", "rows": 64, "columns": 64, "label": None, "manifest_split": None,
           "pixel_mean": 0.5 + i / 100, "pixel_std": 0.1, "pixel_min": 0.0, "pixel_max": 1.0,
           "content_sha256": f"{i:064x}", "deid_path": f"dicom/2.25.7/2.25.{i}.dcm", "shard": i // 4,
           "shard_index": i % 4}
    return {**row, **overrides}


@pytest.mark.parametrize("rows", [
    [],
    [_row(i) for i in range(7)],  # columns None in every row stay Arrow null, as pandas writes them
    [_row(i, patient_sex=("M" if i == 6 else None), label=(i % 2 if i > 4 else None),
          manifest_split=("val" if i == 0 else None), pixel_std=(float("nan") if i == 3 else 0.1))
     for i in range(7)],
])
def test_metadata_written_in_row_groups_reads_back_as_the_whole_frame_would(tmp_path, monkeypatch, rows):
    import pyarrow.parquet as pq

    monkeypatch.setattr(writers, "_ROW_GROUP", 3)
    parts = writers._MetadataWriter(tmp_path / "parts.parquet")
    for row in rows:
        parts.add(dict(row))
    parts.close()
    writers._write_metadata(parts, tmp_path / "metadata.parquet")
    ingest.metadata_frame(rows).to_parquet(tmp_path / "whole.parquet", index=False)
    written, whole = pq.ParquetFile(tmp_path / "metadata.parquet"), pq.ParquetFile(tmp_path / "whole.parquet")
    # pandas' metadata too (built without pandas, see _metadata_schema): same bytes
    assert written.schema_arrow.equals(whole.schema_arrow, check_metadata=True)
    assert written.metadata.num_row_groups == -(-len(rows) // 3) or not rows
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "metadata.parquet"),
                                  pd.read_parquet(tmp_path / "whole.parquet"))


def test_chunk_size_gives_each_worker_about_four_tasks_of_bounded_size():
    assert [ingest.chunk_size(n, 2) for n in (0, 1, 8, 9, 80)] == [1, 1, 1, 2, 10]
    assert ingest.chunk_size(10**6, 8) == pool._MAX_CHUNK
    # near the end tasks shrink (a quarter of each worker's share of what is left) down to 1 file
    assert [ingest.chunk_size(2000, 2, done) for done in (0, 1488, 1744, 1992, 1999)] == [64, 64, 32, 1, 1]
    sizes, done = [], 0
    while done < 2000:
        sizes.append(ingest.chunk_size(2000, 2, done))
        done += sizes[-1]
    assert done == 2000 and sizes == sorted(sizes, reverse=True) and sizes[-1] == 1 and len(sizes) < 100


def test_cursor_reads_sorted_pairs_once_and_forgives_gaps():
    cursor = index._Cursor(iter([("a", 1), ("c", 3), ("d", 4)]))
    assert [cursor.get(k) for k in ("0", "a", "b", "c", "e")] == [None, 1, None, 3, None]
    assert cursor.get("d") is None  # passed: keys must be asked for in ascending order


def test_bounded_window_with_reuse_and_parallel_workers_matches_a_full_run(grown, monkeypatch):
    """Tiny chunks, one chunk ahead per worker, a run that mixes reused and new files on 2 workers."""
    monkeypatch.setattr(pool, "_MAX_CHUNK", 2)
    monkeypatch.setattr(executors, "_AHEAD_PER_WORKER", 1)
    monkeypatch.setattr(writers, "_ROW_GROUP", 3)
    cfg = IngestConfig(workers=2, shard_size=3)
    out, src = grown["tmp"] / "out", grown["src"]
    for p in sorted(grown["extra"].iterdir()):
        shutil.copytree(p, src / p.name)
    held = grown["tmp"] / "held"
    held.mkdir()
    for p in sorted(src.iterdir())[1::2]:  # every other patient comes later: old and new interleave
        p.rename(held / p.name)
    first = ingest.run(cfg, source_dir=src, out_dir=out, manifest=grown["manifest"], key=KEY)
    for p in sorted(held.iterdir()):
        p.rename(src / p.name)
    second = ingest.run(cfg, source_dir=src, out_dir=out, manifest=grown["manifest"], key=KEY)
    assert second.reused == first.files_seen and second.decoded == second.files_seen - first.files_seen > 0
    full_dir = grown["tmp"] / "full"
    ingest.run(IngestConfig(workers=1, shard_size=3, incremental=False), source_dir=src, out_dir=full_dir,
               manifest=grown["manifest"], key=KEY)
    # rows in source-path order either way; the earlier rows kept their shards
    pd.testing.assert_frame_equal(read_metadata(out).drop(columns=["shard", "shard_index"]),
                                  read_metadata(full_dir).drop(columns=["shard", "shard_index"]))
    for name in ("quarantine.csv", ingest.INDEX_NAME):
        assert (out / name).read_bytes() == (full_dir / name).read_bytes(), name
    _same_dataset(out, full_dir)
    again = ingest.run(cfg, source_dir=src, out_dir=out, manifest=grown["manifest"], key=KEY)
    assert again.changed is False and again.decoded == 0


def _traced_peak(src: Path, out: Path) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        res = ingest.run(IngestConfig(workers=1, image_size=8, shard_size=16, incremental=False),
                         source_dir=src, out_dir=out, key=KEY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.used == res.files_seen
    return peak


def test_main_process_memory_per_file_is_a_few_hundred_bytes(tmp_path, monkeypatch):
    """Issue 3 item 6: memory stays bounded on big exports. The main process' Python allocations at
    their peak, for 100 and then 500 files: what they grow by per file is the per-file state the
    stage keeps (none since duplicate detection's digests went to disk: ~40 B here, noise; they
    were ~0.3 kB a used file, too little to tell apart at this size, see benchmarks/scale section
    3); holding the rows, the listing or the index in memory costs several kB per file."""
    for i in range(500):
        target = tmp_path / "src" / f"series{i // 100}" / f"IM{i:05d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        _small_ct(i).save_as(target, enforce_file_format=True)
    # metadata rows are held until a row group of _ROW_GROUP is written: a bound, but one larger
    # than these exports, so it is made smaller here
    monkeypatch.setattr(writers, "_ROW_GROUP", 50, raising=False)
    small = tmp_path / "small"
    shutil.copytree(tmp_path / "src" / "series0", small / "series0")
    _traced_peak(small, tmp_path / "warm-up")  # imports and caches, not per-file state
    per_file = (_traced_peak(tmp_path / "src", tmp_path / "out-500")
                - _traced_peak(small, tmp_path / "out-100")) / 400
    assert per_file < 1000, f"{per_file:.0f} bytes per file"


def test_the_main_process_of_a_parallel_run_imports_neither_pandas_nor_the_decoders(export, tmp_path):
    """The main process only hands out files and writes what the workers return: importing pandas
    (~0.4 s of CPU), pydicom or Pillow there would take CPU from the workers on a small machine.
    Run in a fresh interpreter, so that nothing this test session imported counts."""
    import json
    import subprocess
    import sys

    code = f"""
import json, sys
from pathlib import Path
from medops.stages import ingest
from medops.config import IngestConfig
result = ingest.run(IngestConfig(workers=2, shard_size=4), source_dir=Path({str(export["src"] / "synthetic")!r}),
                    out_dir=Path({str(tmp_path / "out")!r}), key=b"k" * 32, progress=False)
print(json.dumps({{"used": result.used, "modules": sorted(m for m in ("pandas", "pydicom", "PIL")
                                                          if m in sys.modules)}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"used": 12, "modules": []}
    # and what it wrote reads back with pandas as the documented table
    assert list(read_metadata(tmp_path / "out").columns) == list(METADATA_COLUMNS)


def test_files_that_crash_decoders_or_bomb_memory_are_quarantined_and_the_run_goes_on(tmp_path):
    """What the fuzzer found (benchmarks/fuzz/): an RLE byte that makes the Rust decoder panic (a
    BaseException, which the process pool could not even pickle), a deflate bomb, a header that
    declares 65535 x 65535 pixels. Each is one quarantine row; the good files are used."""
    from conftest import deflate_bomb, fuzz_file

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(fuzz_file("rle_panic.dcm"), src / "rle_panic.dcm")
    (src / "bomb.dcm").write_bytes(deflate_bomb(1 << 30))
    huge = pydicom.dcmread(pydicom_file("MR_small_RLE.dcm"))
    huge.Rows = huge.Columns = 65535
    huge.save_as(src / "huge.dcm")
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(pydicom_file(name), src / name)
    res = ingest.run(IngestConfig(workers=2, shard_size=4), source_dir=src, out_dir=tmp_path / "out",
                     key=KEY)
    rows = {r["path"]: r for r in _read_csv(res.quarantine)}
    assert res.used == 2 and res.files_seen == 5
    assert {p: r["reason"] for p, r in rows.items()} == {
        "rle_panic.dcm": "decode_error", "bomb.dcm": "too_large", "huge.dcm": "too_large"}
    assert "RLE Lossless (1.2.840.10008.1.2.5) decoder crashed on this file" in rows["rle_panic.dcm"]["detail"]
    assert "PanicException" in rows["rle_panic.dcm"]["detail"]


def test_a_file_over_the_time_limit_stops_its_worker_and_is_quarantined_as_timeout(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(pydicom_file(name), src / name)
    # no file is read in 10 ms by a fresh worker (its imports alone take longer)
    cfg = IngestConfig(workers=2, file_timeout_s=0.01)
    res = ingest.run(cfg, source_dir=src, out_dir=tmp_path / "out", key=KEY)
    rows = _read_csv(res.quarantine)
    assert res.used == 0 and [r["reason"] for r in rows] == ["timeout", "timeout"]
    assert rows[0]["detail"] == ("reading this file took over ingest.file_timeout_s = 0.01 s: its "
                                 "worker process was stopped")
    # tried again by the next run (a timeout depends on the machine): now it has time
    again = ingest.run(cfg.model_copy(update={"file_timeout_s": 120}), source_dir=src,
                       out_dir=tmp_path / "out", key=KEY)
    assert again.used == 2 and again.decoded == 2


def test_process_guarded_makes_what_is_no_exception_the_files_decode_error(tmp_path, monkeypatch):
    """The guard every decoding path goes through (pool and Dask tasks, one-process runs,
    _isolate): a BaseException that is no process exit is the file's row, naming only its type;
    the stage's own failure and a request to stop pass through."""
    class Panic(BaseException):
        pass

    spec = ingest.WorkerSpec(IngestConfig(), KEY, None, tmp_path)

    def raising(exc):
        def process_file(spec, rel):
            raise exc
        return process_file

    monkeypatch.setattr(worker, "process_file", raising(Panic("PatientName^Quoted")))
    out = ingest.process_guarded(spec, "a.dcm")
    assert (out.path, out.reason, out.detail) == (
        "a.dcm", "decode_error", "reading this file failed unexpectedly (Panic)")
    for exc in (KeyboardInterrupt(), SystemExit(1), IngestError("cannot go on")):
        monkeypatch.setattr(worker, "process_file", raising(exc))
        with pytest.raises(type(exc)):
            ingest.process_guarded(spec, "a.dcm")


def test_a_worker_that_died_reading_one_file_is_a_timeout_only_past_the_limit():
    assert worker.died_reading("a.dcm", 0.5, 120).reason == "decode_error"
    assert worker.died_reading("a.dcm", 0.5, None).reason == "decode_error"
    late = worker.died_reading("a.dcm", 121.0, 120)
    assert (late.reason, late.detail) == (
        "timeout", "reading this file took over ingest.file_timeout_s = 120 s: its worker process "
                   "was stopped")
