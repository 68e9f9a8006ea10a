"""medops.ops.prefect_server: a real `prefect server start` on a free port with a temporary home."""

from __future__ import annotations

import json
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
        # the UI (served at /) is told where the API is: on this port, not Prefect's default 4200
        with urllib.request.urlopen(f"{cfg.ui_url}/ui-settings", timeout=5) as resp:
            assert json.loads(resp.read())["api_url"] == cfg.api_url

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


AUTH = "medops-admin:pr3fect-s3cret-for-tests"


def test_the_loopback_test_is_strict() -> None:
    from medops.ops.prefect_server import is_loopback

    assert all(map(is_loopback, ("127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "10.1.2.3", "192.168.0.5", "prefect.example.org", "")))


def test_beyond_the_loopback_the_api_needs_basic_auth(tmp_path: Path, free_port, monkeypatch) -> None:
    """Bound to every interface, the server starts only with an auth string; requests without it
    (or with a wrong one) get 401, with it they work, and medops' clients get it by environment."""
    import base64
    import os
    import subprocess
    import sys

    import httpx

    from medops.ops.prefect_server import CLIENT_AUTH_ENV, SERVER_AUTH_ENV, auth_file

    for name in (SERVER_AUTH_ENV, CLIENT_AUTH_ENV):
        monkeypatch.delenv(name, raising=False)
    cfg = PrefectConfig(host="0.0.0.0", port=free_port())
    state = tmp_path / ".medops"
    with pytest.raises(PrefectServerError, match=rf"refusing to start the Prefect server on 0\.0\.0\.0: .*{SERVER_AUTH_ENV}"):
        start_prefect(cfg, state_dir=state)
    assert not pid_file(state).exists() and not is_healthy(cfg.api_url)

    auth_file(state).parent.mkdir(parents=True)
    auth_file(state).write_text(AUTH + "\n")
    auth_file(state).chmod(0o600)
    api = f"http://127.0.0.1:{cfg.port}/api"
    try:
        info = start_prefect(cfg, state_dir=state)
        assert httpx.get(f"{api}/health", timeout=5).status_code == 200  # probes stay open
        assert httpx.post(f"{api}/flows/filter", json={}, timeout=5).status_code == 401
        assert httpx.post(f"{api}/flows/filter", json={}, auth=("medops-admin", "wrong"), timeout=5).status_code == 401
        token = base64.b64encode(AUTH.encode()).decode()
        ok = httpx.post(f"{api}/flows/filter", json={}, headers={"Authorization": f"Basic {token}"}, timeout=5)
        assert ok.status_code == 200 and ok.json() == []
        assert httpx.get(f"http://127.0.0.1:{cfg.port}/ui-settings", timeout=5).json()["auth"] == "BASIC"

        # what medops starts (flows, flows.serve, medops watch) gets the string from prefect_env
        env = prefect_env(cfg, state)
        assert env[CLIENT_AUTH_ENV] == AUTH
        client = ("from prefect.client.orchestration import get_client\n"
                  "with get_client(sync_client=True) as c: print('hello', c.hello().status_code)")
        for given, expect in ((env, "hello 200"), ({k: v for k, v in env.items() if k != CLIENT_AUTH_ENV}, "401")):
            done = subprocess.run([sys.executable, "-c", client], env={**os.environ, **given},
                                  capture_output=True, text=True, timeout=120)
            assert expect in done.stdout + done.stderr, done.stderr[-2000:]

        # never on a command line, in the log or in the pid file
        server_pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _in_group(int(p), info.pid)]
        assert info.pid in server_pids
        for pid in server_pids:
            assert AUTH.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        for path in (log_file(state), pid_file(state)):
            assert AUTH not in path.read_text()
    finally:
        stop_prefect(state)


def _in_group(pid: int, pgid: int) -> bool:
    import os

    try:
        return os.getpgid(pid) == pgid
    except OSError:
        return False
