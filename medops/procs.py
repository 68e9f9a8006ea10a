"""Process bookkeeping shared by the servers medops starts (Prefect, Triton, the demo's flow server).

Each server is started in its own session and recorded by pid; these helpers answer "is it still
running" and signal it, without mistaking a zombie or an exiting process for a live server.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cmdline_contains", "pid_alive", "signal_group"]


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
