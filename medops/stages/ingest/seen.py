"""What duplicate detection remembers of the files a run used, on disk: the one part of the
ingest's state that would otherwise grow with the export (about 0.3 kB a used file in two dicts,
~3 GB at 10M files), kept in an SQLite table below the run's ``.staging`` folder instead. The
process holds SQLite's page cache (bounded by :data:`_CACHE_KB`) whatever the number of files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from medops.errors import IngestError

_CACHE_KB = 4096   # SQLite's page cache: the interior pages of a 10M-file table fit
_BATCH = 1024      # files remembered per transaction: few writes, a bounded set of dirty pages
_CONTENT, _SOP = b"c", b"s"  # key prefixes: a file's content digest, its SOP Instance UID's


class SeenFiles:
    """``first(content, sop)`` -> the path of an earlier used file with the same content digest,
    else with the same SOP Instance UID digest (which one: the returned kind), or None; then
    ``remember(content, sop, rel)``. Scratch data: no journal, no fsync (a run cut short
    deletes ``.staging``); :meth:`close` deletes the table.

    Raises:
        IngestError: the table cannot be created or written (disk full, no permission).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            for pragma in ("journal_mode = OFF", "synchronous = OFF", "locking_mode = EXCLUSIVE",
                           f"cache_size = -{_CACHE_KB}", "temp_store = FILE"):
                self.db.execute(f"PRAGMA {pragma}")
            self.db.execute("CREATE TABLE seen (key BLOB PRIMARY KEY, path TEXT NOT NULL) WITHOUT ROWID")
            self.db.execute("BEGIN")
        except sqlite3.Error as exc:
            raise IngestError(f"cannot write the duplicate-detection table {path}: {exc}") from exc
        self.pending = 0

    def first(self, content: bytes, sop: bytes) -> tuple[str, str] | None:
        """``("content" | "sop", path)`` of the earlier file, content first; None when new."""
        try:
            found = dict(self.db.execute("SELECT key, path FROM seen WHERE key IN (?, ?)",
                                         (_CONTENT + content, _SOP + sop)).fetchall())
        except sqlite3.Error as exc:
            raise IngestError(f"cannot read the duplicate-detection table {self.path}: {exc}") from exc
        if _CONTENT + content in found:
            return "content", found[_CONTENT + content]
        if _SOP + sop in found:
            return "sop", found[_SOP + sop]
        return None

    def remember(self, content: bytes, sop: bytes, rel: str) -> None:
        try:
            self.db.execute("INSERT INTO seen VALUES (?, ?), (?, ?)", (_CONTENT + content, rel, _SOP + sop, rel))
            self.pending += 1
            if self.pending >= _BATCH:
                self.db.execute("COMMIT")
                self.db.execute("BEGIN")
                self.pending = 0
        except sqlite3.Error as exc:
            raise IngestError(f"cannot write the duplicate-detection table {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close and delete the table (again: nothing)."""
        db, self.db = getattr(self, "db", None), None
        if db is not None:
            db.close()
            self.path.unlink(missing_ok=True)
