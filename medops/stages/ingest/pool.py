"""The ingest stage's local process pool (:class:`LocalPool`): files handed out in chunks (guided
self-scheduling), a crashed worker isolated to its file. For one machine; a Dask cluster is
:mod:`medops.stages.ingest.cluster`, and both are driven by
:func:`medops.stages.ingest.executors.decode_in_order`."""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from medops.errors import IngestError
from medops.stages.ingest.worker import (FileOutcome, WorkerSpec, died_reading, process_chunk,
                                         process_guarded)


log = logging.getLogger(__name__)
_MAX_CHUNK = 64        # files per task: bounds the memory a task's results hold
_AHEAD_PER_WORKER = 3  # tasks in flight per worker: keeps workers busy without piling up results


# The spec of the run a pool's worker process decodes for, set once, in that process, by the pool's
# initializer: the tasks carry only file names, because a manifest's labels can be megabytes
# (100,000 rows: ~6 MB, ~35 ms to pickle), too much to send with every chunk. Only
# _init_pool_worker writes it and only _decode_chunk reads it; the main process never sets it
# (decoding there passes its spec to process_guarded directly), so two runs in one process cannot
# see each other's settings. The per-file time limit is the spec's (cfg.file_timeout_s), applied
# by _decode_chunk alone: it ends the process, so only a worker process may have one.
_worker_spec: WorkerSpec | None = None


def _init_pool_worker(spec: WorkerSpec) -> None:
    """A worker process' initializer: keeps the run's spec for its tasks, in a process tuned for
    decoding."""
    global _worker_spec
    from medops.procs import reuse_freed_memory

    reuse_freed_memory()
    _worker_spec = spec


def _decode_chunk(rels: list[str], spill: str | None = None) -> list[FileOutcome]:
    """A pool task: :func:`process_chunk` with the spec this worker process was started with, each
    file under its time limit (``ingest.file_timeout_s``), the de-identified files left in
    ``spill`` when given."""
    if _worker_spec is None:
        raise RuntimeError("_decode_chunk runs in an ingest pool's worker process only")
    return process_chunk(_worker_spec, rels, time_limit=_worker_spec.cfg.file_timeout_s, spill=spill)


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
            out.append(process_guarded(spec, rel))
            continue
        started = time.monotonic()
        try:
            out.extend(pool.submit(_decode_chunk, [rel]).result())
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            out.append(died_reading(rel, time.monotonic() - started, spec.cfg.file_timeout_s))
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


class LocalPool:
    """The :class:`~medops.stages.ingest.executors.Executor` for one machine: ``workers`` spawned
    processes (fewer when there are few files; none, decoding here, for one chunk's worth), chunks
    sized by :func:`chunk_size` (guided self-scheduling: a process pool has no work stealing).

    The pool starts with the first chunk (a rerun with nothing new starts no process), or at once
    when ``prelaunch`` (a full rebuild: its processes start up while the main process sets up its
    outputs). With ``spill_dir`` (a folder on the outputs' disk, made when the first chunk goes
    out), each chunk's worker leaves its de-identified files in a spill file of its own there
    (:class:`~medops.stages.ingest.worker.Spilled`): 2,000 CT slices are 1 GB that would
    otherwise be pickled, sent through a pipe, unpickled and checksummed by the main process, most
    of its CPU time and a quarter of the run's (benchmarks/scale/README.md, section 0).

    A worker that dies (a decoder plugin that crashes on a malformed file) costs a pool restart:
    the chunk it held is retried one file per task (:func:`_isolate`), so only the culprit is
    quarantined, and the other chunks in flight are handed out again whole.
    """

    def __init__(self, spec: WorkerSpec, workers: int, expected: int, prelaunch: bool = False,
                 spill_dir: Path | None = None) -> None:
        self.spec, self.workers, self.expected, self.spill_dir = spec, workers, expected, spill_dir
        self.spills = 0  # spill files named so far
        self.slots = _pool_size(expected, workers)
        self.inline = self.slots <= 1
        self.starting = _launch_pool(self.slots, spec) if prelaunch and not self.inline else None
        self.pool: ProcessPoolExecutor | None = None
        self.started = False
        self.generation = 0  # pool restarts so far

    def chunk_size(self, handed_out: int) -> int:
        return chunk_size(self.expected, self.workers, handed_out)

    def submit(self, rels: list[str]) -> tuple[Future, int]:
        if not self.started:  # lazily: a rerun with nothing new starts no process
            self.started = True
            self.pool = (_ready(self.starting) if self.starting is not None
                         else _start_pool(self.slots, self.spec))
        if self.pool is None:
            return _done(process_chunk(self.spec, rels)), self.generation
        spill = None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self.spills += 1  # a new name for every task, a chunk handed out again included
            spill = str(self.spill_dir / f"chunk-{self.spills:08d}.bin")
        try:
            return self.pool.submit(_decode_chunk, rels, spill), self.generation
        except BrokenProcessPool as exc:  # a worker died meanwhile: dealt with in turn
            future: Future = Future()
            future.set_exception(exc)
            return future, self.generation

    def outcomes(self, handle: tuple[Future, int], rels: list[str]) -> list[FileOutcome]:
        future, generation = handle
        try:
            return future.result()
        except BrokenProcessPool:
            if generation < self.generation:  # broken with an earlier pool: hand it out again
                return self.outcomes(self.submit(rels), rels)
            assert self.pool is not None
            self.pool.shutdown(wait=False, cancel_futures=True)
            results = _isolate(rels, self.spec)
            restarted = _start_pool(self.slots, self.spec)
            if restarted is None:
                raise IngestError("ingest worker processes cannot be restarted after a crash")
            self.pool = restarted
            self.generation += 1
            return results

    def close(self) -> None:
        for pool in (self.pool, self.starting.pool if self.starting is not None else None):
            if pool is not None:
                pool.shutdown(cancel_futures=True)
