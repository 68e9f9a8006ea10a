"""The incremental index: the settings fingerprint, ``ingest_index.json``, and what an earlier
run with the same fingerprint left for each file."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from medops.config import IngestConfig
from medops.errors import QuarantineReason
from medops.stages.ingest.pool import _Item
from medops.stages.ingest.source import _sha256_file


# bumped when the outputs change for the same input (2: the preamble is zeroed; 3: the pixel
# statistics are computed in float64; 4: de-identified files packed per shard, dicom/shard-N.zip;
# 5: the de-identification profile built from PS3.15 Table E.1-1, which removes or empties about
# 150 attributes the earlier table kept), so that an incremental run does not keep rows and files
# written the old way. A change to medops.dicom.deid's profile must bump it too: files
# de-identified under the old profile would otherwise be kept.
OUTPUT_VERSION = 5


def _write_index_entry(fh: Any, first: bool, rel: str, sha: str) -> None:
    import json

    fh.write(("\n" if first else ",\n") + json.dumps(rel) + ": " + json.dumps(sha))


def _close_index(fh: Any, entries: int, fingerprint: str) -> None:
    """End what :func:`_write_index_entry` began: ``json.dumps({"files": ..., "fingerprint": ...},
    sort_keys=True, indent=0)`` byte for byte (the entries come in sorted order), then a newline."""
    import json

    fh.write(("\n}" if entries else "}") + ",\n\"fingerprint\": " + json.dumps(fingerprint) + "\n}\n")


def _index_fingerprint(path: Path) -> str | None:
    """The fingerprint of an index file, read line by line (it is the last key)."""
    import json

    found = None
    with path.open() as fh:
        for line in fh:
            if line.startswith('"fingerprint": '):  # the last such line: a file may be named so
                found = json.loads(line[len('"fingerprint": '):].rstrip().rstrip(","))
    return found


def _index_entries(path: Path) -> Iterator[tuple[str, str]]:
    """``(rel, sha256)`` of an index file in its (sorted) order, one line at a time."""
    import json

    with path.open() as fh:
        if fh.readline() != "{\n" or fh.readline() != '"files": {\n':
            return
        for line in fh:
            if not line.startswith('"'):
                return
            ((rel, sha),) = json.loads("{" + line.rstrip("\n").rstrip(",") + "}").items()
            yield rel, sha


def _quarantine_entries(path: Path) -> Iterator[tuple[str, tuple[str, str]]]:
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            yield row["path"], (row["reason"], row["detail"])


class _Cursor:
    """Looks keys up, in ascending order, in ``(key, value)`` pairs sorted by key: one pass, O(1)
    memory. A source that cannot be read further (or is out of order) only loses later matches."""

    def __init__(self, pairs: Iterator[tuple[str, Any]]) -> None:
        self._pairs = pairs
        self._head: tuple[str, Any] | None = None
        self._advance()

    def _advance(self) -> None:
        try:
            self._head = next(self._pairs, None)
        except (OSError, ValueError, KeyError, csv.Error):
            self._head = None

    def get(self, key: str) -> Any:
        while self._head is not None and self._head[0] < key:
            self._advance()
        return self._head[1] if self._head is not None and self._head[0] == key else None

    def close(self) -> None:
        close = getattr(self._pairs, "close", None)
        if close is not None:
            close()


class _PriorRows:
    """An earlier run's metadata rows found by content hash, reading its Parquet file on demand.

    In memory: the content hashes as a sorted array of 32-byte digests and their row numbers (40
    bytes per row), one decoded row group (rows are looked up mostly in file order) and the
    number of rows of each shard (``shard_rows``).
    """

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        from medops.data import METADATA_COLUMNS

        self._file = pq.ParquetFile(path)
        if self._file.schema_arrow.names != list(METADATA_COLUMNS):
            self._file.close()
            raise ValueError(f"{path} does not have the metadata columns")
        parts, shards = [], []
        for batch in self._file.iter_batches(batch_size=4096, columns=["content_sha256", "shard"]):
            parts.append(np.array([bytes.fromhex(s or "") for s in batch.column(0).to_pylist()], dtype="S32"))
            shards.append(batch.column(1).to_numpy())
        digests = np.concatenate(parts) if parts else np.empty(0, dtype="S32")
        numbers, counts = np.unique(np.concatenate(shards) if shards else np.empty(0, np.int64),
                                    return_counts=True)
        self.shard_rows: dict[int, int] = {int(n): int(c) for n, c in zip(numbers, counts)}
        self._order = np.argsort(digests, kind="stable")
        self._sorted = digests[self._order]
        sizes = [self._file.metadata.row_group(g).num_rows for g in range(self._file.num_row_groups)]
        self._starts = np.cumsum([0] + sizes)
        self._group: tuple[int, Any] = (-1, None)

    def get(self, sha: str) -> dict[str, Any] | None:
        if len(sha) != 64:
            return None
        key = np.array(bytes.fromhex(sha), dtype="S32")
        i = int(np.searchsorted(self._sorted, key))
        if i == len(self._sorted) or self._sorted[i] != key:
            return None
        row = int(self._order[i])
        group = int(np.searchsorted(self._starts, row, side="right")) - 1
        if self._group[0] != group:
            self._group = (group, self._file.read_row_group(group))
        return self._group[1].slice(row - int(self._starts[group]), 1).to_pylist()[0]

    def close(self) -> None:
        self._group = (-1, None)
        self._file.close()


INDEX_NAME = "ingest_index.json"
# reasons that belong to the file itself; no_label and duplicate depend on other inputs, timeout
# on the machine and the limit, so files quarantined for them are looked at again on every run
_INTRINSIC = {r.value for r in QuarantineReason} - {QuarantineReason.NO_LABEL.value,
                                                     QuarantineReason.DUPLICATE.value,
                                                     QuarantineReason.TIMEOUT.value}


def _fingerprint(cfg: IngestConfig, key: bytes) -> str:
    """What makes earlier outputs reusable: every setting that changes a pixel or a pseudonym
    (not ``workers`` nor ``cluster``, which change no output byte, nor ``incremental``: a full
    rebuild's outputs are reused by the incremental runs after it, nor ``source``: a moved export
    is the same data, nor ``file_timeout_s``: a file that took too long is tried again by every
    run)."""
    import hmac
    import json

    from medops import __version__
    from medops.dicom import PREPROCESSING_VERSION

    key_id = hmac.new(key, b"medops ingest key id", hashlib.sha256).hexdigest()[:16]
    execution = {"workers", "incremental", "cluster", "source", "file_timeout_s"}
    payload = json.dumps({"ingest": cfg.model_dump(mode="json", exclude=execution),
                          "key": key_id, "medops": __version__, "pixels": PREPROCESSING_VERSION,
                          "files": OUTPUT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class _Previous:
    """The outputs of an earlier run with the same fingerprint, read as the listing goes."""

    used: _PriorRows     # content sha256 -> metadata row
    quarantined: _Cursor  # rel -> (reason, detail)
    files: _Cursor        # rel -> sha256

    def close(self) -> None:
        self.used.close()
        self.quarantined.close()
        self.files.close()


def _load_previous(out_dir: Path, fingerprint: str) -> _Previous | None:
    try:
        if _index_fingerprint(out_dir / INDEX_NAME) != fingerprint:
            return None
        if not (out_dir / "quarantine.csv").is_file():
            return None
        used = _PriorRows(out_dir / "metadata.parquet")
    except (OSError, ValueError, KeyError, UnicodeDecodeError):
        return None
    return _Previous(used=used, quarantined=_Cursor(_quarantine_entries(out_dir / "quarantine.csv")),
                     files=_Cursor(_index_entries(out_dir / INDEX_NAME)))


def _plan(rels: Iterable[str], source_dir: Path, previous: _Previous | None) -> Iterator[_Item]:
    """Each file with what an earlier run left for it: content never seen, or a reason that
    depends on other inputs, is decoded again; the rest is reused."""
    for rel in rels:
        if previous is None:  # a full run lets the workers hash the bytes they read anyway
            yield _Item(rel)
            continue
        sha = _sha256_file(source_dir / rel)
        prior: dict[str, Any] | tuple[str, str] | None = previous.used.get(sha)
        if prior is None:
            quarantined = previous.quarantined.get(rel)
            if quarantined is not None and quarantined[0] in _INTRINSIC and previous.files.get(rel) == sha:
                prior = quarantined
        yield _Item(rel, sha, prior)
