"""The ingest stage's local process pool: files handed out in chunks (guided self-scheduling)
through a bounded window, outcomes in source order, a crashed worker isolated to its file."""

from __future__ import annotations

import logging
import math
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Iterable, Iterator

from medops.errors import IngestError, QuarantineReason
from medops.stages.ingest.worker import FileOutcome, WorkerSpec, process_chunk, process_file


log = logging.getLogger(__name__)
_MAX_CHUNK = 64        # files per task: bounds the memory a task's results hold
_AHEAD_PER_WORKER = 3  # tasks in flight per worker: keeps workers busy without piling up results


# The spec of the run a pool's worker process decodes for, set once, in that process, by the pool's
# initializer: the tasks carry only file names, because a manifest's labels can be megabytes
# (100,000 rows: ~6 MB, ~35 ms to pickle), too much to send with every chunk. Only
# _init_pool_worker writes it and only _decode_chunk reads it; the main process never sets it
# (decoding there passes its spec to process_file directly), so two runs in one process cannot
# see each other's settings.
_worker_spec: WorkerSpec | None = None


def _init_pool_worker(spec: WorkerSpec) -> None:
    """A worker process' initializer: keeps the run's spec for its tasks, in a process tuned for
    decoding."""
    global _worker_spec
    from medops.procs import reuse_freed_memory

    reuse_freed_memory()
    _worker_spec = spec


def _decode_chunk(rels: list[str]) -> list[FileOutcome]:
    """A pool task: :func:`process_chunk` with the spec this worker process was started with."""
    if _worker_spec is None:
        raise RuntimeError("_decode_chunk runs in an ingest pool's worker process only")
    return process_chunk(_worker_spec, rels)


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


def _launch_pool(workers: int, spec: WorkerSpec) -> _Starting:
    """Start ``workers`` processes without waiting for them (:func:`_ready` waits).

    spawn, not fork: the caller (a Prefect worker, a test runner) may hold threads and locks.
    """
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                               initializer=_init_pool_worker, initargs=(spec,))
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


def _start_pool(workers: int, spec: WorkerSpec) -> ProcessPoolExecutor | None:
    """A started worker pool, or None when worker processes cannot run here at all."""
    return _ready(_launch_pool(workers, spec))


def _pool_size(expected: int, workers: int) -> int:
    """How many worker processes ``expected`` files get: one per chunk at most (1 = this process)."""
    return min(workers, math.ceil(expected / chunk_size(expected, workers))) if expected else 1


def _isolate(chunk: list[str], spec: WorkerSpec) -> list[FileOutcome]:
    """Run a chunk whose worker died one file per task, to quarantine only the file that kills it."""
    out: list[FileOutcome] = []
    pool = _start_pool(1, spec)
    for rel in chunk:
        if pool is None:
            out.append(process_file(spec, rel))
            continue
        try:
            out.extend(pool.submit(_decode_chunk, [rel]).result())
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            out.append(FileOutcome(path=rel, reason=QuarantineReason.DECODE_ERROR.value,
                                   detail="the decoder crashed the worker process reading this file"))
            pool = _start_pool(1, spec)
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


class _Chunks:
    """The pool's side of :func:`_decode`: files gathered into chunks sized by :func:`chunk_size`,
    handed to the workers, and their outcomes taken back oldest chunk first. The pool starts with
    the first chunk (a rerun with nothing new starts no process); when no worker process can run,
    chunks are decoded here as they are handed out."""

    def __init__(self, spec: WorkerSpec, workers: int, expected: int, starting: _Starting | None) -> None:
        self.spec, self.workers, self.expected, self.starting = spec, workers, expected, starting
        self.n_workers = _pool_size(expected, workers)
        self.size = chunk_size(expected, workers)  # of the chunk being filled
        self.open: list[str] = []                  # the chunk being filled
        self.inflight: deque[tuple[Future, list[str]]] = deque()
        self.handed_out = 0
        self.pool: ProcessPoolExecutor | None = None
        self.started = False

    def add(self, rel: str) -> None:
        """A file for the open chunk, handed out once the chunk is full."""
        self.open.append(rel)
        if len(self.open) >= self.size:
            self.submit()

    def submit(self) -> None:
        """Hand out the open chunk."""
        if not self.started:  # lazily: a rerun with nothing new starts no process
            self.started = True
            self.pool = (_ready(self.starting) if self.starting is not None
                         else _start_pool(self.n_workers, self.spec))
        chunk = self.open
        if self.pool is None:
            self.inflight.append((_done(process_chunk(self.spec, chunk)), chunk))
        else:
            try:
                future = self.pool.submit(_decode_chunk, chunk)
            except BrokenProcessPool as exc:  # a worker died meanwhile: dealt with in turn
                future = Future()
                future.set_exception(exc)
            self.inflight.append((future, chunk))
        self.handed_out += len(chunk)
        self.size = chunk_size(self.expected, self.workers, self.handed_out)
        self.open = []

    def oldest(self) -> list[FileOutcome]:
        """The outcomes of the oldest chunk handed out. A worker that died costs a pool restart,
        and the chunk it held is retried one file per task (:func:`_isolate`)."""
        future, rels = self.inflight.popleft()
        try:
            return future.result()
        except BrokenProcessPool:
            assert self.pool is not None
            self.pool.shutdown(wait=False, cancel_futures=True)
            results = _isolate(rels, self.spec)
            restarted = _start_pool(self.n_workers, self.spec)
            if restarted is None:
                raise IngestError("ingest worker processes cannot be restarted after a crash")
            self.pool = restarted
            self.inflight = deque((self.pool.submit(_decode_chunk, r), r) for _, r in self.inflight)
            return results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _decode(items: Iterable[_Item], workers: int, spec: WorkerSpec, expected: int,
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
    if _pool_size(expected, workers) <= 1:
        for item in items:
            if item.prior is None:
                item.outcome = process_file(spec, item.rel)
            yield item
        return
    chunks = _Chunks(spec, workers, expected, starting)
    max_inflight = chunks.n_workers * _AHEAD_PER_WORKER
    max_window = 2 * max_inflight * chunks.size
    source = iter(items)
    window: deque[_Item] = deque()
    ready: deque[FileOutcome] = deque()
    exhausted = False
    try:
        while True:
            while not exhausted and len(chunks.inflight) < max_inflight and len(window) < max_window:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                window.append(item)
                if item.prior is None:
                    chunks.add(item.rel)
            if chunks.open and len(chunks.inflight) < max_inflight and (exhausted or len(window) >= max_window):
                chunks.submit()  # nothing more to add to it soon: keep the workers busy
            if not window:
                return
            item = window.popleft()
            if item.prior is None:
                if not ready:
                    if not chunks.inflight:
                        chunks.submit()  # the item is in the open chunk
                    ready.extend(chunks.oldest())
                item.outcome = ready.popleft()
                assert item.outcome.path == item.rel, (item.outcome.path, item.rel)
            yield item
    finally:
        chunks.close()
