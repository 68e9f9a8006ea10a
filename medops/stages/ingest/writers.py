"""The ingest stage's writers: shards (an array and a pack of de-identified files each),
metadata.parquet (in row groups, without pandas) and quarantine.csv's columns."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from medops.errors import IngestError

if TYPE_CHECKING:
    from medops.stages.ingest.worker import Spilled


QUARANTINE_COLUMNS = ("path", "reason", "detail")


def _zip_entry(name: str) -> Any:
    """A pack member's header, the same whenever and wherever it is written (the same inputs give
    the same bytes): no timestamp, stored uncompressed (DICOM pixel data is compressed or not by
    its transfer syntax; deflating it again costs CPU on every read for little)."""
    import zipfile

    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3
    info.external_attr = 0o644 << 16
    return info


class _SpillFiles:
    """Reads the de-identified files workers left in spill files (see
    :class:`~medops.stages.ingest.pool.LocalPool`) into packs: one spill file open at a time; as
    outcomes come in source order and a chunk's are contiguous, a spill file is deleted once the
    next one is asked for (and the last one by :meth:`close`)."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.fd: int | None = None

    def fd_of(self, path: str) -> int:
        if path != self.path:
            self.close()
            self.fd, self.path = os.open(path, os.O_RDONLY), path
        assert self.fd is not None
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            assert self.path is not None
            Path(self.path).unlink(missing_ok=True)
        self.fd = self.path = None


def _copy_range(src: int, dst: int, size: int, src_at: int, dst_at: int) -> None:
    """``size`` bytes from ``src_at`` in ``src`` to ``dst_at`` in ``dst`` (file descriptors):
    inside the kernel where it can (``copy_file_range``: Linux), else read and written here."""
    try:
        if not hasattr(os, "copy_file_range"):  # macOS
            raise OSError(errno.ENOSYS, "no copy_file_range")
        while size:
            copied = os.copy_file_range(src, dst, size, src_at, dst_at)
            if not copied:
                raise OSError(0, "the spill file is shorter than its outcomes say")
            size, src_at, dst_at = size - copied, src_at + copied, dst_at + copied
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            raise
    while size:
        chunk = os.pread(src, min(size, 1 << 24), src_at)
        if not chunk:
            raise OSError(0, "the spill file is shorter than its outcomes say")
        written = os.pwrite(dst, chunk, dst_at)
        size, src_at, dst_at = size - written, src_at + written, dst_at + written


def _add_member(pack: Any, name: str, data: "bytes | Spilled", spills: _SpillFiles) -> None:
    """Add one stored member to ``pack`` (a ``zipfile.ZipFile`` open for writing), byte for byte
    as ``pack.writestr(_zip_entry(name), bytes)`` writes it (tested), from ``data``'s bytes or
    from a spill file, whose CRC-32 the worker computed and whose bytes are copied inside the
    kernel: the main process, which every file's outputs go through, neither checksums nor copies
    a de-identified file itself. (It drives ``zipfile``'s writing state as
    ``ZipFile._open_to_write`` and ``_ZipWriteFile.close`` do, for a member whose size and
    checksum are known before it is written.)"""
    import zipfile

    info = _zip_entry(name)
    spilled = not isinstance(data, bytes)
    size = data.size if spilled else len(data)  # type: ignore[union-attr]
    info.file_size = info.compress_size = size
    info.CRC = data.crc if spilled else zlib.crc32(data)  # type: ignore[union-attr]
    info.flag_bits = 0
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    if pack._writing:
        raise ValueError("a pack member is being written")
    fp = pack.fp
    fp.seek(pack.start_dir)
    info.header_offset = fp.tell()
    pack._writecheck(info)
    pack._didModify = True
    fp.write(info.FileHeader(zip64))
    if spilled:
        fp.flush()
        at = fp.tell()
        _copy_range(spills.fd_of(data.path), fp.fileno(), size, data.offset, at)  # type: ignore[union-attr]
        fp.seek(at + size)
    else:
        fp.write(data)
    pack.start_dir = fp.tell()
    pack.filelist.append(info)
    pack.NameToInfo[info.filename] = info


def _write_failed(path: Path, exc: OSError) -> IngestError:
    # the path holds pseudonymous UIDs only, and the OS's reason names no header value
    return IngestError(f"cannot write {path}: {exc.strerror or type(exc).__name__}")


class _ShardWriter:
    """Writes shards below ``root`` as they fill (bounded memory): each image into
    ``arrays/shard-NNNNN.npy``, each de-identified file into ``dicom/shard-NNNNN.zip`` (streamed:
    a pack is never held in memory). Shards are numbered from ``first``; the rows of the first one
    are placed from ``start`` on (it tops up an earlier shard that holds ``start`` rows: only the
    new rows are written here, see :func:`_merge_shard`).

    One shard-sized array is allocated once and filled in place: allocating and freeing a shard's
    worth per shard (as ``np.stack`` does) makes the allocator serve later ones from the heap,
    which then cannot shrink past the small objects kept meanwhile, and the process grows a little
    with every shard.

    Raises (``add``, ``flush``):
        IngestError: a shard cannot be written (disk full, no permission): the stage's failure.
    """

    def __init__(self, root: Path, shard_size: int, first: int = 0, start: int = 0) -> None:
        self.root, self.shard_size, self.first, self.start = root, shard_size, first, start
        self.buffer: np.ndarray | None = None
        self.pack: Any = None
        self.filled = 0
        self.shards = 0  # shards written so far
        self.rows: list[int] = []  # rows per shard written
        self.spills = _SpillFiles()

    @property
    def current(self) -> int:
        return self.first + self.shards

    def add(self, image: np.ndarray, name: str, data: "bytes | Spilled") -> tuple[int, int]:
        """Add one row (its de-identified file as bytes or in a worker's spill file); returns its
        ``(shard, shard_index)``."""
        import zipfile

        from medops.data import pack_path

        image = np.asarray(image, dtype=np.float32)
        if self.buffer is None or self.buffer.shape[1:] != image.shape:
            self.flush()
            self.buffer = np.empty((self.shard_size, *image.shape), dtype=np.float32)
        where = (self.current, self.start + self.filled)
        if self.pack is None:
            path = pack_path(self.root, self.current)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.pack = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED)
            except OSError as exc:
                raise _write_failed(path, exc) from exc
        try:
            _add_member(self.pack, name, data, self.spills)
        except OSError as exc:
            raise _write_failed(pack_path(self.root, self.current), exc) from exc
        self.buffer[self.filled] = image
        self.filled += 1
        if self.start + self.filled == self.shard_size:
            self.flush()
        return where

    def flush(self) -> None:
        from medops.data import shard_path

        if not self.filled:
            return
        assert self.buffer is not None and self.pack is not None
        path = shard_path(self.root, self.current)
        try:
            self.pack.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, self.buffer[:self.filled])
        except OSError as exc:
            raise _write_failed(path, exc) from exc
        self.pack = None
        self.rows.append(self.filled)
        self.filled = self.start = 0
        self.shards += 1


def _merge_shard(target: Path, shard: int, parts: list[tuple[Path, int, np.ndarray | None]]) -> int:
    """Write shard ``shard`` below ``target`` from ``parts``: ``(folder, shard, keep)`` each, the
    rows of that folder's shard whose ``keep`` mask is True (None: all), in order. Returns the rows
    written. Used by incremental runs for the only shards they change: one that lost rows
    (compacted) and the last one, topped up with new rows."""
    import zipfile

    from medops.data import pack_path, shard_path

    arrays, names_in = [], []
    for folder, number, keep in parts:
        arr = np.load(shard_path(folder, number), mmap_mode="r")
        with zipfile.ZipFile(pack_path(folder, number)) as pack:
            names = pack.namelist()
        if len(names) != len(arr):
            raise IngestError(f"{pack_path(folder, number)} holds {len(names)} files for "
                              f"{len(arr)} images: the dataset folder was changed by hand?")
        chosen = np.arange(len(arr)) if keep is None else np.flatnonzero(keep)
        arrays.append(arr[chosen])
        names_in.append((pack_path(folder, number), [names[i] for i in chosen]))
    out_arr, out_pack = shard_path(target, shard), pack_path(target, shard)
    try:
        out_arr.parent.mkdir(parents=True, exist_ok=True)
        out_pack.parent.mkdir(parents=True, exist_ok=True)
        np.save(out_arr, np.concatenate(arrays))
        with zipfile.ZipFile(out_pack, "w", zipfile.ZIP_STORED) as out:
            for source, names in names_in:
                with zipfile.ZipFile(source) as pack:
                    for name in names:
                        out.writestr(_zip_entry(name), pack.read(name))
    except OSError as exc:
        raise _write_failed(out_pack, exc) from exc
    return sum(len(a) for a in arrays)


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


def _write_metadata(parts: _MetadataWriter, target: Path, remap: dict[int, np.ndarray] | None = None) -> None:
    """Write ``metadata.parquet`` from the rows ``parts`` wrote, one row group at a time;
    ``remap[shard][old shard_index]`` is the new ``shard_index`` of rows in shards an incremental
    run compacted.

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
                if remap:
                    table = _remapped(table, remap)
                out.write_table(pa.Table.from_arrays(
                    [pa.nulls(table.num_rows) if schema.field(c).type == pa.null() else table.column(c)
                     for c in schema.names], schema=schema))
    finally:
        source.close()


def _remapped(table: Any, remap: dict[int, np.ndarray]) -> Any:
    import pyarrow as pa

    shard = table.column("shard").to_numpy()
    index = table.column("shard_index").to_numpy().astype(np.int64)  # a copy
    for number in np.unique(shard):
        if int(number) in remap:
            rows = shard == number
            index[rows] = remap[int(number)][index[rows]]
    column = pa.Array.from_buffers(pa.int64(), len(index), [None, pa.py_buffer(index)])  # (see _arrow_column)
    return table.set_column(table.schema.get_field_index("shard_index"), "shard_index", column)


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


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
