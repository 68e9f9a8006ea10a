"""The processed-dataset format that ingest writes and training, evaluation and export read.

Layout below an ingest output folder (``data/ingested``):

- ``arrays/shard-00000.npy`` ...: float32 arrays shaped (n, S, S), values in [0, 1], S = image_size.
- ``dicom/shard-00000.zip`` ...: the de-identified DICOM files of the same rows, one uncompressed
  zip per shard (a central directory at its end, so one file is read without unpacking the rest;
  ``unzip`` in the ingest folder puts each at its ``deid_path``).
- ``metadata.parquet``: one row per usable image, with (at least) the columns in METADATA_COLUMNS;
  ``shard`` and ``shard_index`` locate the image's pixels and its de-identified file.
- ``quarantine.csv``: ``path``, ``reason``, ``detail`` for every file not used.

So the dataset is a bounded number of files whatever the number of images: two per shard and a
few more (DVC pushes, pulls and hashes files: a million small objects cost far more than a few
hundred large ones). :func:`read_deidentified` gives one file's bytes by its row or
:func:`find_row` by its (pseudonymous) SOP Instance UID.

Also the split table (``data/split/split.csv``, written by the split stage) and one split's
rows and pixels (``load_split_images``), which train, evaluate, explain, gate and export read.

numpy + pandas only: no TensorFlow here (and pandas only where a table is read: ingest's main
process imports this module for its names long before it needs pandas).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medops.errors import SplitError

if TYPE_CHECKING:
    import pandas as pd

ARRAYS_DIR = "arrays"
METADATA_COLUMNS = (
    "sop_instance_uid",     # pseudonymous (replaced) UID
    "study_instance_uid",   # pseudonymous
    "series_instance_uid",  # pseudonymous
    "patient_id",           # stable pseudonym
    "patient_sex",          # M / F / O / None
    "patient_age",          # whole years at the study, from the original header (None if unknown)
    "modality",
    "rows",
    "columns",
    "label",                # 0 / 1, from the manifest (nullable Int64)
    "manifest_split",       # the manifest's split column if it had one (train / val / test), else None
    "pixel_mean",           # statistics of the preprocessed image, in [0, 1]
    "pixel_std",
    "pixel_min",
    "pixel_max",
    "content_sha256",       # hash of the source file's bytes: identity for incremental ingest
    "deid_path",            # the de-identified file: dicom/<study>/<sop>.dcm, a member of its shard's pack
    "shard",
    "shard_index",
)


DICOM_DIR = "dicom"


def shard_path(ingested_dir: Path, shard: int) -> Path:
    return Path(ingested_dir) / ARRAYS_DIR / f"shard-{shard:05d}.npy"


def pack_path(ingested_dir: Path, shard: int) -> Path:
    """The zip holding the de-identified files of shard ``shard``'s rows."""
    return Path(ingested_dir) / DICOM_DIR / f"shard-{shard:05d}.zip"


def read_deidentified(ingested_dir: Path, row: Any) -> bytes:
    """The de-identified DICOM file of a metadata row (a mapping or a pandas row with ``shard`` and
    ``deid_path``), read from its shard's pack alone.

    Raises:
        KeyError: the pack does not hold the file (the folder is not what its metadata says).
        FileNotFoundError: no pack for the row's shard.
    """
    import zipfile

    with zipfile.ZipFile(pack_path(ingested_dir, int(row["shard"]))) as pack:
        return pack.read(str(row["deid_path"]))


def find_row(ingested_dir: Path, sop_instance_uid: str) -> dict[str, Any] | None:
    """The metadata row of the image with this (pseudonymous) SOP Instance UID, or None; only the
    row groups whose statistics can hold it are read."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(ingested_dir) / "metadata.parquet",
                          filters=[("sop_instance_uid", "=", sop_instance_uid)])
    rows = table.to_pylist()
    return rows[0] if rows else None


def read_metadata(ingested_dir: Path) -> pd.DataFrame:
    import pandas as pd

    return pd.read_parquet(Path(ingested_dir) / "metadata.parquet")


def load_images(ingested_dir: Path, metadata: pd.DataFrame) -> np.ndarray:
    """Pixels for ``metadata``'s rows, in its row order, shaped (n, S, S, 1) float32.

    Shards are memory-mapped, so only the selected rows are read into memory.
    """
    if len(metadata) == 0:
        raise ValueError("no rows selected")
    out: np.ndarray | None = None
    shards = metadata["shard"].to_numpy()
    index = metadata["shard_index"].to_numpy()
    for shard in np.unique(shards):
        arr = np.load(shard_path(ingested_dir, int(shard)), mmap_mode="r")
        if out is None:
            out = np.empty((len(metadata), *arr.shape[1:], 1), dtype=np.float32)
        rows = np.nonzero(shards == shard)[0]
        out[rows, ..., 0] = arr[index[rows]]
    assert out is not None
    return out


SPLITS = ("train", "val", "test")


SPLIT_COLUMNS = ("sop_instance_uid", "patient_id", "label", "split")


def check_patient_disjoint(frame: pd.DataFrame) -> None:
    """Raise SplitError if any patient_id has images in more than one split."""
    per_patient = frame.groupby("patient_id")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        examples = ", ".join(map(str, leaked.index[:5]))
        raise SplitError(
            f"patient-level split violated: {len(leaked)} patient(s) in more than one split "
            f"(e.g. {examples})"
        )


def read_split(path: Path) -> pd.DataFrame:
    """Read split.csv and re-check that no patient crosses splits."""
    import pandas as pd

    table = pd.read_csv(path, dtype={"sop_instance_uid": str, "patient_id": str, "split": str})
    missing = set(SPLIT_COLUMNS) - set(table.columns)
    if missing:
        raise SplitError(f"{path} lacks column(s) {sorted(missing)}")
    check_patient_disjoint(table)
    return table


def select_split(ingested_dir: Path, split: Path, name: str) -> pd.DataFrame:
    """Metadata rows (with ``label`` from split.csv) of one split, in split.csv order."""
    if name not in SPLITS:
        raise SplitError(f"unknown split {name!r}; splits: {', '.join(SPLITS)}")
    table = read_split(Path(split))
    chosen = table[table["split"] == name]
    if len(chosen) == 0:
        raise SplitError(f"split {name!r} in {split} has no images")
    meta = read_metadata(Path(ingested_dir)).drop(columns=["label"], errors="ignore")
    rows = chosen.merge(
        meta.drop(columns=["patient_id"], errors="ignore"), on="sop_instance_uid", how="left",
        validate="one_to_one",
    )
    lost = rows["shard"].isna().sum()
    if lost:
        raise SplitError(f"{lost} image(s) of split {name!r} are not in {ingested_dir}/metadata.parquet")
    rows["shard"] = rows["shard"].astype(int)
    rows["shard_index"] = rows["shard_index"].astype(int)
    return rows.reset_index(drop=True)


def load_split_images(
    ingested_dir: Path, split: Path, name: str
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Pixels (n, S, S, 1) float32, labels (n,) float32 and metadata rows of one split."""
    rows = select_split(ingested_dir, split, name)
    images = load_images(Path(ingested_dir), rows)
    labels = rows["label"].to_numpy(dtype=np.float32)
    return images, labels, rows
