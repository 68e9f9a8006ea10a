"""The processed-dataset format that ingest writes and training, evaluation and export read.

Layout below an ingest output folder (``data/ingested``):

- ``arrays/shard-00000.npy`` ...: float32 arrays shaped (n, S, S), values in [0, 1], S = image_size.
- ``metadata.parquet``: one row per usable image, with (at least) the columns in METADATA_COLUMNS;
  ``shard`` and ``shard_index`` locate the image's pixels.
- ``quarantine.csv``: ``path``, ``reason``, ``detail`` for every file not used.
- ``dicom/``: the de-identified DICOM files (``deid_path`` is relative to the ingest folder).

numpy + pandas only: no TensorFlow here (and pandas only where a table is read: ingest's main
process imports this module for its names long before it needs pandas).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

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
    "deid_path",
    "shard",
    "shard_index",
)


def shard_path(ingested_dir: Path, shard: int) -> Path:
    return Path(ingested_dir) / ARRAYS_DIR / f"shard-{shard:05d}.npy"


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
