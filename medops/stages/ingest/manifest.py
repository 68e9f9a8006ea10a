"""Labels for the ingest stage: from a CSV or Parquet manifest, or from folder names."""

from __future__ import annotations

import csv
from pathlib import Path

from medops.errors import IngestError


# Column names a manifest may use for medops' own (DICOM keywords, as hospitals' exports name them)
_ALIASES = {"sopinstanceuid": "sop_instance_uid", "sop_instance_uid": "sop_instance_uid",
            "label": "label", "split": "split", "path": "path"}


def _normalized(columns: list[str], rows: list[dict[str, str]]) -> tuple[list[str], list[dict[str, str]]]:
    names = {c: _ALIASES.get(c.strip().lower(), c) for c in columns}
    if list(names.values()) == columns:
        return columns, rows
    return list(names.values()), [{names.get(k, k): v for k, v in r.items()} for r in rows]


def _manifest_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Column names and rows (as strings) of a CSV or Parquet manifest, with ``SOPInstanceUID``
    read as ``sop_instance_uid``."""
    return _normalized(*_raw_manifest_rows(path))


def _raw_manifest_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if path.suffix.lower() in (".parquet", ".pq"):
        import pandas as pd

        try:
            df = pd.read_parquet(path)
        except Exception as exc:
            raise IngestError(f"manifest {path} cannot be read as Parquet: {exc}") from exc
        df = df.astype(object).where(df.notna(), "")
        return [str(c) for c in df.columns], [{k: str(v) for k, v in r.items()} for r in df.to_dict("records")]
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            return list(reader.fieldnames or ()), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IngestError(f"manifest {path} cannot be read: {exc}") from exc


def read_manifest(path: Path) -> dict[str, tuple[int | None, str | None]]:
    """Labels from a CSV or Parquet manifest, keyed ``uid:<original SOPInstanceUID>`` and
    ``path:<path relative to source_dir>``; values ``(label or None, split or None)``.

    A row is matched to a file by its original SOP Instance UID when it has one, else by its
    ``path`` (what the ``medops ingest --manifest`` help promises).

    Raises:
        IngestError: the file is missing or unreadable, lacks ``label`` or both key columns, has
            a label that is not 0/1/empty or a row with neither key, or gives one UID or path two
            different labels.
    """
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"manifest {path} does not exist")
    columns, rows = _manifest_rows(path)
    if "label" not in columns or not {"sop_instance_uid", "path"} & set(columns):
        raise IngestError(f"manifest {path} needs a label column and a sop_instance_uid or path "
                          f"column; has {columns}")
    labels: dict[str, tuple[int | None, str | None]] = {}
    for line, row in enumerate(rows, start=2):
        raw = (row.get("label") or "").strip()
        if raw in ("", "nan", "NA", "<NA>", "None"):
            label = None
        elif raw in ("0", "1", "0.0", "1.0"):
            label = int(float(raw))
        else:
            raise IngestError(f"manifest {path} line {line}: label must be 0, 1 or empty, got {raw!r}")
        split = (row.get("split") or "").strip() or None
        uid = (row.get("sop_instance_uid") or "").strip()
        rel = (row.get("path") or "").strip().replace("\\", "/")
        if not uid and not rel:
            raise IngestError(f"manifest {path} line {line}: neither sop_instance_uid nor path is "
                              f"given, so the row matches no file")
        for key in ([f"uid:{uid}"] if uid else []) + ([f"path:{rel}"] if rel and not uid else []):
            if key in labels and labels[key][0] != label:
                raise IngestError(f"manifest {path} line {line}: {key[key.index(':') + 1:]} has "
                                  f"labels {labels[key][0]} and {label}")
            labels[key] = (label, split)
    return labels


def is_manifest(path: Path) -> bool:
    """A CSV file whose header names ``label`` and ``SOPInstanceUID`` (or ``sop_instance_uid``, or
    ``path``): a label manifest, not a study. Any other file is a study to ingest."""
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    try:
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    columns = {_ALIASES.get(c.strip().lower()) for c in header}
    return "label" in columns and bool({"sop_instance_uid", "path"} & columns)


def find_manifests(source_dir: Path) -> list[Path]:
    """The label manifests in an export folder, at any depth, in path order: how labels arrive
    beside the studies (``*.csv`` with ``SOPInstanceUID,label[,split]``). Hidden files are not
    manifests (a copy still being written under a temporary name, e.g. by medops.atomic)."""
    source_dir = Path(source_dir)
    return sorted(p for p in source_dir.rglob("*.csv")
                  if not any(part.startswith(".") for part in p.relative_to(source_dir).parts)
                  and is_manifest(p))


def read_manifests(paths: list[Path]) -> dict[str, tuple[int | None, str | None]]:
    """:func:`read_manifest` of each file, merged. A file listed in no manifest has no label yet
    (it waits for one: quarantined as ``no_label`` and looked at again on the next run); a label
    for a file not seen yet waits for the file.

    Raises:
        IngestError: as :func:`read_manifest`, or two manifests give one UID or path two labels.
    """
    merged: dict[str, tuple[int | None, str | None]] = {}
    origin: dict[str, Path] = {}
    for path in paths:
        for key, value in read_manifest(path).items():
            if key in merged and merged[key][0] != value[0]:
                raise IngestError(f"manifests {origin[key]} and {path} give "
                                  f"{key[key.index(':') + 1:]} labels {merged[key][0]} and {value[0]}")
            merged[key], origin[key] = value, path
    return merged


# folder names that carry a label or a split when there is no manifest (e.g. the Kaggle
# chest-xray layout train/NORMAL, train/PNEUMONIA)
FOLDER_LABELS = {"normal": 0, "negative": 0, "pneumonia": 1, "positive": 1, "abnormal": 1}
FOLDER_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


def labels_from_path(rel: str) -> tuple[int | None, str | None]:
    """``(label, split)`` from the folder names of a relative path (nearest folder wins)."""
    label: int | None = None
    split: str | None = None
    for part in reversed(rel.split("/")[:-1]):
        low = part.strip().lower()
        if label is None and low in FOLDER_LABELS:
            label = FOLDER_LABELS[low]
        if split is None and low in FOLDER_SPLITS:
            split = FOLDER_SPLITS[low]
    return label, split
