"""A local Prefect server (SQLite) for the demo: start, reuse, check and stop it by pid.

Layout below ``state_dir`` (ProjectPaths.state, i.e. ``.medops/``):

- ``prefect/``: PREFECT_HOME of the server (its SQLite database ``prefect.db``, the UI build);
- ``logs/prefect.log``: the server's stdout and stderr;
- ``run/prefect.pid``: the pid of ``prefect server start``, which leads its own process session,
  so stopping it stops every process it started.

Processes that talk to this server (flows, ``flows/serve.py``, the CLI) get their environment from
``prefect_env``. Neither Prefect nor TensorFlow is imported here: the server is a subprocess.

Bound beyond the loopback (``prefect.host`` not 127.0.0.1, ::1 or localhost), the API is open to
the network: the server then starts only with Prefect's basic auth configured (``auth_string``:
``$PREFECT_SERVER_API_AUTH_STRING``, else ``$PREFECT_API_AUTH_STRING``, else the file
``<state>/secrets/prefect-auth``, as ``user:password``). The server gets it as
PREFECT_SERVER_API_AUTH_STRING, the processes medops starts as PREFECT_API_AUTH_STRING (through
``prefect_env``), always by environment, never on a command line or in a log.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pydantic import BaseModel

from medops.atomic import write_text
from medops.config import PrefectConfig
from medops.errors import PrefectServerError
from medops.procs import cmdline_contains, pid_alive, terminate

LOG_TAIL_LINES = 30
SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"  # what `prefect server start` checks requests against
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"         # what Prefect's clients send


class PrefectServerInfo(BaseModel):
    pid: int | None
    running: bool          # the pid in the pid file is alive
    healthy: bool          # GET /api/health answered true
    api_url: str
    ui_url: str
    home: str
    log: str
    reused: bool = False   # start_prefect found it already running


def prefect_home(state_dir: Path) -> Path:
    return Path(state_dir) / "prefect"


def pid_file(state_dir: Path) -> Path:
    return Path(state_dir) / "run" / "prefect.pid"


def log_file(state_dir: Path) -> Path:
    return Path(state_dir) / "logs" / "prefect.log"


def auth_file(state_dir: Path) -> Path:
    return Path(state_dir) / "secrets" / "prefect-auth"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def auth_string(state_dir: Path | None = None) -> str | None:
    """Prefect's basic-auth string (``user:password``) if one is configured, else None:
    ``$PREFECT_SERVER_API_AUTH_STRING``, ``$PREFECT_API_AUTH_STRING``, or ``<state>/secrets/prefect-auth``."""
    for name in (SERVER_AUTH_ENV, CLIENT_AUTH_ENV):
        if os.environ.get(name):
            return os.environ[name]
    if state_dir is not None and auth_file(state_dir).is_file():
        return auth_file(state_dir).read_text().strip() or None
    return None


def prefect_env(cfg: PrefectConfig, state_dir: Path | None = None) -> dict[str, str]:
    """Environment variables for a process that should use this server (merge into os.environ).

    With ``state_dir``, PREFECT_HOME is the server's too, so flow-run results and the profile live
    under ``.medops/`` rather than in the user's home. With basic auth configured
    (``auth_string``), PREFECT_API_AUTH_STRING too.
    """
    env = {"PREFECT_API_URL": cfg.api_url}
    if state_dir is not None:
        env["PREFECT_HOME"] = str(prefect_home(state_dir))
    auth = auth_string(state_dir)
    if auth:
        env[CLIENT_AUTH_ENV] = auth
    return env


def check_exposure(cfg: PrefectConfig, auth: str | None) -> None:
    """Refuse to open the API beyond the loopback without basic auth.

    Raises:
        PrefectServerError: ``cfg.host`` is not a loopback address and ``auth`` is empty.
    """
    if auth or is_loopback(cfg.host):
        return
    raise PrefectServerError(
        f"refusing to start the Prefect server on {cfg.host}: beyond the loopback anyone who reaches "
        f"port {cfg.port} could read and start flow runs. Set {SERVER_AUTH_ENV}='user:password' "
        f"(clients started by medops get it as {CLIENT_AUTH_ENV}) or write it to the file "
        f"<state>/secrets/prefect-auth (mode 0600), or set params.prefect.host to 127.0.0.1")


def is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether ``GET {api_url}/health`` answers ``true``."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:
            return resp.status == 200 and resp.read().strip() == b"true"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _read_pid(state_dir: Path) -> int | None:
    try:
        return int(pid_file(state_dir).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_prefect_process(pid: int) -> bool:
    """Whether ``pid`` is alive and is a Prefect server (guards against a recycled pid)."""
    if not pid_alive(pid):
        return False
    is_prefect = cmdline_contains(pid, b"prefect")
    return True if is_prefect is None else is_prefect  # no /proc (macOS): trust the pid file


def _log_tail(state_dir: Path) -> str:
    try:
        lines = log_file(state_dir).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(lines[-LOG_TAIL_LINES:])


def prefect_status(cfg: PrefectConfig, *, state_dir: Path) -> PrefectServerInfo:
    """The server's state: pid from the pid file, whether it runs, whether the API is healthy."""
    state_dir = Path(state_dir)
    pid = _read_pid(state_dir)
    running = pid is not None and _is_prefect_process(pid)
    return PrefectServerInfo(
        pid=pid if running else None, running=running,
        healthy=running and is_healthy(cfg.api_url),
        api_url=cfg.api_url, ui_url=cfg.ui_url,
        home=str(prefect_home(state_dir)), log=str(log_file(state_dir)),
    )


def _wait_healthy(cfg: PrefectConfig, proc_pid: int, state_dir: Path, timeout: float,
                  popen: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(cfg.api_url):
            return
        exited = popen.poll() is not None if popen is not None else not _is_prefect_process(proc_pid)
        if exited:
            raise PrefectServerError(
                f"prefect server exited before {cfg.api_url}/health answered; "
                f"log {log_file(state_dir)}:\n{_log_tail(state_dir)}")
        time.sleep(0.5)
    raise PrefectServerError(
        f"prefect server (pid {proc_pid}) not healthy at {cfg.api_url}/health after {timeout:g} s; "
        f"log {log_file(state_dir)}:\n{_log_tail(state_dir)}")


def server_process(cfg: PrefectConfig, state_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of ``prefect server start`` in the foreground (one
    process: uvicorn runs in it), and its folders made. ``start_prefect`` runs it in the
    background; a supervisor (``medops.ops.supervise``) runs it in place of its own process.

    Raises:
        PrefectServerError: ``cfg.host`` is beyond the loopback and no basic auth is configured.
    """
    state_dir = Path(state_dir)
    auth = auth_string(state_dir)
    check_exposure(cfg, auth)
    home = prefect_home(state_dir)
    for folder in (home, pid_file(state_dir).parent, log_file(state_dir).parent):
        folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "PREFECT_PROFILE", CLIENT_AUTH_ENV, SERVER_AUTH_ENV):
        env.pop(key, None)  # the server must not point at another one, nor keep a stale secret
    if auth:
        env[SERVER_AUTH_ENV] = auth  # by environment: never on the command line or in the log
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", NO_COLOR="1",
               PREFECT_CLI_COLORS="false",
               # the UI asks /ui-settings for the API's address, which Prefect derives from these
               # settings, not from --host/--port: without them a UI on any port but 4200 shows
               # "Unable to connect to Prefect server" (PREFECT_UI_API_URL, if set, still wins)
               PREFECT_SERVER_API_HOST=cfg.host, PREFECT_SERVER_API_PORT=str(cfg.port))
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", cfg.host,
           "--port", str(cfg.port), "--analytics-off"]
    return cmd, env


def start_prefect(cfg: PrefectConfig, *, state_dir: Path, timeout: float = 120.0) -> PrefectServerInfo:
    """Start ``prefect server start --host --port`` in its own session, or reuse a running one.

    Reuses the server in the pid file if that process is alive and healthy. Otherwise starts a new
    one with PREFECT_HOME=state_dir/prefect (SQLite database there), waits for ``/api/health`` and
    writes the pid file.

    Raises:
        PrefectServerError: ``cfg.host`` is beyond the loopback and no basic auth is configured
            (``check_exposure``), the port is taken by a server medops did not start, or the server exits
            or stays unhealthy for ``timeout`` seconds (the message ends with the log's tail).
    """
    state_dir = Path(state_dir)
    auth = auth_string(state_dir)
    check_exposure(cfg, auth)
    current = prefect_status(cfg, state_dir=state_dir)
    if current.running:
        if not current.healthy:  # started but still migrating the database, or hung
            _wait_healthy(cfg, current.pid, state_dir, timeout)
        return current.model_copy(update={"healthy": True, "reused": True})
    pid_file(state_dir).unlink(missing_ok=True)  # stale
    if is_healthy(cfg.api_url):
        raise PrefectServerError(
            f"a Prefect server medops did not start already answers at {cfg.api_url}; stop it or "
            f"change params.prefect.port")

    home = prefect_home(state_dir)
    cmd, env = server_process(cfg, state_dir)
    with open(log_file(state_dir), "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        # its own session: stop_prefect signals the whole group, and a Ctrl-C in the terminal
        # that started the demo does not reach the server
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    write_text(pid_file(state_dir), f"{proc.pid}\n")
    try:
        _wait_healthy(cfg, proc.pid, state_dir, timeout, popen=proc)
    except PrefectServerError:
        stop_prefect(state_dir)
        raise
    return PrefectServerInfo(pid=proc.pid, running=True, healthy=True, api_url=cfg.api_url,
                             ui_url=cfg.ui_url, home=str(home), log=str(log_file(state_dir)))


def stop_prefect(state_dir: Path, timeout: float = 20.0) -> bool:
    """Stop the server in the pid file (SIGTERM to its process group, SIGKILL after ``timeout``).

    Returns whether a running server was stopped. The pid file is removed either way.
    """
    state_dir = Path(state_dir)
    pid = _read_pid(state_dir)
    stopped = False
    if pid is not None and _is_prefect_process(pid):
        terminate(pid, timeout, group_first=True, kill_wait=10.0)
        stopped = True
    pid_file(state_dir).unlink(missing_ok=True)
    return stopped
