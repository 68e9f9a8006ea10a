"""Where ingest's per-file work runs: one interface, two implementations, chosen by
``ingest.cluster``.

- :class:`~medops.stages.ingest.pool.LocalPool` (``cluster: null``): a process pool on this
  machine. Starts in a fraction of a second, nothing to install or run beside medops; its own
  chunk sizing (guided self-scheduling) and crash handling.
- :class:`~medops.stages.ingest.cluster.DaskCluster` (``cluster: local`` or a scheduler's
  address): a ``dask.distributed`` cluster. Dask places the tasks (work stealing), restarts dead
  worker processes (nannies) and hands a dead worker's tasks to the others; medops only sizes
  the tasks and bounds how many are in flight.

Both are driven by :func:`decode_in_order`, which keeps what no scheduler gives: the outcomes in
source-path order (so the outputs do not depend on where a file was decoded) through a bounded
window (so memory does not grow with the export).
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

from medops.stages.ingest.pool import LocalPool, _Item
from medops.stages.ingest.worker import FileOutcome, WorkerSpec, process_guarded


_AHEAD_PER_WORKER = 3           # tasks in flight per worker: keeps workers busy without piling up results
_MAX_CHUNK_BYTES = 32 << 20     # source bytes per task: a task's results hold its files' de-identified bytes


class Executor(Protocol):
    """Runs :func:`~medops.stages.ingest.worker.process_chunk` on chunks of files somewhere.

    ``slots``: how many chunks run at once; ``inline``: decode in this process (too few files
    for workers to pay off). ``submit`` hands a chunk out and returns a handle; ``outcomes``
    waits for it and returns one outcome per file, in the chunk's order: a worker that died on
    the way costs a retry, and a file that keeps killing workers is a ``decode_error`` outcome,
    never a missing one.
    """

    spec: WorkerSpec
    slots: int
    inline: bool

    def chunk_size(self, handed_out: int) -> int: ...

    def submit(self, rels: list[str]) -> Any: ...

    def outcomes(self, handle: Any, rels: list[str]) -> list[FileOutcome]: ...

    def close(self) -> None: ...


def open_executor(spec: WorkerSpec, expected: int, rebuild: bool, spill_dir: Path | None = None) -> Executor:
    """The executor ``spec.cfg.cluster`` names, for ``expected`` files at most to decode
    (``rebuild``: every file will be decoded, so a local pool is started at once; ``spill_dir``:
    where a local pool's workers leave the de-identified files, see :class:`LocalPool`)."""
    if spec.cfg.cluster is None:
        return LocalPool(spec, spec.cfg.workers, expected, prelaunch=rebuild, spill_dir=spill_dir)
    from medops.stages.ingest.cluster import DaskCluster

    return DaskCluster(spec, spec.cfg.cluster, spec.cfg.workers, expected)


def _size(spec: WorkerSpec, rel: str) -> int:
    try:
        return os.stat(spec.source_dir / rel).st_size
    except OSError:  # the worker will say why
        return 0


def decode_in_order(items: Iterable[_Item], executor: Executor, expected: int) -> Iterator[_Item]:
    """``items`` in their order, each one to decode (``prior is None``) with its ``outcome``.

    Bounded whatever the number of files: at most ``slots * _AHEAD_PER_WORKER`` chunks in flight,
    each of at most ``_MAX_CHUNK_BYTES`` of source files (or one file), and twice as many chunks'
    worth of items read ahead. ``expected`` (an upper bound of the files to decode) sizes the
    chunks. The executor is closed when the generator is.
    """
    try:
        if executor.inline:
            for item in items:
                if item.prior is None:
                    item.outcome = process_guarded(executor.spec, item.rel)
                yield item
            return
        yield from _windowed(items, executor)
    finally:
        executor.close()


def _windowed(items: Iterable[_Item], executor: Executor) -> Iterator[_Item]:
    size = executor.chunk_size(0)  # first: a cluster knows its slots once connected
    max_inflight = executor.slots * _AHEAD_PER_WORKER
    inflight: deque[tuple[Any, list[str]]] = deque()
    open_chunk: list[str] = []
    open_bytes = handed_out = 0
    max_window = 2 * max_inflight * size
    source = iter(items)
    window: deque[_Item] = deque()
    ready: deque[FileOutcome] = deque()
    exhausted = False

    def submit() -> None:
        nonlocal open_chunk, open_bytes, handed_out, size
        inflight.append((executor.submit(open_chunk), open_chunk))
        handed_out += len(open_chunk)
        size = executor.chunk_size(handed_out)
        open_chunk, open_bytes = [], 0

    while True:
        while not exhausted and len(inflight) < max_inflight and len(window) < max_window:
            item = next(source, None)
            if item is None:
                exhausted = True
                break
            window.append(item)
            if item.prior is None:
                open_chunk.append(item.rel)
                open_bytes += _size(executor.spec, item.rel)
                if len(open_chunk) >= size or open_bytes >= _MAX_CHUNK_BYTES:
                    submit()
        if open_chunk and len(inflight) < max_inflight and (exhausted or len(window) >= max_window):
            submit()  # nothing more to add to it soon: keep the workers busy
        if not window:
            return
        item = window.popleft()
        if item.prior is None:
            if not ready:
                if not inflight:
                    submit()  # the item is in the open chunk
                handle, rels = inflight.popleft()
                ready.extend(executor.outcomes(handle, rels))
            item.outcome = ready.popleft()
            assert item.outcome.path == item.rel, (item.outcome.path, item.rel)
        yield item
