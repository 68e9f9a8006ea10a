"""The demo's servers kept alive by supervisord: the Prefect server, Triton, the deployments
(``flows.serve``) and the export folder watcher.

``start_supervisor`` writes ``.medops/supervisor/supervisord.conf`` and starts supervisord (from
the ``supervisor`` package, in the venv), which starts each service and starts it again whenever
it exits, however it ended (SIGKILL included). Each service runs as
``python -m medops.ops.supervise NAME --project ROOT``: that counts the start, records its pid
where medops has always looked for it (``run/prefect.pid``, ``run/triton.pid`` and
``triton.json``, ``run/flow-serve.pid``, ``run/watch.pid``) and then *becomes* the server
(``os.execve``), so the pid supervisord watches, the recorded pid and the server are one process.
The same command is what the systemd units in ``deploy/systemd/`` run on a real host.

What Triton serves after a restart is decided from the model repository alone (see
``medops.serving.server.exec_server``): the versions each ``config.pbtxt`` pins, which deploy and
rollback change only once a version has passed its checks.

Layout below ``.medops/``: ``supervisor/supervisord.conf``; ``run/supervisord.pid`` and the
control socket ``run/supervisor.sock`` (mode 0700); ``run/supervise/NAME.starts`` (starts since
supervisord started: restarts = starts - 1); ``logs/supervisord.log`` and each service's log
(``prefect.log``, ``triton.log``, ``flow-serve.log``, ``watch.log``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel

from medops.config import Params, load_params
from medops.errors import MedopsError, ServingError
from medops.paths import ProjectPaths
from medops.procs import pid_alive, terminate

SUPERVISORD_PID = "supervisord.pid"


@dataclass(frozen=True)
class Service:
    """One supervised server: how supervisord runs and stops it, where it logs and records its pid."""

    name: str
    what: str
    log: str           # below .medops/logs/
    pid_file: str      # below .medops/run/
    startsecs: int     # up this long after a start = started (supervisord's RUNNING)
    stopwaitsecs: int  # SIGTERM, then SIGKILL after this long
    stopasgroup: bool  # SIGTERM to its process group (its children too)


# In start order (supervisord's priority). Triton ends its own Python-backend stubs on SIGTERM, so
# SIGTERM goes to it alone; the others' children (flow runs of flows.serve) get it too.
SERVICES: dict[str, Service] = {s.name: s for s in (
    Service("prefect", "Prefect server", "prefect.log", "prefect.pid", 5, 20, True),
    Service("triton", "Triton", "triton.log", "triton.pid", 3, 20, False),
    Service("deployments", "deployments (flows.serve)", "flow-serve.log", "flow-serve.pid", 5, 30, True),
    Service("watcher", "export folder watcher", "watch.log", "watch.pid", 3, 10, True),
)}


class ServiceStatus(BaseModel):
    """One service as ``medops status --json`` reports it."""

    name: str
    what: str
    running: bool
    healthy: bool | None = None   # Prefect: /api/health; Triton: ready; None: no check
    state: str                    # supervisord's state (RUNNING, STARTING, BACKOFF, ...) or UNSUPERVISED
    pid: int | None
    uptime_s: float | None
    restarts: int                 # starts since supervisord started, less the first
    log: str


def service_env(paths: ProjectPaths, params: Params) -> dict[str, str]:
    """The environment of the demo's processes: the Prefect server's API url and PREFECT_HOME
    (under ``.medops/``), the project root, the venv's bin first on PATH."""
    from medops.ops.prefect_server import prefect_env

    env = {**os.environ, **prefect_env(params.prefect, paths.state)}
    env["MEDOPS_ROOT"] = str(paths.root)
    # the flow's `dvc repro` runs `medops stage NAME`: the venv's bin must come first on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    # how often the served deployments look for runs to start (Prefect's default, 10 s, would be
    # most of the time from studies landing to their ingest starting)
    env.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    return env


# --- files ------------------------------------------------------------------------------------

def conf_path(paths: ProjectPaths) -> Path:
    return paths.state / "supervisor" / "supervisord.conf"


def socket_path(paths: ProjectPaths) -> Path:
    """The control socket: in ``.medops/run/`` unless that path is too long for a Unix socket
    (108 bytes on Linux), then in the temporary folder, named after the project."""
    sock = paths.run_dir / "supervisor.sock"
    if len(str(sock)) < 100:
        return sock
    digest = hashlib.sha256(str(paths.root).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"medops-{digest}.sock"


def _starts_file(paths: ProjectPaths, name: str) -> Path:
    return paths.run_dir / "supervise" / f"{name}.starts"


def _starts(paths: ProjectPaths, name: str) -> int:
    try:
        return int(_starts_file(paths, name).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _count_start(paths: ProjectPaths, name: str) -> None:
    path = _starts_file(paths, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{_starts(paths, name) + 1}\n")
    tmp.replace(path)


def render_conf(paths: ProjectPaths, services: Sequence[str]) -> str:
    """supervisord.conf for ``services`` (names of SERVICES) of the project at ``paths``."""
    if "%" in str(paths.root) or "%" in sys.executable:  # supervisord expands %(name)s in values
        raise MedopsError(f"supervisord cannot run a project whose path holds '%': {paths.root}")
    sock, logs, run = socket_path(paths), paths.logs, paths.run_dir
    lines = [
        "; written by medops (medops.ops.supervise) at each `medops up`; edits are overwritten",
        "[unix_http_server]", f"file={sock}", "chmod=0700", "",
        "[supervisord]", f"logfile={logs / 'supervisord.log'}",
        "logfile_maxbytes=10MB", "logfile_backups=2",
        f"pidfile={run / SUPERVISORD_PID}",
        f"directory={paths.root}", "identifier=medops", "", "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{sock}", "",
    ]
    for name in services:
        svc, priority = SERVICES[name], list(SERVICES).index(name) + 1
        command = shlex.join([sys.executable, "-m", "medops.ops.supervise", name,
                              "--project", str(paths.root)])
        lines += [
            f"[program:{name}]", f"command={command}",
            f"directory={paths.root}", f"priority={priority * 10}",
            "autostart=true", "autorestart=true", f"startsecs={svc.startsecs}", "startretries=10",
            "stopsignal=TERM", f"stopwaitsecs={svc.stopwaitsecs}",
            f"stopasgroup={str(svc.stopasgroup).lower()}", "killasgroup=true",
            "redirect_stderr=true", f"stdout_logfile={logs / svc.log}",
            "stdout_logfile_maxbytes=0", "stdout_logfile_backups=0", "",
        ]
    return "\n".join(lines)


# --- talking to supervisord ---------------------------------------------------------------------

def rpc(paths: ProjectPaths) -> Any:
    """supervisord's XML-RPC interface (``.supervisor``) over the project's control socket."""
    import xmlrpc.client

    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{socket_path(paths)}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def supervisord_pid(paths: ProjectPaths) -> int | None:
    """The running supervisord's pid (from its pid file), or None."""
    try:
        pid = int((paths.run_dir / SUPERVISORD_PID).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def is_supervised(paths: ProjectPaths) -> bool:
    """Whether this project's supervisord runs and answers."""
    if supervisord_pid(paths) is None:
        return False
    try:
        return rpc(paths).supervisor.getState()["statename"] == "RUNNING"
    except Exception:  # noqa: BLE001 - socket gone, supervisord shutting down, not ours
        return False


def _process_info(paths: ProjectPaths) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in rpc(paths).supervisor.getAllProcessInfo()}


def _health(name: str, paths: ProjectPaths, params: Params) -> bool | None:
    if name == "prefect":
        from medops.ops.prefect_server import is_healthy

        return is_healthy(params.prefect.api_url)
    if name == "triton":
        from medops.serving.server import server_status

        return server_status(paths.state).ready
    return None


def _recorded_pid(paths: ProjectPaths, svc: Service) -> int | None:
    try:
        pid = int((paths.run_dir / svc.pid_file).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def services_status(paths: ProjectPaths, params: Params) -> list[ServiceStatus]:
    """Each service: supervisord's view when it runs, else the recorded pids (a server started
    without supervision, or by systemd)."""
    supervised = is_supervised(paths)
    info = _process_info(paths) if supervised else {}
    out = []
    for name, svc in SERVICES.items():
        log = str(paths.logs / svc.log)
        if supervised:
            if name not in info:
                continue
            p = info[name]
            running = p["statename"] == "RUNNING"
            out.append(ServiceStatus(
                name=name, what=svc.what, running=running, state=p["statename"],
                healthy=_health(name, paths, params) if running else False,
                pid=p["pid"] or None, uptime_s=float(p["now"] - p["start"]) if running else None,
                restarts=max(_starts(paths, name) - 1, 0), log=log))
            continue
        pid = _recorded_pid(paths, svc)
        uptime = time.time() - (paths.run_dir / svc.pid_file).stat().st_mtime if pid else None
        out.append(ServiceStatus(  # nothing restarts it: no restarts to count
            name=name, what=svc.what, running=pid is not None,
            state="UNSUPERVISED" if pid else "STOPPED",
            healthy=_health(name, paths, params) if pid else False, pid=pid,
            uptime_s=round(uptime, 1) if uptime is not None else None, restarts=0, log=log))
    return out


def format_status(rows: list[ServiceStatus]) -> str:
    lines = [f"{'service':12s} {'state':12s} {'pid':>8s} {'uptime':>9s} {'restarts':>8s}  health"]
    for r in rows:
        health = {True: "ok", False: "not ok", None: "-"}[r.healthy]
        uptime = f"{r.uptime_s:.0f} s" if r.uptime_s is not None else "-"
        lines.append(f"{r.name:12s} {r.state:12s} {r.pid or '-':>8} {uptime:>9s} {r.restarts:>8d}  {health}")
    return "\n".join(lines)


def _log_tail(paths: ProjectPaths, name: str, lines: int = 15) -> str:
    try:
        text = (paths.logs / SERVICES[name].log).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# --- start and stop ---------------------------------------------------------------------------

ALL_SERVICES = tuple(SERVICES)


def _launch(paths: ProjectPaths, params: Params, services: Sequence[str]) -> int:
    """Write the config, reset the start counts and start supervisord (it daemonizes)."""
    conf = conf_path(paths)
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(render_conf(paths, services))
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    for name in SERVICES:
        _starts_file(paths, name).unlink(missing_ok=True)
    with open(paths.logs / "supervisord.out", "ab") as out:
        proc = subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)],
                              env=service_env(paths, params), cwd=paths.root, stdin=subprocess.DEVNULL,
                              stdout=out, stderr=subprocess.STDOUT, timeout=60)
    deadline = time.monotonic() + 30
    while not is_supervised(paths):
        if proc.returncode != 0 or time.monotonic() > deadline:
            raise MedopsError(f"supervisord did not start (exit {proc.returncode}); see "
                              f"{paths.logs / 'supervisord.out'} and {paths.logs / 'supervisord.log'}")
        time.sleep(0.2)
    return supervisord_pid(paths) or 0


def wait_started(paths: ProjectPaths, params: Params, services: Sequence[str],
                 timeout: float) -> None:
    """Until each of ``services`` is RUNNING and, for Prefect and Triton, healthy; MedopsError
    (naming the service, with its log's tail) when one cannot be started or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        info = _process_info(paths)
        for name in services:
            if info.get(name, {}).get("statename") == "FATAL":
                raise MedopsError(f"supervisord gave up starting the {SERVICES[name].what} "
                                  f"({name}); last lines of {paths.logs / SERVICES[name].log}:\n"
                                  f"{_log_tail(paths, name)}")
        pending = [n for n in services if info.get(n, {}).get("statename") != "RUNNING"
                   or _health(n, paths, params) is False]
        if not pending:
            return
        if time.monotonic() > deadline:
            name = pending[0]
            raise MedopsError(f"the {SERVICES[name].what} ({name}) is not up after {timeout:g} s "
                              f"(state {info.get(name, {}).get('statename')}); last lines of "
                              f"{paths.logs / SERVICES[name].log}:\n{_log_tail(paths, name)}")
        time.sleep(0.5)


def start_supervisor(paths: ProjectPaths, params: Params, services: Sequence[str] = ALL_SERVICES,
                     *, timeout: float = 300.0) -> list[str]:
    """Start supervisord with ``services`` (or start the ones a running supervisord has stopped)
    and wait until they are up; returns what it did, a line each."""
    unknown = sorted(set(services) - set(SERVICES))
    if unknown:
        raise MedopsError(f"unknown service(s) {unknown}; medops supervises {list(SERVICES)}")
    if "prefect" in services:  # refused at once, not after supervisord's retries
        from medops.ops.prefect_server import auth_string, check_exposure

        check_exposure(params.prefect, auth_string(paths.state))
    if "watcher" in services:
        export = paths.export(params.ingest.source)
        if not export.is_dir():
            if not export.is_relative_to(paths.root):
                raise MedopsError(f"the export folder {export} (ingest.source) does not exist")
            export.mkdir(parents=True)  # the demo's layout: data/export in the project
    lines = []
    if is_supervised(paths):
        info = _process_info(paths)
        missing = [n for n in services if n not in info]
        if missing:  # e.g. `make demo` after `medops up prefect triton`: add the others
            conf_path(paths).write_text(render_conf(paths, [n for n in SERVICES if n in info or n in missing]))
            rpc(paths).supervisor.reloadConfig()
            for name in missing:
                rpc(paths).supervisor.addProcessGroup(name)
            info = _process_info(paths)
        for name in services:
            if name in info and info[name]["statename"] not in ("RUNNING", "STARTING", "BACKOFF"):
                rpc(paths).supervisor.startProcess(name, False)
        lines.append(f"supervisord already running (pid {supervisord_pid(paths)})")
    else:
        # servers a medops before supervision started (by pid file) would hold the ports
        lines += stop_unsupervised(paths)
        pid = _launch(paths, params, services)
        lines.append(f"supervisord started (pid {pid}; {conf_path(paths)})")
    wait_started(paths, params, services, timeout)
    for row in services_status(paths, params):
        lines.append(f"{row.what}: running (pid {row.pid}), kept alive by supervisord")
    return lines


def stop_supervisor(paths: ProjectPaths, timeout: float = 90.0) -> list[str]:
    """Stop supervisord and, through it, every service it keeps (SIGTERM; supervisord stops each
    the way its program section says, SIGKILL after stopwaitsecs)."""
    pid = supervisord_pid(paths)
    if pid is None:
        return []
    terminate(pid, timeout, group_first=False)
    (paths.run_dir / SUPERVISORD_PID).unlink(missing_ok=True)
    return [f"stopped supervisord (pid {pid}) and the services it kept alive"]


def stop_unsupervised(paths: ProjectPaths) -> list[str]:
    """Stop services that run without supervisord (started by an earlier medops, or left by a
    supervisord that was killed), by their recorded pids; a line for each one stopped."""
    from medops.ops.prefect_server import stop_prefect
    from medops.serving.server import stop_server

    out = []
    for name in ("watcher", "deployments"):
        svc = SERVICES[name]
        pid = _recorded_pid(paths, svc)
        if pid:
            terminate(pid, 10.0, group_first=True)
            out.append(f"stopped the {svc.what} (pid {pid})")
        (paths.run_dir / svc.pid_file).unlink(missing_ok=True)
    if stop_server(paths.state):
        out.append("stopped Triton")
    if stop_prefect(paths.state):
        out.append("stopped the Prefect server")
    return out


def control(paths: ProjectPaths, name: str, action: str) -> None:
    """Start or stop one supervised service (``medops serve start|stop`` under supervision):
    stopped through supervisord, it stays stopped; started, it is kept alive again."""
    proxy = rpc(paths).supervisor
    state = _process_info(paths).get(name, {}).get("statename")
    if state is None:
        raise ServingError(f"supervisord does not run {name}; `medops down` then `medops up`")
    if action == "stop" and state in ("RUNNING", "STARTING", "BACKOFF"):
        proxy.stopProcess(name, True)
    elif action == "start" and state not in ("RUNNING", "STARTING"):
        proxy.startProcess(name, True)


# --- the supervised process ---------------------------------------------------------------------

def _wait_for_prefect(params: Params, timeout: float = 300.0) -> None:
    from medops.ops.prefect_server import is_healthy

    deadline = time.monotonic() + timeout
    while not is_healthy(params.prefect.api_url):
        if time.monotonic() > deadline:
            raise MedopsError(f"the Prefect server at {params.prefect.api_url} did not answer "
                              f"for {timeout:g} s")
        time.sleep(1.0)


def run_service(name: str, paths: ProjectPaths, params: Params) -> None:
    """Count this start, record this pid as the service's and become the service (never
    returns; MedopsError when it cannot start, and supervisord tries again)."""
    svc = SERVICES[name]
    _count_start(paths, name)
    print(f"\n=== medops.ops.supervise: starting the {svc.what} ({name}), start "
          f"{_starts(paths, name)} since supervisord started", flush=True)
    if name == "triton":
        from medops.serving.server import exec_server, resolve_admin_key

        cfg = params.serving
        exec_server(cfg, repository=cfg.repository_path(paths.root), state_dir=paths.state,
                    admin_key=resolve_admin_key(cfg, state_dir=paths.state, create=True))
        return
    if name == "prefect":
        from medops.ops.prefect_server import server_process

        cmd, env = server_process(params.prefect, paths.state)
    else:
        env = service_env(paths, params)
        if name == "deployments":  # registering the deployments needs the API
            _wait_for_prefect(params)
            cmd = [sys.executable, "-m", "flows.serve", "--project", str(paths.root)]
        else:
            cmd = [sys.executable, "-m", "medops", "--project", str(paths.root), "watch"]
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    (paths.run_dir / svc.pid_file).write_text(f"{os.getpid()}\n")
    os.execve(cmd[0], cmd, env)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medops.ops.supervise",
                                     description="run one of medops' services in the foreground "
                                                 "(what supervisord and systemd start)")
    parser.add_argument("service", choices=list(SERVICES))
    parser.add_argument("--project", help="project root (default: nearest folder with params.yaml)")
    args = parser.parse_args(argv)
    paths = ProjectPaths.discover(Path(args.project) if args.project else None)
    try:
        run_service(args.service, paths, load_params(paths.params))
    except MedopsError as exc:
        print(f"medops.ops.supervise {args.service}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
