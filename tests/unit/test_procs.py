"""medops.procs: liveness checks that do not mistake zombies or exiting processes for servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from medops.procs import cmdline_contains, pid_alive, signal_group, terminate


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


# A session leader with a child, like the servers medops starts. The child notes a SIGTERM in a
# marker file. On SIGTERM the leader gives its child a second to end, then ends it itself with
# SIGKILL (as tritonserver ends its backend stubs); "hung", it ignores SIGTERM.
_CHILD = (
    "import os, signal, sys, time\n"
    "def term(*_):\n"
    "    open(sys.argv[1], 'w').write('TERM'); sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, term)\n"
    "print(os.getpid(), flush=True)\n"
    "time.sleep(60)\n"
)
_LEADER = (
    "import signal, subprocess, sys, time\n"
    "def bye(*_):\n"
    "    try:\n"
    "        c.wait(timeout=1)\n"
    "    except subprocess.TimeoutExpired:\n"
    "        c.kill(); c.wait()\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == 'hung' else bye)\n"
    "c = subprocess.Popen([sys.executable, '-c', sys.argv[2], sys.argv[3]])\n"
    "time.sleep(60)\n"
)


def _leader(mode: str, marker) -> tuple[subprocess.Popen, int]:
    """The leader and its child's pid (read once the child's SIGTERM handler is in place)."""
    leader = subprocess.Popen([sys.executable, "-c", _LEADER, mode, _CHILD, str(marker)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    return leader, int(leader.stdout.readline())


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pid_alive(pid)


@pytest.mark.parametrize("group_first", [False, True])
def test_terminate_sends_sigterm_to_the_leader_alone_or_to_its_group(tmp_path, group_first):
    marker = tmp_path / "child-got-sigterm"
    leader, child = _leader("clean", marker)
    try:
        start = time.monotonic()
        assert terminate(leader.pid, 10, group_first=group_first) is True
        assert time.monotonic() - start < 5  # SIGTERM was enough: no wait for the timeout
        assert _gone(child)
        # alone: the leader ended its child itself; group: the child got SIGTERM as well
        assert marker.exists() is group_first
    finally:
        leader.kill()
        leader.wait()


@pytest.mark.parametrize("group_first", [False, True])
def test_terminate_kills_the_whole_group_of_a_leader_that_ignores_sigterm(tmp_path, group_first):
    marker = tmp_path / "child-got-sigterm"
    leader, child = _leader("hung", marker)
    try:
        start = time.monotonic()
        assert terminate(leader.pid, 0.5, group_first=group_first) is True
        assert time.monotonic() - start >= 0.5  # waited out the timeout, then SIGKILL
        assert _gone(child)  # SIGKILL went to the whole group
        assert marker.exists() is group_first
    finally:
        leader.kill()
        leader.wait()


def test_terminate_a_gone_process_is_quiet() -> None:
    proc = _sleeper()
    proc.kill()
    proc.wait()
    assert terminate(proc.pid, 1, group_first=False) is True
    assert terminate(proc.pid, 1, group_first=True) is True


def test_exit_after_ends_a_process_stuck_past_its_limit_and_not_one_that_finishes() -> None:
    code = ("import time, sys; from medops.procs import exit_after\n"
            "with exit_after({limit}):\n    time.sleep({sleep})\n"
            "time.sleep(0.5); print('done')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    started = time.monotonic()
    stuck = subprocess.run([sys.executable, "-c", code.format(limit=0.3, sleep=30)],
                           capture_output=True, text=True, env=env, timeout=60)
    assert stuck.returncode == 1 and time.monotonic() - started < 20
    assert stuck.stdout == "" and "Traceback" not in stuck.stderr  # the dump goes to /dev/null
    done = subprocess.run([sys.executable, "-c", code.format(limit=0.3, sleep=0.01)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert (done.returncode, done.stdout) == (0, "done\n")  # cancelled on leaving the block
