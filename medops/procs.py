"""Process bookkeeping shared by the servers medops starts (Prefect, Triton, the demo's flow server).

Each server is started in its own session and recorded by pid; these helpers answer "is it still
running" and signal it, without mistaking a zombie or an exiting process for a live server.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["cmdline_contains", "exit_after", "pid_alive", "reuse_freed_memory", "signal_group",
           "terminate"]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie; reaps it first if it is our exited child.

    A process we cannot signal (another user's) counts as alive. This looks only at the pid, not
    at the command line: an exiting process has an empty ``/proc/PID/cmdline`` for a moment while
    it still runs and holds its ports, so waiting for a stopped server must use this check.
    """
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: the checks below decide
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): kill(0) said it exists
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def cmdline_contains(pid: int, token: bytes) -> bool | None:
    """Whether ``pid``'s command line contains ``token``; None where /proc cannot tell (macOS)."""
    try:
        return token in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group ``pid`` leads, or to ``pid`` alone if that is refused."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def terminate(pid: int, timeout: float, *, group_first: bool = True,
              kill_wait: float = 5.0) -> bool:
    """Stop ``pid`` (a session leader medops started): SIGTERM, then SIGKILL to its whole process
    group if it still runs after ``timeout`` seconds; then wait up to ``kill_wait`` seconds more.

    ``group_first``: the SIGTERM goes to the whole group too; False sends it to ``pid`` alone,
    for a server that ends its own children on SIGTERM and must not have them killed under it
    (tritonserver and its Python-backend stubs). Waits on the pid itself, never on its command
    line, which an exiting process has already emptied while it still holds its ports.

    Returns:
        Whether ``pid`` is gone.
    """
    if group_first:
        signal_group(pid, signal.SIGTERM)
    else:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return True
    if _wait_gone(pid, timeout):
        return True
    signal_group(pid, signal.SIGKILL)
    return _wait_gone(pid, kill_wait)


_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3


def reuse_freed_memory(mmap_threshold: int = 16 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Let glibc's malloc serve large temporary buffers from memory it already holds.

    By default glibc gives each block over 128 kB (a decoded slice, its float copy) fresh pages
    from ``mmap`` and returns them on ``free``, so a worker that decodes one image after another
    takes every page fault again, per image. Raising the mmap threshold and the trim threshold
    keeps up to ``trim_threshold`` bytes of freed memory for the next image instead. For worker
    processes with a bounded per-item working set (ingest workers); returns False where the C
    library is not glibc (nothing changed).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


_DEVNULL: list = []


@contextmanager
def exit_after(seconds: float | None) -> Iterator[None]:
    """End this process (``_exit(1)``) if the block is still running after ``seconds``; None or
    0: no limit.

    For worker processes whose parent notices a dead worker and says why (ingest's per-file time
    limit): a decoder stuck in Rust or C code holding the GIL cannot be interrupted by a Python
    signal handler, but faulthandler's watchdog is a C thread that needs no GIL. Its traceback
    goes to /dev/null (the parent reports the file, not the worker's stack). Never use it in a
    process that must survive: there is no way to cancel the exit once it fires.
    """
    if not seconds:
        yield
        return
    if not _DEVNULL:
        _DEVNULL.append(open(os.devnull, "w"))  # noqa: SIM115 -- kept open for the watchdog
    faulthandler.dump_traceback_later(seconds, exit=True, file=_DEVNULL[0])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
