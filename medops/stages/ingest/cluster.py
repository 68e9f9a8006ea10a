"""Ingest's per-file work on a ``dask.distributed`` cluster (``ingest.cluster``): a
``LocalCluster`` of worker processes that medops starts (``local``), or an existing scheduler
(``tcp://host:8786``), whose workers must import the same medops and read ``source_dir`` at the
same path (they write nothing: outcomes, images and de-identified bytes come back as results).

What Dask does here that :mod:`medops.stages.ingest.pool` does by hand: placing tasks on workers
(and stealing them back from a busy one), restarting a worker process that died (its nanny), and
handing a dead worker's tasks to the others; a task that has killed
``distributed.scheduler.allowed-failures`` workers ends as ``KilledWorker``, and its files are then
run one per task so that only the culprit is quarantined (``decode_error``), never lost.

The run's :class:`~medops.stages.ingest.worker.WorkerSpec` (the key and the manifest's labels) goes
to every worker once, as a worker plugin registered for this run (a worker that joins or restarts
gets it too), and is removed at the end; tasks carry the plugin's name and file names only, and
their keys (``ingest-chunk-<run>-<n>``, what the dashboard shows) name nothing else.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from medops.errors import IngestError
from medops.stages.ingest.worker import FileOutcome, WorkerSpec, died_reading, process_chunk


log = logging.getLogger(__name__)
_MAX_CHUNK = 64  # files per task, as the local pool; Dask's work stealing evens out the end


class IngestSpec(WorkerPlugin):
    """Holds one ingest run's spec on each worker (``worker.plugins[name].spec``)."""

    def __init__(self, spec: WorkerSpec, name: str) -> None:
        self.spec, self.name = spec, name

    def setup(self, worker: Any) -> None:
        from medops.procs import reuse_freed_memory

        reuse_freed_memory()


def decode_chunk_on_worker(plugin: str, rels: list[str]) -> list[FileOutcome]:
    """A Dask task: :func:`process_chunk` with the spec the run's plugin left on this worker, each
    file under ``ingest.file_timeout_s`` when the worker runs one task at a time (the time limit
    ends the process, and its watchdog is one per process: a worker with several threads would
    lose the other tasks, so it runs without one)."""
    from distributed import get_worker

    worker = get_worker()
    spec = worker.plugins[plugin].spec
    single = worker.state.nthreads == 1
    return process_chunk(spec, rels, time_limit=spec.cfg.file_timeout_s if single else None)


class DaskCluster:
    """The :class:`~medops.stages.ingest.executors.Executor` on a Dask cluster; connects (or
    starts the ``LocalCluster``) with the first chunk, so a run with nothing to decode starts
    nothing."""

    inline = False

    def __init__(self, spec: WorkerSpec, address: str, workers: int, expected: int) -> None:
        self.spec, self.address, self.workers, self.expected = spec, address, workers, expected
        self.run = uuid.uuid4().hex[:12]
        self.plugin = f"medops-ingest-{self.run}"
        self.client: Any = None
        self.cluster: Any = None
        self.tasks = 0
        self.sent: dict[str, float] = {}  # task key -> when it was handed out
        self.slots = workers if address == "local" else 0
        self._size = 0

    def _connect(self) -> None:
        from distributed import Client, LocalCluster

        if self.address == "local":
            import dask

            # processes, one thread each: decoding holds the GIL; everything on the loopback, the
            # scheduler's HTTP server (health, metrics; the dashboard with bokeh) on a free port.
            # No statistical profiler: a worker keeps one profile per second of work (up to
            # distributed.admin.low-level-log-length of them), which grew its memory with the
            # run's length (see benchmarks/scale, section 3); its nanny passes this config on
            with dask.config.set({"distributed.worker.profile.enabled": False}):
                self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                            host="127.0.0.1", dashboard_address="127.0.0.1:0")
            self.client = Client(self.cluster)
        else:
            self.client = Client(self.address, timeout=30)
        self.client.register_plugin(IngestSpec(self.spec, self.plugin), name=self.plugin)
        self.slots = max(1, sum(self.client.nthreads().values()))

    def chunk_size(self, handed_out: int) -> int:
        if not self._size:  # one size for the run: Dask balances the tasks
            if self.client is None:
                self._connect()
            self._size = max(1, min(_MAX_CHUNK, math.ceil(self.expected / (self.slots * 4))))
        return self._size

    def submit(self, rels: list[str]) -> Any:
        if self.client is None:
            self._connect()
        self.tasks += 1
        key = f"ingest-chunk-{self.run}-{self.tasks}"
        self.sent[key] = time.monotonic()
        return self.client.submit(decode_chunk_on_worker, self.plugin, rels, pure=False, key=key)

    def outcomes(self, handle: Any, rels: list[str]) -> list[FileOutcome]:
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker

        sent = self.sent.pop(handle.key, time.monotonic())
        try:
            return handle.result()
        except KilledWorker:
            if len(rels) == 1:  # timeout when its tries took the time limit (each one at least)
                return [died_reading(rels[0], time.monotonic() - sent, self.spec.cfg.file_timeout_s)]
            log.warning("an ingest task kept killing Dask workers; its %d files are retried one by one",
                        len(rels))
            # one at a time: a worker's death counts against every task it held, so a single that
            # shared a worker with the culprit could be taken for one
            return [outcome for rel in rels for outcome in self.outcomes(self.submit([rel]), [rel])]
        except FutureCancelledError as exc:  # the scheduler went away, or the client lost it
            raise IngestError(f"the Dask cluster at {self.address} lost an ingest task: {exc}") from exc

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.unregister_worker_plugin(self.plugin)
            except Exception as exc:  # a cluster going away must not hide the run's own outcome
                log.warning("could not remove the ingest plugin from the Dask workers: %s", exc)
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None
