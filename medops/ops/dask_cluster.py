"""A Dask cluster as separate processes on this machine: ``dask scheduler`` and ``dask worker``
(each worker under its nanny), bound to 127.0.0.1, stopped by pid. What the tests and
``benchmarks/scale`` run ingest against: the same processes and protocol as a real cluster,
without one. (``ingest.cluster: local`` is simpler for one machine: medops starts a LocalCluster
itself.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from medops.errors import MedopsError
from medops.procs import terminate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ProcessCluster:
    address: str                       # tcp://127.0.0.1:PORT
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)

    def worker_pids(self) -> dict[str, int]:
        """The worker processes' pids by worker address (not the nannies')."""
        import os as _os

        from distributed import Client

        with Client(self.address, timeout=30) as client:
            return client.run(_os.getpid)

    def stop(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc.poll() is None:
                terminate(proc.pid, timeout=10)
            proc.wait(timeout=10)


def _dask(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "dask"), *args]


@contextmanager
def process_cluster(n_workers: int = 2, *, preload: Sequence[str] = (), env: dict[str, str] | None = None,
                    log_dir: Path | None = None, timeout: float = 60.0) -> Iterator[ProcessCluster]:
    """A scheduler and ``n_workers`` single-threaded worker processes (each with a nanny, which
    restarts it should it die), on free loopback ports; stopped on leaving.

    Args:
        preload: modules or scripts each worker loads at start (``dask worker --preload``).
        env: extra environment for every process (e.g. ``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES``).
        log_dir: where each process's output goes (default: discarded).

    Raises:
        MedopsError: the workers did not all connect within ``timeout`` seconds.
    """
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    run_env = {**os.environ, **(env or {})}

    def spawn(name: str, argv: list[str]) -> subprocess.Popen:
        out = open(log_dir / f"{name}.log", "wb") if log_dir is not None else subprocess.DEVNULL
        try:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=run_env,
                                    start_new_session=True)
        finally:
            if log_dir is not None:
                out.close()

    scheduler = spawn("scheduler", _dask("scheduler", "--host", "127.0.0.1", "--port", str(port),
                                         "--no-dashboard"))
    cluster = ProcessCluster(address, scheduler)
    try:
        for i in range(n_workers):
            argv = _dask("worker", address, "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1",
                         "--no-dashboard", "--name", f"medops-worker-{i}", "--death-timeout", "60")
            for module in preload:
                argv += ["--preload", module]
            cluster.workers.append(spawn(f"worker-{i}", argv))
        _wait_for_workers(address, n_workers, timeout)
        yield cluster
    finally:
        cluster.stop()


def _wait_for_workers(address: str, n: int, timeout: float) -> None:
    from distributed import Client

    deadline = time.monotonic() + timeout
    with Client(address, timeout=timeout) as client:
        try:
            client.wait_for_workers(n, timeout=max(1.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise MedopsError(f"{n} Dask worker(s) did not connect to {address} within {timeout:.0f} s") from exc
