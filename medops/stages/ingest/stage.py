"""Ingest: a hospital DICOM export -> de-identified DICOM + model-ready arrays + metadata.

Inputs:  ``source_dir``: every file below it, any name, any depth (nothing is skipped silently:
         each file, and each entry that cannot be read as one, is either used or listed in
         quarantine.csv with a reason);
         ``manifest`` (optional): CSV or Parquet with ``label`` (0/1, may be empty), optionally
         ``split``, and ``sop_instance_uid`` (the ORIGINAL SOP Instance UID) and/or ``path``
         (relative to source_dir) to match files. With a manifest, a file it does not list is
         quarantined as ``no_label``; without one, labels and splits come from folder names
         (``NORMAL`` / ``PNEUMONIA``, ``train`` / ``val`` / ``test``) where there are any.
Outputs: below ``out_dir``, exactly as :mod:`medops.data` documents: ``dicom/`` (de-identified
         files, PS3.15 Annex E), ``arrays/shard-NNNNN.npy`` (float32 (n, S, S) in [0, 1]),
         ``metadata.parquet`` (METADATA_COLUMNS, one row per used image, pseudonymous UIDs only)
         and ``quarantine.csv`` (``path`` relative to source_dir, ``reason``, ``detail``; written
         even when empty); ``ingest_index.json`` (settings fingerprint and each source file's
         SHA-256, for incremental runs).
Params:  ``ingest`` (image_size, window, workers, shard_size, deid).

Files are read, de-identified and decoded in ``workers`` processes, a chunk of files per task so
that inter-process traffic does not dominate; the parent assigns rows to shards in source-path
order, so the output does not depend on the number of workers. Memory stays bounded on exports of
any size: the folder is listed as it is walked, a bounded number of chunks is in flight, and every
output (shards, metadata row groups, quarantine rows, index entries) is written as it is produced;
what the parent keeps per file is a few digests per used file (see the note above
:func:`iter_source_files`). A re-run over a grown export decodes only the new content (see
:func:`run`); the same inputs always give byte-identical outputs.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import logging
import math
import os
import shutil
import stat
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from pydantic import BaseModel

from medops.config import IngestConfig
from medops.errors import DicomReadError, IngestError, QuarantineReason

# medops.data (and so pandas) is imported inside the functions that need it: the worker
# processes import this module, and pandas would double their start-up time for nothing
log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
QUARANTINE_COLUMNS = ("path", "reason", "detail")
# bumped when the outputs change for the same input (2: the preamble is zeroed; 3: the pixel
# statistics are computed in float64), so that an incremental run does not keep rows and files
# written the old way
OUTPUT_VERSION = 3
_MAX_CHUNK = 64        # files per task: bounds the memory a task's results hold
_AHEAD_PER_WORKER = 3  # tasks in flight per worker: keeps workers busy without piling up results


class IngestResult(BaseModel):
    """What the ingest stage did; ``quarantined_by_reason`` uses QuarantineReason values."""

    files_seen: int
    used: int
    quarantined: int
    quarantined_by_reason: dict[str, int]
    labelled: int
    shards: int
    decoded: int        # files read and decoded by this run
    reused: int         # files whose earlier outcome was kept (incremental run)
    changed: bool       # False when the run found nothing to change and wrote nothing
    image_size: int
    seconds: float
    out_dir: Path
    dicom_dir: Path
    arrays_dir: Path
    metadata: Path
    quarantine: Path


@dataclass
class FileOutcome:
    """One source file's fate, as a worker reports it."""

    path: str                      # relative to source_dir, POSIX separators
    sha256: str = ""
    reason: str | None = None      # a QuarantineReason value, None when used
    detail: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = None


# --- manifest ---------------------------------------------------------------------------------

def _manifest_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Column names and rows (as strings) of a CSV or Parquet manifest."""
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


# --- the per-file work (runs in worker processes) ---------------------------------------------

_STATE: dict[str, Any] = {}


def _init_worker(cfg: IngestConfig, key: bytes, labels: dict | None, source_dir: str, dicom_dir: str) -> None:
    _STATE.update(cfg=cfg, key=key, labels=labels, source_dir=Path(source_dir), dicom_dir=Path(dicom_dir))


def _init_pool_worker(*init_args: Any) -> None:
    """A worker process' initializer: :func:`_init_worker` in a process tuned for decoding."""
    from medops.procs import reuse_freed_memory

    reuse_freed_memory()
    _init_worker(*init_args)


def _write_atomically(ds: Any, target: Path) -> None:
    """Encode ``ds`` and write it to ``target`` through a temporary file in the same folder, so
    that ``target`` is either absent or whole (a temporary left by a crash is pruned by the
    next run, see :func:`_prune_dicom`).

    Raises:
        OSError: the file cannot be written (the output folder's problem, not the file's).
        Exception: ``ds`` cannot be encoded (the file's problem).
    """
    from medops.dicom.io import encode_file

    data = encode_file(ds)
    # this process' own name for it: no other process writes it, so no random names to try
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:  # the study's folder, on its first file
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _image_stats(image: np.ndarray) -> dict[str, float]:
    """``pixel_mean``, ``pixel_std`` (population), ``pixel_min``, ``pixel_max`` of an image, in
    float64; a few array passes, not numpy's general-purpose ``mean``/``std``."""
    x = image.astype(np.float64).ravel()
    mean = float(np.add.reduce(x)) / x.size
    x -= mean
    return {"pixel_mean": mean, "pixel_std": math.sqrt(float(np.dot(x, x)) / x.size),
            "pixel_min": float(image.min()), "pixel_max": float(image.max())}


def process_file(rel: str) -> FileOutcome:
    """Read, check, decode and de-identify one file; every per-file failure becomes data.

    Raises:
        IngestError: the de-identified file cannot be written to the output folder (disk full, no
            permission): a failure of the stage, not of the file, so not a quarantine row that
            later runs would keep.
    """
    from medops.dicom import deid
    from medops.dicom.io import looking_only, read_dataset, text_value
    from medops.dicom.pixels import prepare_image

    cfg: IngestConfig = _STATE["cfg"]
    key: bytes = _STATE["key"]
    labels: dict | None = _STATE["labels"]
    out = FileOutcome(path=rel)
    path = _STATE["source_dir"] / rel
    unusable = _not_a_file(path)
    if unusable is not None:
        out.reason, out.detail = QuarantineReason.NOT_DICOM.value, unusable
        return out
    try:
        data = path.read_bytes()
    except OSError as exc:
        out.reason, out.detail = QuarantineReason.NOT_DICOM.value, f"cannot read: {exc}"
        return out
    out.sha256 = hashlib.sha256(data).hexdigest()
    try:
        # values are parsed as they are used: de-identification parses what it changes and the
        # rest is written back as read, so any access below may be the first to meet a corrupt one
        ds = read_dataset(data, parse_all=False)
    except DicomReadError as exc:
        out.reason, out.detail = exc.reason.value, str(exc)
        return out
    try:
        with looking_only(ds):  # what is only looked at is written back as read
            original_sop_uid = text_value(ds, "SOPInstanceUID").strip()
            if text_value(ds, "BurnedInAnnotation").strip().upper() == "YES" \
                    and not cfg.deid.allow_burned_in:
                raise DicomReadError("BurnedInAnnotation is YES: the pixels may show identifying text",
                                     QuarantineReason.BURNED_IN_ANNOTATION)
            label: int | None = None
            split: str | None = None
            if labels is not None:
                entry = labels.get(f"uid:{original_sop_uid}") or labels.get(f"path:{rel}")
                if entry is None:
                    raise DicomReadError("neither its SOPInstanceUID nor its path is in the manifest",
                                         QuarantineReason.NO_LABEL)
                label, split = entry
            image = prepare_image(ds, image_size=cfg.image_size, window=cfg.window,
                                  frame=cfg.frame, pixel_spacing=cfg.pixel_spacing)
            # read from the ORIGINAL header, before de-identification removes what they come from
            sex, age = deid.patient_sex(ds), deid.patient_age_years(ds)
            modality = text_value(ds, "Modality") or None
            rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except DicomReadError as exc:
        out.reason, out.detail = exc.reason.value, str(exc)
        return out
    except Exception as exc:  # a value pydicom cannot parse; the type only: a message may quote it
        out.reason = QuarantineReason.DECODE_ERROR.value
        out.detail = f"corrupt header: a value cannot be parsed ({type(exc).__name__})"
        return out

    try:
        deid.deidentify(ds, key, retain_longitudinal=cfg.deid.retain_longitudinal, age=age)
        if not original_sop_uid:
            ds.SOPInstanceUID = deid.pseudonymize_uid("content:" + out.sha256, key)
        with looking_only(ds):  # de-identification stored its values encoded: keep them so
            sop = text_value(ds, "SOPInstanceUID")
            study = text_value(ds, "StudyInstanceUID") or None
            series = text_value(ds, "SeriesInstanceUID") or None
            patient_id = text_value(ds, "PatientID")
        rel_deid = Path("dicom") / (study or "no-study") / f"{sop}.dcm"
        target = _STATE["dicom_dir"].parent / rel_deid
        try:
            _write_atomically(ds, target)
        except OSError as exc:  # the output folder, not this file: the stage cannot go on
            # the path holds pseudonymous UIDs only, and the OS's reason names no header value
            raise IngestError(f"cannot write the de-identified file {target}: "
                              f"{exc.strerror or type(exc).__name__}") from exc
    except IngestError:
        raise
    except Exception as exc:  # never keep a half-de-identified file; the stage goes on
        out.reason = QuarantineReason.DEID_FAILED.value
        # the type only: a message could quote a header value, and this lands in quarantine.csv
        out.detail = f"could not de-identify or write the file ({type(exc).__name__})"
        return out
    out.image = image
    out.record = {
        "sop_instance_uid": sop,
        "study_instance_uid": study,
        "series_instance_uid": series,
        "patient_id": patient_id,
        "patient_sex": sex,
        "patient_age": age,
        "modality": modality,
        "rows": rows,
        "columns": columns,
        "label": label,
        "manifest_split": split,
        **_image_stats(image),
        "content_sha256": out.sha256,
        "deid_path": rel_deid.as_posix(),
    }
    return out


def process_chunk(rels: list[str]) -> list[FileOutcome]:
    return [process_file(rel) for rel in rels]


# --- orchestration ----------------------------------------------------------------------------
#
# Memory: the main process holds no per-file Python objects for the whole export. The listing is
# walked one folder at a time, files are fed to the workers through a bounded window, and every
# output is written as its rows arrive (shards, metadata.parquet in row groups, quarantine.csv,
# the index). What remains per file is what duplicate detection and pruning need to remember about
# each USED file: its content hash, a hash of its SOP Instance UID and of its de-identified path
# (32-byte digests) and its source path (about 0.3 kB in all); an incremental run adds 40 bytes per
# row of the earlier metadata (a sorted array of content hashes). The earlier quarantine list and
# index are read forward in step with the listing, never loaded.

def iter_source_files(source_dir: Path) -> Iterator[str]:
    """Every entry below ``source_dir`` that is not a folder (any name, any depth) as a POSIX path
    relative to it, in ``sorted()`` order, listed one folder at a time (memory: one folder's names
    per level).

    A folder's entries are visited in the order of their names with a sub-folder ``d`` keyed as
    ``d/``: exactly the order ``sorted()`` gives the full paths (``a-b/x`` < ``a/x`` < ``a0``), so
    no list of the whole tree is needed to produce it. Symbolic links to files are followed, links
    to folders are not. Nothing is skipped: what is no file to read (a link to a folder, a broken
    link, a device, pipe or socket, an entry whose type cannot be read) is listed like a file, and
    a sub-folder that cannot be listed as its path with a trailing ``/``, so that
    :func:`process_file` quarantines each with the reason (see :func:`_not_a_file`).

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
            else:
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


@dataclass(slots=True)
class _Item:
    """One source file on its way through the run."""

    rel: str
    sha: str = ""  # known before decoding in an incremental run only (a full run lets workers hash)
    prior: dict[str, Any] | tuple[str, str] | None = None  # reused row / (reason, detail); None: decode
    outcome: FileOutcome | None = None


@dataclass
class _Starting:
    """A worker pool whose processes are starting: one probe task per worker, so that all of them
    start at once (a spawn pool starts a process per task waiting for one)."""

    pool: ProcessPoolExecutor
    probes: list[Future]


def _launch_pool(workers: int, init_args: tuple) -> _Starting:
    """Start ``workers`` processes without waiting for them (:func:`_ready` waits).

    spawn, not fork: the caller (a Prefect worker, a test runner) may hold threads and locks.
    """
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                               initializer=_init_pool_worker, initargs=init_args)
    return _Starting(pool, [pool.submit(int) for _ in range(workers)])


def _ready(starting: _Starting) -> ProcessPoolExecutor | None:
    """The pool once its processes answer, or None when worker processes cannot run here at all."""
    try:
        for probe in starting.probes:
            probe.result()
    except Exception as exc:  # e.g. a __main__ that cannot be re-imported (python - < script)
        starting.pool.shutdown(wait=False, cancel_futures=True)
        log.warning("ingest worker processes cannot start (%s: %s); decoding in this process",
                    type(exc).__name__, exc)
        return None
    return starting.pool


def _start_pool(workers: int, init_args: tuple) -> ProcessPoolExecutor | None:
    """A started worker pool, or None when worker processes cannot run here at all."""
    return _ready(_launch_pool(workers, init_args))


def _pool_size(expected: int, workers: int) -> int:
    """How many worker processes ``expected`` files get: one per chunk at most (1 = this process)."""
    return min(workers, math.ceil(expected / chunk_size(expected, workers))) if expected else 1


def _isolate(chunk: list[str], init_args: tuple) -> list[FileOutcome]:
    """Run a chunk whose worker died one file per task, to quarantine only the file that kills it."""
    out: list[FileOutcome] = []
    pool = _start_pool(1, init_args)
    for rel in chunk:
        if pool is None:
            _init_worker(*init_args)
            out.append(process_file(rel))
            continue
        try:
            out.append(pool.submit(process_file, rel).result())
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            out.append(FileOutcome(path=rel, reason=QuarantineReason.DECODE_ERROR.value,
                                   detail="the decoder crashed the worker process reading this file"))
            pool = _start_pool(1, init_args)
    if pool is not None:
        pool.shutdown()
    return out


def chunk_size(expected: int, workers: int, handed_out: int = 0) -> int:
    """Files for the next worker task, ``handed_out`` of ``expected`` files on ``workers``
    processes being given out already: a quarter of each worker's share of what is left, at most
    ``_MAX_CHUNK`` (guided self-scheduling). Tasks stay a few seconds long while there is much to
    do and shrink to single files at the end, so that no worker sits idle while another finishes
    a long last task."""
    left = max(expected - handed_out, 1)
    return max(1, min(_MAX_CHUNK, math.ceil(left / (workers * 4))))


def _done(value: list[FileOutcome]) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _decode(items: Iterable[_Item], workers: int, init_args: tuple, expected: int,
            starting: _Starting | None = None) -> Iterator[_Item]:
    """``items`` in their order, each one to decode (``prior is None``) with its ``outcome``.

    Bounded whatever the number of files: at most ``workers * _AHEAD_PER_WORKER`` chunks in flight
    and twice as many chunks' worth of items read ahead. ``expected`` (an upper bound of the files
    to decode) sizes the chunks; ``workers == 1``, or a single chunk, decodes in this process.
    Otherwise a worker that dies (a decoder plugin that crashes on a malformed file) costs a pool
    restart, and the chunk it held is retried one file per task, so only the culprit is quarantined
    and the stage goes on. ``starting``: the pool, already launched by the caller for
    ``_pool_size(expected, workers)`` processes (the caller shuts it down should this generator
    never start).
    """
    size = chunk_size(expected, workers)
    n_workers = _pool_size(expected, workers)
    if n_workers <= 1:
        _init_worker(*init_args)
        for item in items:
            if item.prior is None:
                item.outcome = process_file(item.rel)
            yield item
        return
    max_inflight = n_workers * _AHEAD_PER_WORKER
    max_window = 2 * max_inflight * size
    source = iter(items)
    window: deque[_Item] = deque()
    inflight: deque[tuple[Future, list[str]]] = deque()
    ready: deque[FileOutcome] = deque()
    chunk: list[str] = []
    pool: ProcessPoolExecutor | None = None
    started = exhausted = False

    handed_out = 0

    def submit() -> None:
        nonlocal chunk, pool, started, size, handed_out
        if not started:  # lazily: a rerun with nothing new starts no process
            started = True
            pool = _ready(starting) if starting is not None else _start_pool(n_workers, init_args)
            if pool is None:
                _init_worker(*init_args)
        if pool is None:
            inflight.append((_done(process_chunk(chunk)), chunk))
        else:
            try:
                future = pool.submit(process_chunk, chunk)
            except BrokenProcessPool as exc:  # a worker died meanwhile: dealt with in turn
                future = Future()
                future.set_exception(exc)
            inflight.append((future, chunk))
        handed_out += len(chunk)
        size = chunk_size(expected, workers, handed_out)
        chunk = []

    def oldest() -> list[FileOutcome]:
        nonlocal pool, inflight
        future, rels = inflight.popleft()
        try:
            return future.result()
        except BrokenProcessPool:
            assert pool is not None
            pool.shutdown(wait=False, cancel_futures=True)
            results = _isolate(rels, init_args)
            restarted = _start_pool(n_workers, init_args)
            if restarted is None:
                raise IngestError("ingest worker processes cannot be restarted after a crash")
            pool = restarted
            inflight = deque((pool.submit(process_chunk, r), r) for _, r in inflight)
            return results

    try:
        while True:
            while not exhausted and len(inflight) < max_inflight and len(window) < max_window:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                window.append(item)
                if item.prior is None:
                    chunk.append(item.rel)
                    if len(chunk) >= size:
                        submit()
            if chunk and len(inflight) < max_inflight and (exhausted or len(window) >= max_window):
                submit()  # nothing more to add to it soon: keep the workers busy
            if not window:
                return
            item = window.popleft()
            if item.prior is None:
                if not ready:
                    if not inflight:
                        submit()  # the item is in the open chunk
                    ready.extend(oldest())
                item.outcome = ready.popleft()
                assert item.outcome.path == item.rel, (item.outcome.path, item.rel)
            yield item
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


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
    bytes per row) and one decoded row group (rows are looked up mostly in file order).
    """

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        from medops.data import METADATA_COLUMNS

        self._file = pq.ParquetFile(path)
        if self._file.schema_arrow.names != list(METADATA_COLUMNS):
            self._file.close()
            raise ValueError(f"{path} does not have the metadata columns")
        parts = [np.array([bytes.fromhex(s or "") for s in batch.column(0).to_pylist()], dtype="S32")
                 for batch in self._file.iter_batches(batch_size=4096, columns=["content_sha256"])]
        digests = np.concatenate(parts) if parts else np.empty(0, dtype="S32")
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
_STAGING = ".staging"
# written before anything else, so a run that crashed half-way is still recognised as ours
_OWNER_MARKER = ".medops-ingest"
# reasons that belong to the file itself; no_label and duplicate depend on other inputs, so files
# quarantined for them are looked at again on every run
_INTRINSIC = {r.value for r in QuarantineReason} - {QuarantineReason.NO_LABEL.value,
                                                     QuarantineReason.DUPLICATE.value}
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


def _fingerprint(cfg: IngestConfig, key: bytes) -> str:
    """What makes earlier outputs reusable: every setting that changes a pixel or a pseudonym
    (not ``workers``, which changes no output byte, nor ``incremental``: a full rebuild's outputs
    are reused by the incremental runs after it)."""
    import hmac
    import json

    from medops import __version__
    from medops.dicom import PREPROCESSING_VERSION

    key_id = hmac.new(key, b"medops ingest key id", hashlib.sha256).hexdigest()[:16]
    payload = json.dumps({"ingest": cfg.model_dump(mode="json", exclude={"workers", "incremental"}),
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


def _sha256_file(path: Path) -> str:
    """The file's SHA-256, or "" when it cannot be read (the worker will say why)."""
    from medops.hashing import sha256_file

    if _not_a_file(path) is not None:  # a pipe is never opened
        return ""
    try:
        return sha256_file(path)
    except OSError:
        return ""


_OUTPUT_MARKERS = ("metadata.parquet", "quarantine.csv", INDEX_NAME, _STAGING, _OWNER_MARKER)


def _check_folders(source_dir: Path, out_dir: Path) -> None:
    """Refuse folder choices that would ingest our own outputs or delete someone else's files.

    Raises:
        IngestError: one folder is inside the other, or ``out_dir`` holds files but no earlier
            ingest output (``dicom/`` there could be a hospital export that a rebuild would delete).
    """
    src, out = source_dir.resolve(), out_dir.resolve()
    if src == out or src.is_relative_to(out) or out.is_relative_to(src):
        raise IngestError(f"the output folder {out_dir} and the source folder {source_dir} must not "
                          f"contain one another")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in _OUTPUT_MARKERS):
        raise IngestError(f"the output folder {out_dir} is not empty and holds no earlier ingest "
                          f"output; refusing to replace its contents (choose an empty folder)")


def _reset_outputs(out_dir: Path) -> None:
    """Remove this stage's previous outputs (and only those) so no stale shard or file survives."""
    from medops.data import ARRAYS_DIR

    for sub in ("dicom", ARRAYS_DIR, _STAGING):
        if (out_dir / sub).exists():
            shutil.rmtree(out_dir / sub)
    for name in ("metadata.parquet", "quarantine.csv", INDEX_NAME):
        (out_dir / name).unlink(missing_ok=True)


def _progress_callback(progress: bool | Progress | None, total: int) -> tuple[Progress | None, Callable[[], None]]:
    if progress is None or progress is False:
        return None, lambda: None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="file", desc="ingest", dynamic_ncols=True)

        def update(done: int, _total: int) -> None:
            bar.update(done - bar.n)

        return update, bar.close
    return progress, lambda: None


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


def run(cfg: IngestConfig, *, source_dir: Path, out_dir: Path, manifest: Path | None = None,
        key: bytes | None = None, progress: bool | Progress | None = None) -> IngestResult:
    """Ingest every file below ``source_dir`` into ``out_dir``; see the module docstring.

    Incremental (``cfg.incremental``; False rebuilds everything): when ``out_dir`` holds the
    outputs of an earlier run with the same settings and key, a file whose content (SHA-256) was
    seen before is not read again: its row, its pixels and its de-identified file are kept, and
    labels are re-applied from the current manifest. Only new content is decoded; files that went
    away lose their rows. A run that would change nothing writes nothing. (With DVC, the stage's
    outputs must be ``persist: true`` for this to apply.)

    Memory does not grow with the number of files beyond a few hundred bytes per used file (see
    the note above :func:`iter_source_files`): every output is written as it is produced, into
    ``out_dir/.staging``, and moved into place at the end, the index last.

    Args:
        cfg: the ``ingest`` section (``frame``: the multi-frame policy; ``incremental``: reuse an
            earlier run's outputs).
        source_dir: the export to read.
        out_dir: where the processed dataset goes.
        manifest: labels keyed by original SOPInstanceUID or by path; None = labels from folder
            names (``NORMAL`` / ``PNEUMONIA`` ..., ``train`` / ``val`` / ``test``), else none.
        key: de-identification key; None = :func:`medops.dicom.deid.resolve_deid_key`.
        progress: True for a tqdm bar, a ``callback(done, total)``, or None.

    Raises:
        IngestError: the source folder is missing, the manifest is unusable, or an output cannot
            be written (disk full, no permission). A bad file never raises: it is quarantined.
    """
    started = time.monotonic()
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if not source_dir.is_dir():
        raise IngestError(f"source folder {source_dir} does not exist or is not a folder")
    labels = read_manifest(manifest) if manifest is not None else None
    if key is None:
        from medops.dicom.deid import resolve_deid_key

        key = resolve_deid_key(cfg.deid)
    # counted first (a cheap walk) for the progress total and the chunk size; the files are then
    # listed again as they are processed, so the listing is never held
    total = sum(1 for _ in iter_source_files(source_dir))
    _check_folders(source_dir, out_dir)
    init_args = (cfg, key, labels, str(source_dir), str(out_dir / "dicom"))
    # a full rebuild decodes every file: its workers are launched now and start up while this
    # process imports what it writes with and sets up its outputs
    n_workers = _pool_size(total, cfg.workers)
    rebuild = not cfg.incremental or not (out_dir / INDEX_NAME).is_file()
    starting = _launch_pool(n_workers, init_args) if rebuild and n_workers > 1 else None
    try:
        return _ingest(cfg, source_dir, out_dir, labels, key, total, init_args, starting, progress,
                       started)
    finally:
        if starting is not None:  # shut down by the decoding once it started; again is harmless
            starting.pool.shutdown(cancel_futures=True)


def _ingest(cfg: IngestConfig, source_dir: Path, out_dir: Path, labels: dict | None, key: bytes,
            total: int, init_args: tuple, starting: _Starting | None,
            progress: bool | Progress | None, started: float) -> IngestResult:
    """:func:`run` once its arguments are checked and, for a full rebuild, its workers launched."""
    import filecmp

    fingerprint = _fingerprint(cfg, key)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / _OWNER_MARKER
    if not marker.exists():  # written once: a rerun that changes nothing writes nothing
        marker.write_text("medops ingest output: a rerun may replace this folder's files\n")
    previous = _load_previous(out_dir, fingerprint) if cfg.incremental else None
    if previous is None:
        _reset_outputs(out_dir)
    dicom_dir = out_dir / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / _STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()  # also marks out_dir as an ingest output should this run be cut short

    by_pseudo_uid: dict[str, tuple[int | None, str | None]] = {}
    if labels:
        from medops.dicom.deid import pseudonymize_uid

        by_pseudo_uid = {pseudonymize_uid(k[4:], key): v for k, v in labels.items() if k.startswith("uid:")}

    def label_for(rel: str, pseudo_sop: str) -> tuple[int | None, str | None] | None:
        if labels is None:
            return labels_from_path(rel)
        return by_pseudo_uid.get(pseudo_sop) or labels.get(f"path:{rel}")

    outputs = ("metadata.parquet", "quarantine.csv", INDEX_NAME)  # the index last: it commits
    writer = _ShardWriter(staging, cfg.shard_size)
    metadata = _MetadataWriter(staging / "metadata.parts.parquet")
    # what duplicate detection and pruning remember of each used file (see the note above
    # iter_source_files): 32-byte digests and the path, nothing else
    seen_content: dict[bytes, str] = {}   # content sha256 -> path
    seen_sop: dict[bytes, str] = {}       # digest of the pseudonymous SOP UID -> path
    kept: set[bytes] = set()              # digests of the deid_path of used rows
    rewrite: list[str] = []
    by_reason: Counter[str] = Counter()
    files_seen = decoded = labelled = 0
    old_shards: dict[int, np.ndarray] = {}
    callback, close = _progress_callback(progress, total)
    items = _decode(_plan(iter_source_files(source_dir), source_dir, previous), cfg.workers, init_args,
                    total, starting if previous is None else None)
    try:
        # the workers get their first chunks before this process imports what writing
        # metadata.parquet needs (pyarrow; not pandas, see _metadata_schema), which it does while
        # they work, before the files' state grows
        head = next(items, None)
        import pyarrow.parquet  # noqa: F401

        from medops.data import METADATA_COLUMNS, shard_path

        with (staging / "quarantine.csv").open("w", newline="") as qfh, \
                (staging / INDEX_NAME).open("w") as ifh:
            quarantine = csv.writer(qfh, lineterminator="\n")
            quarantine.writerow(QUARANTINE_COLUMNS)
            ifh.write('{\n"files": {')
            for item in itertools.chain([head] if head is not None else [], items):
                rel, prior = item.rel, item.prior
                files_seen += 1
                image: np.ndarray | None = None
                if isinstance(prior, tuple):
                    reason, detail = prior
                    sha = item.sha
                elif isinstance(prior, dict):
                    record = {k: prior[k] for k in METADATA_COLUMNS if k not in ("shard", "shard_index")}
                    entry = label_for(rel, record["sop_instance_uid"])
                    reason, detail = (None, "") if entry is not None else (
                        QuarantineReason.NO_LABEL.value, "neither its SOPInstanceUID nor its path is in the manifest")
                    record["label"], record["manifest_split"] = entry if entry is not None else (None, None)
                    sha = record["content_sha256"]
                    shard = int(prior["shard"])
                    if shard not in old_shards:
                        if len(old_shards) >= 2:  # rows come in shard order, mostly: keep few mapped
                            old_shards.pop(next(iter(old_shards)))
                        old_shards[shard] = np.load(shard_path(out_dir, shard), mmap_mode="r")
                    image = np.array(old_shards[shard][int(prior["shard_index"])])
                else:
                    outcome = item.outcome
                    assert outcome is not None
                    decoded += 1
                    reason, detail, record, image, sha = (outcome.reason, outcome.detail, outcome.record,
                                                          outcome.image, outcome.sha256)
                    if reason is None and labels is None:
                        record["label"], record["manifest_split"] = labels_from_path(rel)
                _write_index_entry(ifh, files_seen == 1, rel, sha)
                if reason is None:
                    content, sop = bytes.fromhex(sha), _digest(record["sop_instance_uid"])
                    first = seen_content.get(content)
                    prior_rel = seen_sop.get(sop)
                    if first is not None:
                        reason, detail = QuarantineReason.DUPLICATE.value, f"same bytes as {first}"
                    elif prior_rel is not None:
                        reason = QuarantineReason.DUPLICATE.value
                        detail = f"same SOPInstanceUID as {prior_rel}, different content"
                        rewrite.append(prior_rel)  # a worker may have overwritten the kept file's copy
                if reason is not None:
                    # rows come in path order, so the file is sorted as it is written
                    quarantine.writerow((rel, reason, detail))
                    by_reason[reason] += 1
                else:
                    assert image is not None
                    seen_content[content] = seen_sop[sop] = rel
                    kept.add(_digest(record["deid_path"]))
                    shard, position = writer.add(image)
                    metadata.add({**record, "shard": shard, "shard_index": position})
                    labelled += record["label"] is not None
                if callback is not None and files_seen % 64 == 0 and files_seen < total:
                    callback(files_seen, total)
            _close_index(ifh, files_seen, fingerprint)
        writer.flush()
        metadata.close()
        if callback is not None and files_seen:
            callback(files_seen, files_seen)
    finally:
        items.close()
        close()
        old_shards.clear()
        if previous is not None:
            previous.close()
    seen_content.clear()
    seen_sop.clear()
    from medops.data import ARRAYS_DIR

    if rewrite:  # restore the kept files' de-identified copies a duplicate may have overwritten
        _init_worker(*init_args)
        for rel in sorted(set(rewrite)):
            restored = process_file(rel)
            if restored.reason is not None:  # it was used a moment ago: the file changed meanwhile?
                raise IngestError(f"cannot restore the de-identified copy of {rel}, which shares its "
                                  f"SOP Instance UID with a duplicate: {restored.reason} "
                                  f"({restored.detail})")

    _write_metadata(metadata, staging / "metadata.parquet")
    # a file decoded again (no_label and duplicate are looked at on every run) either ends
    # quarantined before its de-identified copy is written, or adds a metadata row, or shares a
    # kept file's SOP Instance UID (then it is in rewrite): comparing the staged outputs is enough
    unchanged = (previous is not None and not rewrite
                 and all((out_dir / name).is_file()
                         and filecmp.cmp(staging / name, out_dir / name, shallow=False) for name in outputs))
    if unchanged:
        shutil.rmtree(staging, ignore_errors=True)  # a run that changes nothing writes nothing
    else:
        # the index goes first and comes back last: a run cut short in between leaves outputs
        # that the next run does not trust, so it rebuilds them
        (out_dir / INDEX_NAME).unlink(missing_ok=True)
        if (out_dir / ARRAYS_DIR).exists():
            shutil.rmtree(out_dir / ARRAYS_DIR)
        if (staging / ARRAYS_DIR).exists():
            (staging / ARRAYS_DIR).rename(out_dir / ARRAYS_DIR)
        _prune_dicom(dicom_dir, kept)
        for name in outputs:
            os.replace(staging / name, out_dir / name)
        shutil.rmtree(staging, ignore_errors=True)

    return IngestResult(
        files_seen=files_seen,
        used=metadata.count,
        quarantined=sum(by_reason.values()),
        quarantined_by_reason=dict(sorted(by_reason.items())),
        labelled=labelled,
        shards=writer.shards,
        decoded=decoded,
        reused=files_seen - decoded,
        changed=not unchanged,
        image_size=cfg.image_size,
        seconds=round(time.monotonic() - started, 3),
        out_dir=out_dir,
        dicom_dir=dicom_dir,
        arrays_dir=out_dir / ARRAYS_DIR,
        metadata=out_dir / "metadata.parquet",
        quarantine=out_dir / "quarantine.csv",
    )
def format_summary(result: IngestResult) -> str:
    """A few lines for the CLI: counts, quarantine reasons, where things went."""
    lines = [
        f"ingested {result.used} of {result.files_seen} files in {result.seconds:.1f} s "
        f"({result.labelled} labelled) into {result.shards} shard(s) of "
        f"{result.image_size}x{result.image_size}",
    ]
    if result.reused:
        lines.append(f"incremental: {result.decoded} file(s) decoded, {result.reused} reused"
                     + ("" if result.changed else "; nothing changed, nothing written"))
    if result.quarantined:
        reasons = ", ".join(f"{n} {reason}" for reason, n in result.quarantined_by_reason.items())
        lines.append(f"quarantined {result.quarantined}: {reasons} (see {result.quarantine})")
    else:
        lines.append(f"quarantined 0 (empty list at {result.quarantine})")
    lines.append(f"metadata: {result.metadata}")
    lines.append(f"de-identified DICOM: {result.dicom_dir}")
    return "\n".join(lines)
