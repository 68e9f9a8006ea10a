"""Publishing an ingest output as the dataset that DVC versions, without one identifying string.

The ingest stage's own output folder holds, beside the de-identified dataset, two files that name
the export's files by their paths: ``ingest_index.json`` (what the next incremental run may reuse)
and ``quarantine.csv`` (what an operator must find and fix). Hospitals often build those paths from
a patient's name and record number (``Doe_John_MRN123/...``), so that folder stays private (below
``.medops/``, never versioned or published), and :func:`publish_dataset` makes the versioned
dataset from it: every other file hard-linked (no copy, no extra disk), and a ``quarantine.csv``
that names each quarantined file by a keyed pseudonym (``file_id``) with its reason, no path and
no detail (a detail can quote another file's path).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import shutil
from pathlib import Path

from medops.atomic import crash_point
from medops.stages.ingest.index import INDEX_NAME

# what stays in the private ingest folder: the paths of the export live there
PRIVATE = ("quarantine.csv", INDEX_NAME, ".staging", ".medops-ingest")
PUBLISHED_QUARANTINE_COLUMNS = ("file_id", "reason")


def file_id(rel: str, key: bytes) -> str:
    """A quarantined file's name in the published dataset: HMAC-SHA256 of its path under the
    de-identification key (stable across runs; only the key's holder can link it to the path,
    through the private report)."""
    return "file-" + hmac.new(key, b"export-path\0" + rel.encode(), hashlib.sha256).hexdigest()[:20]


def published_quarantine(private_csv: Path, key: bytes) -> str:
    """The published quarantine list's text: ``file_id,reason`` for each row of the private one."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PUBLISHED_QUARANTINE_COLUMNS)
    if private_csv.is_file():
        with private_csv.open(newline="") as fh:
            for row in csv.DictReader(fh):
                writer.writerow((file_id(row["path"], key), row["reason"]))
    return out.getvalue()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b) or (a.stat().st_size == b.stat().st_size
                                          and a.read_bytes() == b.read_bytes())
    except OSError:
        return False


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content, atomically: a hard link, or a copy across devices."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _published_files(work_dir: Path) -> list[str]:
    """The files of ``work_dir`` to publish, relative, metadata.parquet last: it is what readers
    start from, so a publication cut short never pairs a new table with shards not yet there."""
    found = []
    for folder, dirs, files in os.walk(work_dir):
        rel_folder = Path(folder).relative_to(work_dir)
        dirs[:] = sorted(d for d in dirs if not (rel_folder == Path(".") and d in PRIVATE))
        found += [(rel_folder / name).as_posix() for name in sorted(files)]
    return sorted((rel for rel in found if rel not in PRIVATE), key=lambda rel: rel == "metadata.parquet")


def publish_dataset(work_dir: Path, dataset_dir: Path, key: bytes) -> bool:
    """Make ``dataset_dir`` the PHI-free copy of the ingest output in ``work_dir``; returns whether
    anything in it changed (an unchanged dataset keeps its DVC version)."""
    work_dir, dataset_dir = Path(work_dir), Path(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    changed = False
    wanted: set[str] = set()
    for rel in _published_files(work_dir):
        wanted.add(rel)
        if not _same_file(work_dir / rel, dataset_dir / rel):
            _link(work_dir / rel, dataset_dir / rel)
            changed = True
            crash_point("ingest.publishing")
    text = published_quarantine(work_dir / "quarantine.csv", key)
    target = dataset_dir / "quarantine.csv"
    if not target.is_file() or target.read_text() != text:
        tmp = target.with_name(".quarantine.csv.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        changed = True
    wanted.add("quarantine.csv")
    for folder, dirs, files in os.walk(dataset_dir, topdown=False):
        for name in files:
            rel = (Path(folder).relative_to(dataset_dir) / name).as_posix()
            if rel not in wanted and not name.startswith(".gitignore"):
                (Path(folder) / name).unlink()
                changed = True
        if Path(folder) != dataset_dir and not any(Path(folder).iterdir()):
            Path(folder).rmdir()
    return changed
