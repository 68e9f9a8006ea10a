"""The embedded tritonserver's lifecycle: start, refuse a second start, status, stop by pid."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pytest

from medops.cli import main
from medops.config import ServingConfig
from medops.errors import ExitCode, ServingError
from medops.serving.server import (
    build_command,
    port_in_use,
    prepare_backends,
    read_info,
    server_status,
    start_server,
    stop_server,
)

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def serving_cfg(free_port, **extra) -> ServingConfig:
    return ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                         startup_timeout_s=60, **extra)


def test_start_refuse_second_status_stop(tmp_path, free_port, repo_root, capsys):
    # the project's own state folder, so `medops serve status` finds the server
    cfg, state = serving_cfg(free_port), tmp_path / ".medops"
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    info = start_server(cfg, repository=tmp_path / "repo", state_dir=state)
    try:
        assert (state / "run" / "triton.pid").read_text().strip() == str(info.pid)
        assert read_info(state) == info
        status = server_status(state)
        assert status.running and status.ready
        assert main(["--project", str(tmp_path), "serve", "status", "--json"]) == ExitCode.OK
        out = json.loads(capsys.readouterr().out)
        assert (out["running"], out["ready"], out["detail"]) == (True, True, "ready")
        assert out["info"] == json.loads(info.model_dump_json())
        assert main(["--project", str(tmp_path), "serve", "status"]) == ExitCode.OK
        assert capsys.readouterr().out.startswith(
            f"Triton is ready: HTTP {info.http_url}, gRPC {info.grpc_url}, metrics {info.metrics_url} "
            f"(pid {info.pid}, since ")
        assert port_in_use(cfg.host, cfg.http_port) and port_in_use(cfg.host, cfg.grpc_port)

        with pytest.raises(ServingError, match=rf"already running \(pid {info.pid}"):
            start_server(cfg, repository=tmp_path / "repo", state_dir=state)

        # Another state dir, same ports: the clash is named instead of an obscure bind failure.
        with pytest.raises(ServingError, match=rf"port already in use \(http {cfg.http_port}"):
            start_server(cfg, repository=tmp_path / "repo", state_dir=tmp_path / "other")
    finally:
        stopped = stop_server(state)
    assert stopped
    with pytest.raises(ProcessLookupError):
        os.kill(info.pid, 0)
    assert not (state / "run" / "triton.pid").exists()
    for port in (cfg.http_port, cfg.grpc_port, cfg.metrics_port):
        assert not port_in_use(cfg.host, port), f"port {port} still bound after stop"
    assert not server_status(state).running
    assert stop_server(state) is False
    assert main(["--project", str(tmp_path), "serve", "status"]) == ExitCode.UNAVAILABLE
    assert capsys.readouterr().out.startswith("Triton is not running (no server recorded)")


def test_medops_serve_start_status_stop_json(tmp_path, free_port, repo_root, capsys):
    from medops.config import update_params_file

    cfg = serving_cfg(free_port)
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    update_params_file(tmp_path / "params.yaml", {"serving": {
        "http_port": cfg.http_port, "grpc_port": cfg.grpc_port, "metrics_port": cfg.metrics_port}})
    project = ["--project", str(tmp_path)]
    try:
        assert main([*project, "serve", "start", "--json"]) == ExitCode.OK
        started = json.loads(capsys.readouterr().out)
        assert started["http_url"] == f"127.0.0.1:{cfg.http_port}"
        assert started["grpc_url"] == f"127.0.0.1:{cfg.grpc_port}"
        assert started["restricted"] is True  # `medops serve` always sets a model-repository key
        assert main([*project, "serve", "status", "--json"]) == ExitCode.OK
        assert json.loads(capsys.readouterr().out)["info"]["pid"] == started["pid"]
        # a second start is refused (a ServingError: exit 1), the first server keeps running
        assert main([*project, "serve", "start", "--json"]) == ExitCode.FAILURE
        assert "already running" in json.loads(capsys.readouterr().out)["error"]["message"]
    finally:
        assert main([*project, "serve", "stop", "--json"]) == ExitCode.OK
    assert json.loads(capsys.readouterr().out) == {"stopped": True}
    assert main([*project, "serve", "status", "--json"]) == ExitCode.UNAVAILABLE
    assert json.loads(capsys.readouterr().out)["running"] is False


def _record(state, pid: int, info: str | None) -> None:
    """A server record as start_server writes it: the pid file and ``info`` as triton.json."""
    run = state / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "triton.pid").write_text(f"{pid}\n")
    if info is not None:
        (run / "triton.json").write_text(info)


def _info_json(pid: int) -> str:
    from medops.serving.server import ServerInfo

    return ServerInfo(pid=pid, host="127.0.0.1", http_port=1, grpc_port=2, metrics_port=3,
                      repository="/nowhere", log_file="/nowhere.log", started_at="").model_dump_json()


@pytest.mark.parametrize("with_info", [True, False])
def test_a_stale_record_is_cleared(tmp_path, with_info):
    state = tmp_path / "state"
    _record(state, 999999999, _info_json(999999999) if with_info else None)
    status = server_status(state)
    assert not status.running
    if with_info:  # the record was read: its pid is what is not running
        assert status.detail == "recorded pid 999999999 is not running"
    assert stop_server(state) is False
    assert not (state / "run" / "triton.pid").exists()
    assert not (state / "run" / "triton.json").exists()


def test_an_unreadable_record_does_not_orphan_a_running_server(tmp_path):
    """triton.json unreadable, the pid file naming a live tritonserver: stop it by the pid."""
    import subprocess
    import sys

    from medops.procs import cmdline_contains, pid_alive

    # a stand-in whose command line names tritonserver, leading its own session like the server
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "tritonserver"],
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10  # until it has exec'd: before that it is still pytest
        while not cmdline_contains(proc.pid, b"tritonserver") and time.monotonic() < deadline:
            time.sleep(0.01)
        state = tmp_path / "state"
        _record(state, proc.pid, "{not json")
        assert read_info(state) is None
        assert stop_server(state, timeout=5) is True
        assert not pid_alive(proc.pid)
        assert not (state / "run" / "triton.pid").exists()
        # a pid file naming a live process that is not a tritonserver is left alone
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            _record(state, other.pid, "{not json")
            assert stop_server(state) is False and pid_alive(other.pid)
        finally:
            other.kill()
            other.wait()
    finally:
        proc.kill()
        proc.wait()


def test_a_server_that_dies_at_startup_reports_its_log(tmp_path, free_port):
    repo = tmp_path / "repo"
    (repo / "broken").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\n')
    state = tmp_path / "state"
    with pytest.raises(ServingError, match="exited during startup") as err:
        start_server(serving_cfg(free_port), repository=repo, state_dir=state)
    assert "broken" in str(err.value)  # the log tail names the failing model
    assert not (state / "run" / "triton.pid").exists()


def test_command_binds_the_configured_host_and_ports(tmp_path, free_port):
    cfg = serving_cfg(free_port, host="127.0.0.1")
    cmd = build_command(cfg, repository=tmp_path, backends=prepare_backends(tmp_path))
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                 "--metrics-address=127.0.0.1", f"--http-port={cfg.http_port}",
                 f"--grpc-port={cfg.grpc_port}", f"--metrics-port={cfg.metrics_port}",
                 "--model-control-mode=explicit"):
        assert flag in cmd
    assert "--load-model=*" not in cmd  # empty repository: nothing to load at startup
    assert {p.name for p in (tmp_path / "triton" / "backends" / "python").iterdir()} == {
        "libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}


@pytest.mark.parametrize("flags", ["deploy", "defaults"])
def test_a_fresh_production_repository_serves_with_the_deploy_startup_flags(tmp_path, free_port,
                                                                            flags):
    """deploy/'s tritonserver arguments on the committed repository, which has no classifier
    version before the first deploy: the server stays up and reports ready (the pre- and
    postprocessing models load); Triton's defaults make it exit instead."""
    import shutil
    import subprocess

    import tritonclient.http as httpclient
    from test_deploy_manifests import DEPLOY, dockerfile_cmd

    from medops.serving.server import ServerInfo, server_environment, tritonserver_binary, wait_ready

    repo = tmp_path / "models"
    shutil.copytree(DEPLOY / "model_repository", repo)
    args = [a for a in dockerfile_cmd() if not a.startswith(("--model-repository=", "--exit-timeout"))]
    if flags == "defaults":
        args = [a for a in args if not a.startswith(("--exit-on-error", "--strict-readiness"))]
    cfg = serving_cfg(free_port, host="127.0.0.1")
    log = tmp_path / "logs" / "triton.log"
    log.parent.mkdir()
    cmd = [str(tritonserver_binary()), f"--model-repository={repo}",
           f"--backend-directory={prepare_backends(tmp_path)}", *args, "--exit-timeout-secs=5",
           *(f"--{k}-address=127.0.0.1" for k in ("http", "grpc", "metrics")),
           f"--http-port={cfg.http_port}", f"--grpc-port={cfg.grpc_port}",
           f"--metrics-port={cfg.metrics_port}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_environment())
    info = ServerInfo(pid=proc.pid, host="127.0.0.1", http_port=cfg.http_port,
                      grpc_port=cfg.grpc_port, metrics_port=cfg.metrics_port, repository=str(repo),
                      log_file=str(log), started_at="")
    try:
        if flags == "defaults":
            with pytest.raises(ServingError, match="exited during startup"):
                wait_ready(info, state_dir=tmp_path, timeout=60)
            assert "failed to load all models" in log.read_text()
            return
        wait_ready(info, state_dir=tmp_path, timeout=60)
        client = httpclient.InferenceServerClient(info.http_url)
        try:
            name = "pneumonia_classifier"
            assert client.is_model_ready(f"{name}_preprocess")
            assert client.is_model_ready(f"{name}_postprocess")
            assert not client.is_model_ready(name) and not client.is_model_ready(f"{name}_dicom")
        finally:
            client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_port_in_use_sees_a_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert port_in_use("127.0.0.1", s.getsockname()[1])
