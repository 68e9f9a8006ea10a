"""The dataset's layout at scale: a bounded number of files whatever the number of images, one
de-identified file reachable alone by its UID, and incremental runs that write only the shards
that change (so DVC pushes only those)."""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import pydicom
import pytest

from medops.config import IngestConfig
from medops.data import find_row, read_deidentified, read_metadata
from medops.stages import ingest

from _small_export import write_small_export

KEY = b"layout-test-key-0123456789abcdef"


def _files(out: Path) -> dict[str, tuple[int, str]]:
    """Every file of the dataset: (mtime, sha256) by path."""
    return {p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(out.rglob("*")) if p.is_file()}


def _changed(before: dict, after: dict) -> set[str]:
    """Files whose content is new; and a check that every shard file whose content is not was not
    written at all (same mtime): the small tables are rewritten whole, shards only when they change."""
    for path, (mtime, sha) in after.items():
        if path.startswith(("arrays/", "dicom/")) and before.get(path, (0, ""))[1] == sha:
            assert before[path][0] == mtime, f"{path} was rewritten unchanged"
    return {p for p in after if after[p][1] != before.get(p, (0, ""))[1]}


@pytest.mark.slow
def test_3000_files_make_a_number_of_objects_set_by_the_shards_not_the_files(tmp_path):
    src = write_small_export(tmp_path / "src", 3000)
    res = ingest.run(IngestConfig(workers=2, image_size=8, shard_size=1024), source_dir=src,
                     out_dir=tmp_path / "out", key=KEY)
    assert (res.used, res.shards) == (3000, 3)
    files = _files(tmp_path / "out")
    # two files per shard and four more, whatever the number of images (one per image: 3000+)
    assert len(files) == 2 * res.shards + 4
    # any one file alone, by its UID
    row = read_metadata(tmp_path / "out").iloc[2345]
    found = find_row(tmp_path / "out", row["sop_instance_uid"])
    ds = pydicom.dcmread(io.BytesIO(read_deidentified(tmp_path / "out", found)))
    assert ds.SOPInstanceUID == row["sop_instance_uid"]


def test_incremental_runs_write_only_the_shards_that_change(tmp_path):
    src = write_small_export(tmp_path / "src", 40)  # series000 (50 files: 40 here) ... + 2 bad files
    out = tmp_path / "out"
    cfg = IngestConfig(workers=1, image_size=8, shard_size=8)
    first = ingest.run(cfg, source_dir=src, out_dir=out, key=KEY)
    assert (first.used, first.shards) == (40, 5)
    before = _files(out)

    # a removed file: its shard (and only it) is rewritten without it
    (src / "series000" / "IM00009.dcm").unlink()  # the second file of shard 1
    removed = ingest.run(cfg, source_dir=src, out_dir=out, key=KEY)
    after = _files(out)
    changed = _changed(before, after)
    assert changed == {"arrays/shard-00001.npy", "dicom/shard-00001.zip", "metadata.parquet", "ingest_index.json"}
    assert (removed.used, removed.shards, removed.shards_written) == (39, 5, 1)
    md = read_metadata(out)
    assert sorted(md[md["shard"] == 1]["shard_index"]) == list(range(7))
    with zipfile.ZipFile(out / "dicom" / "shard-00001.zip") as z:
        assert z.namelist() == md[md["shard"] == 1].sort_values("shard_index")["deid_path"].tolist()

    # new files: the last shard is topped up, the rest go to a new shard; the others are untouched
    write_small_export(tmp_path / "more", 52)
    for p in sorted((tmp_path / "more" / "series000").glob("IM0004*.dcm")) + \
            sorted((tmp_path / "more" / "series001").glob("*.dcm")):
        target = src / p.relative_to(tmp_path / "more")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, target)
    before = after
    grown = ingest.run(cfg, source_dir=src, out_dir=out, key=KEY)
    after = _files(out)
    changed = _changed(before, after)
    assert grown.decoded == 12 and grown.used == 39 + 12
    # shard 4 was full (8 rows): new rows start shard 5, then 6
    assert changed == {"arrays/shard-00005.npy", "dicom/shard-00005.zip", "arrays/shard-00006.npy",
                       "dicom/shard-00006.zip", "metadata.parquet", "ingest_index.json"}
    assert grown.shards_written == 2 and grown.shards == 7

    # a partial last shard is topped up: shard 6 holds 4 rows, 4 more fit
    more = tmp_path / "more2"
    write_small_export(more, 60)
    for p in sorted((more / "series001").glob("IM0005[2-5].dcm")):
        shutil.copy(p, src / "series001" / p.name)
    before = after
    topped = ingest.run(cfg, source_dir=src, out_dir=out, key=KEY)
    after = _files(out)
    assert _changed(before, after) == {
        "arrays/shard-00006.npy", "dicom/shard-00006.zip", "metadata.parquet", "ingest_index.json"}
    assert (topped.decoded, topped.shards, topped.shards_written) == (4, 7, 1)

    # a shard that loses every row is deleted; a rerun changes nothing
    for i in range(16, 24):
        (src / "series000" / f"IM{i:05d}.dcm").unlink()
    emptied = ingest.run(cfg, source_dir=src, out_dir=out, key=KEY)
    assert not (out / "arrays" / "shard-00002.npy").exists() and not (out / "dicom" / "shard-00002.zip").exists()
    assert (emptied.shards, emptied.shards_written) == (6, 0)
    before = _files(out)
    again = ingest.run(cfg, source_dir=src, out_dir=out, key=KEY)
    assert again.changed is False and _files(out) == before

    # whatever the history, the dataset holds what a full rebuild holds
    from test_ingest import _same_dataset

    ingest.run(cfg.model_copy(update={"incremental": False}), source_dir=src, out_dir=tmp_path / "full", key=KEY)
    _same_dataset(out, tmp_path / "full")
