"""The ingest stage's writers: array shards, metadata.parquet (in row groups, without pandas),
quarantine.csv's columns, and the pruning of de-identified files no row points at."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np


QUARANTINE_COLUMNS = ("path", "reason", "detail")


class _ShardWriter:
    """Writes images into ``root/arrays/shard-NNNNN.npy`` as each shard fills (bounded memory).

    One shard-sized array is allocated once and filled in place: allocating and freeing a shard's
    worth per shard (as ``np.stack`` does) makes the allocator serve later ones from the heap,
    which then cannot shrink past the small objects kept meanwhile, and the process grows a little
    with every shard.
    """

    def __init__(self, root: Path, shard_size: int) -> None:
        self.root, self.shard_size = root, shard_size
        self.buffer: np.ndarray | None = None
        self.filled = 0
        self.shards = 0

    def add(self, image: np.ndarray) -> tuple[int, int]:
        image = np.asarray(image, dtype=np.float32)
        if self.buffer is None or self.buffer.shape[1:] != image.shape:
            self.flush()
            self.buffer = np.empty((self.shard_size, *image.shape), dtype=np.float32)
        where = (self.shards, self.filled)
        self.buffer[self.filled] = image
        self.filled += 1
        if self.filled == self.shard_size:
            self.flush()
        return where

    def flush(self) -> None:
        from medops.data import shard_path

        if not self.filled:
            return
        assert self.buffer is not None
        path = shard_path(self.root, self.shards)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, self.buffer[:self.filled])
        self.filled = 0
        self.shards += 1


_ROW_GROUP = 1024  # metadata rows held before they are written: bounds memory, not the output
_STRING_COLUMNS = ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "patient_id",
                   "patient_sex", "modality", "manifest_split", "content_sha256", "deid_path")
_FLOAT_COLUMNS = ("pixel_mean", "pixel_std", "pixel_min", "pixel_max")
_NULLABLE_INT_COLUMNS = ("label", "patient_age")  # pandas' Int64: may hold nulls


class _MetadataWriter:
    """Metadata rows into a Parquet file of row groups as they arrive (memory: one row group).

    The file it writes has plain types (string / int64 / double); :func:`_write_metadata` turns it
    into the final ``metadata.parquet``, whose schema depends on all the rows (see there).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.sample: dict[str, Any] = {}  # per column, the first value that is not None
        self.count = 0
        self._writer: Any = None
        self._schema: Any = None

    def add(self, row: dict[str, Any]) -> None:
        for col in _FLOAT_COLUMNS:  # pandas would store NaN as null: so do we
            if row[col] is not None and math.isnan(row[col]):
                row[col] = None
        for col, value in row.items():
            if value is not None and self.sample.get(col) is None:
                self.sample[col] = value
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= _ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from medops.data import METADATA_COLUMNS

        if not self.rows:
            return
        if self._writer is None:  # every text column a string: the final schema is decided later
            schema = pa.schema([(c, _column_types(c, present=True)[0]) for c in METADATA_COLUMNS])
            self._writer = pq.ParquetWriter(self.path, schema)
            self._schema = schema
        self._writer.write_table(pa.Table.from_arrays(
            [_arrow_column([row[f.name] for row in self.rows], f.type) for f in self._schema],
            schema=self._schema))
        self.rows = []

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _arrow_column(values: list[Any], arrow_type: Any) -> Any:
    """An Arrow string, int64 or float64 array of ``values`` (None: null), built from its buffers:
    ``pa.array`` on Python values imports pandas (pyarrow checks every input for pandas types),
    ~0.4 s of CPU the main process would take from the workers while they decode."""
    import pyarrow as pa

    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
    if arrow_type == pa.string():
        data = [v.encode("utf-8") if v is not None else b"" for v in values]
        offsets = np.zeros(len(data) + 1, dtype=np.int32)
        np.cumsum([len(d) for d in data], out=offsets[1:])
        buffers = [bitmap, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))]
    else:
        dtype = np.float64 if arrow_type == pa.float64() else np.int64
        buffers = [bitmap, pa.py_buffer(np.array([0 if v is None else v for v in values], dtype=dtype))]
    return pa.Array.from_buffers(arrow_type, len(values), buffers, null_count=int(len(values) - valid.sum()))


def _write_metadata(parts: _MetadataWriter, target: Path) -> None:
    """Write ``metadata.parquet`` from the rows ``parts`` wrote, one row group at a time.

    It reads back exactly as ``metadata_frame(rows).to_parquet(target, index=False)`` would, without
    holding the rows: the schema, pandas' metadata included (nullable Int64 label and age), comes
    from a one-row frame of each column's first non-null value, so a column that is None in every
    row is stored as pandas stores it (Arrow's null type) and every other keeps its type.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _metadata_schema(parts.sample)
    if parts.count == 0:  # (schema.empty_table() would import pandas)
        pq.write_table(pa.Table.from_arrays([pa.nulls(0, f.type) for f in schema], schema=schema), target)
        return
    source = pq.ParquetFile(parts.path)
    try:
        with pq.ParquetWriter(target, schema) as out:
            for group in range(source.num_row_groups):
                table = source.read_row_group(group)
                out.write_table(pa.Table.from_arrays(
                    [pa.nulls(table.num_rows) if schema.field(c).type == pa.null() else table.column(c)
                     for c in schema.names], schema=schema))
    finally:
        source.close()


def _column_types(name: str, present: bool) -> tuple[Any, str, str]:
    """A metadata column's (Arrow type, pandas type, numpy type), as pandas writes it: a text
    column with no value (``present`` False) is Arrow's null type, pandas' "empty"; label and age
    are nullable Int64."""
    import pyarrow as pa

    if name in _STRING_COLUMNS:
        return (pa.string(), "unicode", "object") if present else (pa.null(), "empty", "object")
    if name in _FLOAT_COLUMNS:
        return pa.float64(), "float64", "float64"
    return pa.int64(), "int64", "Int64" if name in _NULLABLE_INT_COLUMNS else "int64"


def _metadata_schema(sample: dict[str, Any]) -> Any:
    """metadata.parquet's Arrow schema, pandas' metadata included, exactly as
    ``pa.Table.from_pandas(metadata_frame([sample]), preserve_index=False).schema`` (tested), but
    without importing pandas (~0.4 s of CPU, taken from the workers while they decode); each
    column's types from :func:`_column_types`, a text column being "present" when ``sample`` has a
    value for it."""
    import importlib.metadata
    import json

    import pyarrow as pa

    from medops.data import METADATA_COLUMNS

    fields, columns = [], []
    for name in METADATA_COLUMNS:
        arrow, pandas_type, numpy_type = _column_types(name, present=sample.get(name) is not None)
        fields.append(pa.field(name, arrow))
        columns.append({"name": name, "field_name": name, "pandas_type": pandas_type,
                        "numpy_type": numpy_type, "metadata": None})
    pandas_metadata = {"index_columns": [], "column_indexes": [], "columns": columns, "attributes": {},
                       "creator": {"library": "pyarrow", "version": pa.__version__},
                       "pandas_version": importlib.metadata.version("pandas")}
    return pa.schema(fields, metadata={b"pandas": json.dumps(pandas_metadata).encode()})


def metadata_frame(records: Iterable[dict[str, Any]]):
    """The metadata table with the documented columns and dtypes (label/age nullable Int64)."""
    from medops.data import METADATA_COLUMNS
    import pandas as pd

    df = pd.DataFrame(list(records), columns=list(METADATA_COLUMNS))
    for col in _NULLABLE_INT_COLUMNS:
        df[col] = df[col].astype("Int64")
    for col in ("rows", "columns", "shard", "shard_index"):
        df[col] = df[col].astype("int64")
    for col in _FLOAT_COLUMNS:
        df[col] = df[col].astype("float64")
    for col in _STRING_COLUMNS:
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df


def _prune_dicom(dicom_dir: Path, keep: set[bytes]) -> None:
    """Delete de-identified files no metadata row points at (removed sources, duplicates, temps).

    ``keep``: :func:`_digest` of each kept ``deid_path``. The folder is read as it is walked.
    """
    def prune(folder: str, prefix: str) -> bool:  # True when the folder is left empty
        empty = True
        subfolders = []
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(entry.name)
                elif entry.is_file() and _digest(prefix + entry.name) not in keep:
                    os.unlink(entry.path)
                else:
                    empty = False
        for name in sorted(subfolders):
            if prune(os.path.join(folder, name), f"{prefix}{name}/"):
                os.rmdir(os.path.join(folder, name))
            else:
                empty = False
        return empty

    prune(os.fspath(dicom_dir), dicom_dir.name + "/")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
