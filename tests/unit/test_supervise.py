"""The supervisord configuration medops writes, read back by supervisord's own parser, and
`medops status` where nothing runs. The kills and restarts are in
tests/integration/test_supervised.py."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from medops.cli import main
from medops.errors import ExitCode, MedopsError
from medops.ops.supervise import ALL_SERVICES, SERVICES, render_conf, socket_path
from medops.paths import ProjectPaths


def supervisord_reads(paths: ProjectPaths, services=ALL_SERVICES):
    """supervisord's own reading of the config medops writes (ServerOptions, as `supervisord -c`)."""
    from supervisor.options import ServerOptions

    conf = paths.state / "supervisor" / "supervisord.conf"
    conf.parent.mkdir(parents=True)
    for folder in (paths.logs, paths.run_dir):
        folder.mkdir(parents=True, exist_ok=True)
    conf.write_text(render_conf(paths, services))
    opts = ServerOptions()
    opts.realize(args=["-c", str(conf)])
    return opts


def test_supervisord_keeps_each_service_alive_with_the_command_and_log_medops_expects(tmp_path):
    paths = ProjectPaths(tmp_path)
    opts = supervisord_reads(paths)
    programs = sorted((pc for g in opts.process_group_configs for pc in g.process_configs),
                      key=lambda pc: pc.priority)
    assert [pc.name for pc in programs] == ["prefect", "triton", "deployments", "watcher"]
    for pc in programs:
        svc = SERVICES[pc.name]
        assert shlex.split(pc.command) == [sys.executable, "-m", "medops.ops.supervise", pc.name,
                                           "--project", str(tmp_path)]
        # restarted however it ended (supervisor's RestartUnconditionally for "true")
        from supervisor.datatypes import RestartUnconditionally

        assert pc.autorestart is RestartUnconditionally
        assert pc.stdout_logfile == str(paths.logs / svc.log) and pc.redirect_stderr
        assert pc.stdout_logfile_maxbytes == 0  # the log medops reads is never rotated away
        assert pc.killasgroup and pc.stopasgroup == svc.stopasgroup
    # Triton ends its own Python-backend stubs on SIGTERM: it alone gets it
    assert [pc.name for pc in programs if not pc.stopasgroup] == ["triton"]
    server = opts.server_configs[0]
    assert (server["file"], server["chmod"]) == (str(socket_path(paths)), 0o700)
    assert opts.pidfile == str(paths.run_dir / "supervisord.pid")


def test_a_subset_keeps_the_start_order(tmp_path):
    opts = supervisord_reads(ProjectPaths(tmp_path), ["watcher", "triton"])
    programs = sorted((pc for g in opts.process_group_configs for pc in g.process_configs),
                      key=lambda pc: pc.priority)
    assert [pc.name for pc in programs] == ["triton", "watcher"]


def test_a_deep_project_gets_a_socket_path_a_unix_socket_can_have(tmp_path):
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    sock = socket_path(ProjectPaths(deep))
    assert len(str(sock)) < 108 and not sock.is_relative_to(deep)
    assert socket_path(ProjectPaths(deep)) == sock  # the same project, the same socket
    assert socket_path(ProjectPaths(tmp_path / "other")) != sock


def test_a_path_supervisord_would_misread_is_refused(tmp_path):
    with pytest.raises(MedopsError, match="holds '%'"):
        render_conf(ProjectPaths(tmp_path / "50%done"), ALL_SERVICES)


def test_medops_status_json_where_nothing_runs(tmp_path, repo_root, capsys):
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    assert main(["--project", str(tmp_path), "status", "--json"]) == ExitCode.UNAVAILABLE
    out = json.loads(capsys.readouterr().out)
    assert out["supervisor"]["running"] is False
    assert [s["name"] for s in out["services"]] == list(SERVICES)
    for row in out["services"]:
        assert {"name", "running", "pid", "uptime_s", "restarts"} <= row.keys()
        assert (row["running"], row["pid"], row["uptime_s"], row["restarts"], row["state"]) == (
            False, None, None, 0, "STOPPED")
    assert main(["--project", str(tmp_path), "status"]) == ExitCode.UNAVAILABLE
    assert capsys.readouterr().out.startswith("supervisord: not running")


def test_medops_down_where_nothing_runs(tmp_path, repo_root, capsys):
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    assert main(["--project", str(tmp_path), "down"]) == ExitCode.OK
    assert capsys.readouterr().out.strip() == "nothing was running"


def test_medops_up_refuses_an_unknown_service(tmp_path, repo_root, capsys):
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    assert main(["--project", str(tmp_path), "up", "tritn"]) != ExitCode.OK
    assert "unknown service(s) ['tritn']" in capsys.readouterr().err
    assert not (tmp_path / ".medops" / "run" / "supervisord.pid").exists()


def test_medops_up_refuses_a_prefect_api_beyond_the_loopback_without_basic_auth(tmp_path, repo_root,
                                                                               capsys, monkeypatch):
    from medops.config import update_params_file

    for key in ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"):
        monkeypatch.delenv(key, raising=False)
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    update_params_file(tmp_path / "params.yaml", {"prefect": {"host": "0.0.0.0"}})
    assert main(["--project", str(tmp_path), "up", "prefect"]) != ExitCode.OK
    assert "refusing to start the Prefect server on 0.0.0.0" in capsys.readouterr().err
    assert not (tmp_path / ".medops" / "run" / "supervisord.pid").exists()
