"""medops.procs: liveness checks that do not mistake zombies or exiting processes for servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from medops.procs import cmdline_contains, pid_alive, signal_group


def _sleeper(**kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)


def test_running_child_is_alive_and_exited_child_is_not_even_before_reaping() -> None:
    proc = _sleeper()
    try:
        assert pid_alive(proc.pid)
        assert cmdline_contains(proc.pid, b"time.sleep(60)") is True
        assert cmdline_contains(proc.pid, b"tritonserver") is False
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # pid_alive reaped the zombie itself: the pid no longer exists at all
        assert not pid_alive(proc.pid)
        try:
            os.kill(proc.pid, 0)
            still_there = True
        except ProcessLookupError:
            still_there = False
        assert not still_there
    finally:
        proc.kill()
        proc.wait()


def test_signal_group_reaches_the_whole_session() -> None:
    leader = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
         "print(c.pid, flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        grandchild = int(leader.stdout.readline())
        assert pid_alive(grandchild)
        signal_group(leader.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (pid_alive(leader.pid) or pid_alive(grandchild)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(leader.pid)
        assert not pid_alive(grandchild)
    finally:
        leader.kill()
        leader.wait()


def test_signal_group_on_a_gone_process_is_quiet() -> None:
    proc = _sleeper()
    proc.kill()
    proc.wait()
    signal_group(proc.pid, signal.SIGTERM)  # no exception
    assert not pid_alive(proc.pid)
