"""The source folder: every entry below it, in ``sorted()`` order, and what is no file to read."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

from medops.errors import IngestError


# Memory: the main process holds no per-file Python objects for the whole export. The listing is
# walked one folder at a time, files are fed to the workers through a bounded window, and every
# output is written as its rows arrive (shards and their packs, metadata.parquet in row groups,
# quarantine.csv, the index). What duplicate detection needs to remember about each USED file (its
# content hash, a hash of its SOP Instance UID and its source path: ~0.3 kB in dicts) is kept on
# disk, in an SQLite table below .staging (medops.stages.ingest.seen), so a full run's memory is
# flat; an incremental run adds 41 bytes per row of the earlier metadata (a sorted array of
# content hashes, and whether the row is kept). The earlier quarantine list and index are read
# forward in step with the listing, never loaded.

def iter_source_files(source_dir: Path, skip: frozenset[str] = frozenset()) -> Iterator[str]:
    """Every entry below ``source_dir`` that is not a folder (any name, any depth) as a POSIX path
    relative to it, in ``sorted()`` order, listed one folder at a time (memory: one folder's names
    per level).

    A folder's entries are visited in the order of their names with a sub-folder ``d`` keyed as
    ``d/``: exactly the order ``sorted()`` gives the full paths (``a-b/x`` < ``a/x`` < ``a0``), so
    no list of the whole tree is needed to produce it. Symbolic links to files are followed, links
    to folders are not. Nothing but ``skip`` is left out: what is no file to read (a link to a folder, a broken
    link, a device, pipe or socket, an entry whose type cannot be read) is listed like a file, and
    a sub-folder that cannot be listed as its path with a trailing ``/``, so that
    :func:`process_file` quarantines each with the reason (see :func:`_not_a_file`).

    ``skip``: relative paths not to list (the label manifests of an export folder).

    Raises:
        IngestError: ``source_dir`` itself cannot be listed.
    """
    def walk(folder: str, prefix: str) -> Iterator[str]:
        entries: list[tuple[str, bool]] = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False  # listed as a file: process_file says why it cannot be read
                    entries.append((entry.name + "/", True) if is_dir else (entry.name, False))
        except OSError as exc:
            if not prefix:
                raise IngestError(f"source folder {source_dir} cannot be listed: "
                                  f"{exc.strerror or type(exc).__name__}") from exc
            yield prefix  # "sub/folder/", in its place in the order: quarantined as unreadable
            return
        entries.sort()
        for key, is_dir in entries:
            if is_dir:
                yield from walk(os.path.join(folder, key[:-1]), prefix + key)
            elif prefix + key not in skip:
                yield prefix + key

    yield from walk(os.fspath(source_dir), "")


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` (an entry :func:`iter_source_files` listed) is no file to read, as a
    quarantine detail; None for a regular file or a link to one. Asked before a file is opened:
    opening a pipe would wait forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if os.path.islink(path):
            return f"cannot read: a link whose target cannot be reached ({exc.strerror})"
        return f"cannot read: {exc.strerror or type(exc).__name__}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        if os.path.islink(path):
            return "cannot read: a link to a folder, not followed"
        try:
            with os.scandir(path):
                pass
        except OSError as exc:
            return f"cannot read: a folder that cannot be listed ({exc.strerror})"
        return "cannot read: a folder that could not be listed"
    return "cannot read: not a regular file (a device, pipe or socket)"


def _sha256_file(path: Path) -> str:
    """The file's SHA-256, or "" when it cannot be read (the worker will say why)."""
    from medops.hashing import sha256_file

    if _not_a_file(path) is not None:  # a pipe is never opened
        return ""
    try:
        return sha256_file(path)
    except OSError:
        return ""
