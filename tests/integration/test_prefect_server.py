"""medops.ops.prefect_server: a real `prefect server start` on a free port with a temporary home."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from medops.config import PrefectConfig
from medops.errors import PrefectServerError
from medops.ops.prefect_server import (
    is_healthy,
    log_file,
    pid_file,
    prefect_env,
    prefect_status,
    start_prefect,
    stop_prefect,
)
from medops.procs import pid_alive

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


def test_start_reuse_status_stop(tmp_path: Path, free_port) -> None:
    cfg = PrefectConfig(port=free_port())
    state = tmp_path / ".medops"
    try:
        info = start_prefect(cfg, state_dir=state)
        assert info.healthy and not info.reused
        assert int(pid_file(state).read_text()) == info.pid
        assert is_healthy(cfg.api_url)
        # the server's SQLite database lives in its own PREFECT_HOME
        assert (state / "prefect" / "prefect.db").is_file()
        assert "prefect server start" in log_file(state).read_text()
        with urllib.request.urlopen(f"{cfg.api_url}/version", timeout=5) as resp:
            assert resp.status == 200

        again = start_prefect(cfg, state_dir=state)
        assert again.reused and again.pid == info.pid

        status = prefect_status(cfg, state_dir=state)
        assert status.running and status.healthy and status.pid == info.pid
        assert prefect_env(cfg, state) == {"PREFECT_API_URL": cfg.api_url,
                                           "PREFECT_HOME": str(state / "prefect")}

        assert stop_prefect(state) is True
        assert not pid_alive(info.pid)
        assert not pid_file(state).exists()
        assert not is_healthy(cfg.api_url)
        status = prefect_status(cfg, state_dir=state)
        assert not status.running and not status.healthy and status.pid is None
    finally:
        stop_prefect(state)
    assert stop_prefect(state) is False  # nothing left to stop


def test_stale_pid_file_is_replaced_and_busy_port_is_reported(tmp_path: Path, free_port) -> None:
    state = tmp_path / ".medops"
    pid_file(state).parent.mkdir(parents=True)
    pid_file(state).write_text("999999\n")  # no such process
    assert not prefect_status(PrefectConfig(port=free_port()), state_dir=state).running

    with socket.socket() as blocker:  # something else listens on the port: the server cannot bind
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        cfg = PrefectConfig(port=blocker.getsockname()[1])
        with pytest.raises(PrefectServerError, match="exited before .*/health answered"):
            start_prefect(cfg, state_dir=state, timeout=60)
    assert not pid_file(state).exists()


def test_the_demos_processes_get_the_servers_environment(tmp_path: Path, params) -> None:
    """What `make demo` starts (the flow, flows.serve) talks to this server with its PREFECT_HOME."""
    from medops.ops.demo import _service_env
    from medops.paths import ProjectPaths

    paths = ProjectPaths(tmp_path)
    env = _service_env(paths, params)
    assert prefect_env(params.prefect, paths.state).items() <= env.items()
    assert env["PREFECT_HOME"] == str(paths.state / "prefect")
