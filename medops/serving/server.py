"""The embedded Triton server: the real ``tritonserver`` from the nvidia-pytriton wheel, on the CPU.

The wheel ships tritonserver 2.51 with only the Python backend. Both live in an environment of
their own, the Triton environment (``make setup`` builds it as ``.venv-triton`` beside ``.venv``
from requirements-triton.lock): nvidia-pytriton 0.7 requires NumPy 1, and its Python-backend stub
returns empty outputs with NumPy 2, while medops itself runs NumPy 2. That environment holds only
what the Python-backend models import (numpy, onnxruntime, pydicom and its decoders, pydantic,
pyyaml) and medops installed without its dependencies. What the server needs to run (measured, see
the project notes): a backend folder of our own holding the Python backend and the stub built for
the Triton environment's Python; ``LD_LIBRARY_PATH`` with the wheel's bundled libraries and that
Python's ``libpython``; the Triton environment's ``bin`` first on ``PATH``, so every stub's
interpreter runs in it (its packages, not medops' own environment's).

The server runs in its own process session, logs to ``<state>/logs/triton.log``, and is tracked
by ``<state>/run/triton.pid`` (plus ``triton.json`` with its ports), so ``stop_server`` and
``server_status`` work from any later process, e.g. ``medops serve stop``.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel

from medops.atomic import write_text
from medops.config import ServingConfig
from medops.errors import ServingError
from medops.procs import cmdline_contains, pid_alive, terminate

PID_FILE = "triton.pid"
INFO_FILE = "triton.json"
LOG_FILE = "triton.log"


class ServerInfo(BaseModel):
    """A started embedded Triton: where it listens and where its files are."""

    pid: int
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: str
    log_file: str
    started_at: str
    restricted: bool = False  # model-repository API needs the admin key

    @property
    def http_url(self) -> str:
        return f"{_url_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.metrics_port}/metrics"


class ServerStatus(BaseModel):
    """What ``server_status`` found: ``model_dump(mode="json")`` is ``medops serve status
    --json``, ``describe()`` its line for people."""

    running: bool
    ready: bool
    info: ServerInfo | None = None
    detail: str = ""

    def describe(self) -> str:
        """One line: whether Triton is ready, and where, or why not."""
        info = self.info
        if self.ready and info is not None:
            return (f"Triton is ready: HTTP {info.http_url}, gRPC {info.grpc_url}, metrics "
                    f"{info.metrics_url} (pid {info.pid}, since {info.started_at})")
        if self.running and info is not None:
            return (f"Triton is running but not ready: pid {info.pid} does not answer on "
                    f"{info.http_url} (log {info.log_file})")
        return f"Triton is not running ({self.detail}); start it with `medops serve start`"


def endpoint(target: ServingConfig | ServerInfo, protocol: str) -> str:
    """``host:port`` of ``target``'s (a ServingConfig or a started ServerInfo) gRPC or HTTP
    endpoint, for ``protocol`` "grpc" or "http"."""
    if protocol == "grpc":
        return target.grpc_url
    if protocol == "http":
        return target.http_url
    raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")


def _url_host(host: str) -> str:
    # A server bound to all interfaces is reached on loopback from this machine.
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


TRITON_ENV_VAR = "MEDOPS_TRITON_ENV"  # the Triton environment's folder, when not the default


class TritonEnv(BaseModel):
    """The environment the embedded tritonserver and its Python-backend stubs run from."""

    prefix: str           # its root: bin/python, bin/activate
    python_version: str   # "3.11": the stub built for it
    libdir: str           # where its Python's libpython lies
    pytriton_dir: str     # site-packages/pytriton/tritonserver (bin/, backends/, stubs)
    pytriton_version: str
    numpy_version: str


def default_triton_env() -> Path:
    """``$MEDOPS_TRITON_ENV``, else the folder beside this environment named after it with
    ``-triton`` (``.venv`` -> ``.venv-triton``, where ``make setup`` builds it)."""
    configured = os.environ.get(TRITON_ENV_VAR)
    if configured:
        return Path(configured)
    prefix = Path(sys.prefix)
    return prefix.with_name(prefix.name + "-triton")


# Run by the Triton environment's python: what server_environment and prepare_backends need
# (found, not imported: a fraction of a second).
_PROBE = """
import json, sys, sysconfig
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
spec = find_spec("pytriton")
if spec is None:
    sys.exit("ModuleNotFoundError: No module named 'pytriton' (nvidia-pytriton)")
print(json.dumps({"prefix": sys.prefix, "libdir": sysconfig.get_config_var("LIBDIR"),
    "python_version": "%d.%d" % sys.version_info[:2], "numpy_version": version("numpy"),
    "pytriton_dir": str(Path(spec.origin).resolve().parent / "tritonserver"),
    "pytriton_version": version("nvidia-pytriton")}))
"""


@functools.lru_cache(maxsize=8)
def _probe(python: str) -> TritonEnv | str:
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": ""})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} does not run: {exc}"
    if out.returncode != 0:
        return f"{python} has no nvidia-pytriton or numpy: {_first_error(out.stderr)}"
    return TritonEnv.model_validate(json.loads(out.stdout))


def _first_error(stderr: str) -> str:
    """The last non-empty line of a Python traceback (the exception), or the text itself."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def triton_env(path: Path | None = None) -> TritonEnv:
    """The Triton environment: ``path``, else ``default_triton_env()``; without one there, this
    environment itself if it has nvidia-pytriton and NumPy 1 (a single-environment install).

    Raises:
        ServingError: none found, it lacks nvidia-pytriton, or it has NumPy 2 (the stub of
            tritonserver 2.51 then answers every request with empty outputs).
    """
    where = Path(path) if path is not None else default_triton_env()
    candidates = [where] if path is not None or os.environ.get(TRITON_ENV_VAR) else [where, Path(sys.prefix)]
    problems = []
    for prefix in candidates:
        python = prefix / "bin" / "python"
        if not python.exists():
            problems.append(f"no environment at {prefix}")
            continue
        found = _probe(str(python))
        if isinstance(found, str):
            problems.append(found)
        elif int(found.numpy_version.split(".")[0]) >= 2:
            problems.append(f"{prefix} has NumPy {found.numpy_version}: the Python-backend stub of "
                            "this Triton returns empty outputs with NumPy 2")
        else:
            return found
    raise ServingError(
        "no environment to run the embedded Triton from (" + "; ".join(problems) + "). `make setup` "
        f"builds it as {where}; elsewhere create a virtual environment from "
        "requirements-triton.lock, `pip install --no-deps` medops into it and name it in "
        f"${TRITON_ENV_VAR}")


def tritonserver_binary() -> Path:
    """The ``tritonserver`` executable shipped in the nvidia-pytriton wheel."""
    path = Path(triton_env().pytriton_dir) / "bin" / "tritonserver"
    if not path.is_file():
        raise ServingError(f"tritonserver binary not found at {path}")
    return path


def prepare_backends(state_dir: Path) -> Path:
    """Assemble ``<state>/triton/backends/python`` (backend, utils, the stub for the Triton
    environment's Python).

    Returns the backend directory to pass as ``--backend-directory``.
    """
    env = triton_env()
    src = Path(env.pytriton_dir)
    stub = src / "python_backend_stubs" / env.python_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServingError(f"nvidia-pytriton has no Python-backend stub for Python "
                           f"{env.python_version} ({stub})")
    backends = Path(state_dir) / "triton" / "backends"
    dest = backends / "python"
    dest.mkdir(parents=True, exist_ok=True)
    for f in (src / "backends" / "python" / "libtriton_python.so",
              src / "backends" / "python" / "triton_python_backend_utils.py",
              stub):
        target = dest / f.name
        if not target.exists() or target.stat().st_size != f.stat().st_size:
            shutil.copy2(f, target)
    return backends


def server_environment() -> dict[str, str]:
    """The environment tritonserver and its Python stubs need (see the module docstring)."""
    env = dict(os.environ)
    tenv = triton_env()
    site = Path(tenv.pytriton_dir).parent.parent  # site-packages
    libs = [str(site / "nvidia_pytriton.libs"), tenv.libdir]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    env["PATH"] = os.pathsep.join([str(Path(tenv.prefix) / "bin"), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = tenv.prefix
    env.pop("PYTHONHOME", None)
    # glibc gives each thread that allocates its own arena (up to 8 per core), and tritonserver's
    # gRPC and HTTP threads keep freed memory in them: its RSS crept up ~0.35 MB a minute under
    # load (benchmarks/soak). Two arenas bound that; a value set by the caller wins.
    env.setdefault("MALLOC_ARENA_MAX", "2")
    return env


# The model-repository API (load/unload/index) can be restricted to callers that send this header
# with the key from this environment variable; inference, health and metadata stay open.
ADMIN_KEY_ENV = "MEDOPS_TRITON_ADMIN_KEY"
ADMIN_HEADER = "medops-admin-key"  # lowercase: gRPC metadata keys must be


def admin_key_from_env() -> str | None:
    """The model-repository key from ``$MEDOPS_TRITON_ADMIN_KEY``, or None when unset or empty."""
    return os.environ.get(ADMIN_KEY_ENV) or None


def resolve_admin_key(cfg: ServingConfig, *, state_dir: Path, create: bool = False) -> str | None:
    """The model-repository key: ``$<cfg.admin_key_env>``, else the project's key file.

    The key file ``<state>/secrets/triton-admin.key`` is made (random, mode 0600) when ``create``
    is set, i.e. by whoever starts the server; clients only read it. Never in the repository.
    """
    key = os.environ.get(cfg.admin_key_env)
    if key:
        return key
    path = Path(state_dir) / "secrets" / "triton-admin.key"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    if not create:
        return None
    import secrets

    # written whole under a temporary name (mode 0600), then linked into place: a process killed
    # half-way never leaves an empty key file, which would start the next server unrestricted
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if path.is_file() and not path.read_text().strip():
        path.unlink()  # left empty by an older medops killed while writing it
    try:
        os.link(tmp, path)  # fails if another starter made one meanwhile: theirs wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def admin_headers(admin_key: str | None, protocol: str = "http") -> dict[str, str] | None:
    """The request headers that unlock a restricted model-repository API (None without a key).

    Triton's gRPC endpoint expects restricted-protocol headers prefixed with
    ``triton-grpc-protocol-``; the HTTP endpoint takes the header name as configured.
    """
    if not admin_key:
        return None
    name = f"triton-grpc-protocol-{ADMIN_HEADER}" if protocol == "grpc" else ADMIN_HEADER
    return {name: admin_key}


def build_command(cfg: ServingConfig, *, repository: Path, backends: Path,
                  admin_key: str | None = None) -> list[str]:
    """The tritonserver command line for ``cfg``; with ``admin_key``, the model-repository API of
    both endpoints answers only requests carrying ``ADMIN_HEADER: admin_key``."""
    cmd = [
        str(tritonserver_binary()),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        "--model-control-mode=explicit",
        f"--http-address={cfg.host}",
        f"--http-port={cfg.http_port}",
        f"--grpc-address={cfg.host}",
        f"--grpc-port={cfg.grpc_port}",
        f"--metrics-address={cfg.host}",
        f"--metrics-port={cfg.metrics_port}",
        # Clients that forget to close would otherwise hold shutdown for the default 30 s.
        "--exit-timeout-secs=5",
        "--log-verbose=0",
    ]
    if admin_key:
        if any(c in admin_key for c in ":=, \n"):
            raise ServingError(f"${ADMIN_KEY_ENV} must not contain ':', '=', ',' or whitespace")
        cmd += [f"--http-restricted-api=model-repository:{ADMIN_HEADER}={admin_key}",
                f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER}={admin_key}"]
    # Explicit mode loads nothing by itself: serve what earlier deploys left in the repository.
    if any((p / "config.pbtxt").is_file() for p in Path(repository).glob("*")):
        cmd.append("--load-model=*")
    return cmd


def _redact(cmd: list[str], secret: str | None) -> str:
    text = " ".join(cmd)
    return text.replace(secret, "***") if secret else text


def _run_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "run"


def _log_path(state_dir: Path) -> Path:
    return Path(state_dir) / "logs" / LOG_FILE


def _is_tritonserver(pid: int) -> bool:
    """Guard against a recycled pid: the recorded pid must still be a tritonserver."""
    found = cmdline_contains(pid, b"tritonserver")
    return pid_alive(pid) if found is None else found


def read_info(state_dir: Path) -> ServerInfo | None:
    """The recorded server, or None when there is no record."""
    path = _run_dir(state_dir) / INFO_FILE
    pid_file = _run_dir(state_dir) / PID_FILE
    if not pid_file.is_file():
        return None
    try:
        pid = int(pid_file.read_text().strip())
        info = ServerInfo.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None
    return info if info.pid == pid else info.model_copy(update={"pid": pid})


def _clear_record(state_dir: Path) -> None:
    for name in (PID_FILE, INFO_FILE):
        (_run_dir(state_dir) / name).unlink(missing_ok=True)


def port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound (something already listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def log_tail(state_dir: Path, lines: int = 15) -> str:
    """The last log lines of the latest start, Triton's error lines first, its tables left out."""
    try:
        text = _log_path(state_dir).read_text(errors="replace")
    except OSError:
        return "(no log)"
    text = text.rsplit("=== medops: ", 1)[-1]
    kept = [ln for ln in text.splitlines()[1:] if ln.strip() and ln[:1] not in "|+"]
    tail = kept[-lines:]
    errors = [ln for ln in kept[:-lines] if _ERROR_LINE.match(ln)][-5:]
    return "\n".join(errors + tail)


_ERROR_LINE = re.compile(r"^(E\d{4} |error:)")


def is_ready(info: ServerInfo, *, timeout: float = 2.0) -> bool:
    """Whether the server answers ``/v2/health/ready`` with success."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(info.http_url, connection_timeout=timeout,
                                              network_timeout=timeout)
    try:
        return bool(client.is_server_ready())
    except Exception:  # noqa: BLE001 - any failure to answer means not ready
        return False
    finally:
        client.close()


def wait_ready(info: ServerInfo, *, state_dir: Path, timeout: float) -> None:
    """Block until the server is ready; ServingError (with the log tail) if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(info.pid):
            _clear_record(state_dir)
            raise ServingError(
                f"tritonserver (pid {info.pid}) exited during startup; last log lines of "
                f"{info.log_file}:\n{log_tail(state_dir)}"
            )
        if is_ready(info):
            return
        time.sleep(0.25)
    raise ServingError(
        f"tritonserver (pid {info.pid}) not ready on {info.http_url} after {timeout:g} s "
        f"(serving.startup_timeout_s); last log lines of {info.log_file}:\n{log_tail(state_dir)}"
    )


def _prepare_start(cfg: ServingConfig, *, repository: Path, state_dir: Path,
                   admin_key: str | None) -> list[str]:
    """What every start does first: refuse a second server and a taken port, make the
    repository and the backend folder; returns the command line."""
    existing = read_info(state_dir)
    if existing is not None:
        if pid_alive(existing.pid) and _is_tritonserver(existing.pid):
            raise ServingError(
                f"Triton is already running (pid {existing.pid}, http {existing.http_url}, "
                f"grpc {existing.grpc_url}); stop it first with `medops serve stop`"
            )
        _clear_record(state_dir)  # stale record of a server that has gone
    taken = [f"{name} {port}" for name, port in (("http", cfg.http_port), ("grpc", cfg.grpc_port),
                                                 ("metrics", cfg.metrics_port))
             if port_in_use(cfg.host, port)]
    if taken:
        raise ServingError(
            f"cannot start Triton on {cfg.host}: port already in use ({', '.join(taken)}); "
            "is another Triton already running? Stop it or choose other serving.*_port values"
        )
    repository.mkdir(parents=True, exist_ok=True)
    backends = prepare_backends(state_dir)
    return build_command(cfg, repository=repository, backends=backends, admin_key=admin_key)


def _server_info(cfg: ServingConfig, pid: int, repository: Path, state_dir: Path,
                 admin_key: str | None) -> ServerInfo:
    return ServerInfo(
        pid=pid, host=cfg.host, http_port=cfg.http_port, grpc_port=cfg.grpc_port,
        metrics_port=cfg.metrics_port, repository=str(repository),
        log_file=str(_log_path(state_dir)), restricted=bool(admin_key),
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _write_record(state_dir: Path, info: ServerInfo) -> None:
    _run_dir(state_dir).mkdir(parents=True, exist_ok=True)
    write_text(_run_dir(state_dir) / PID_FILE, f"{info.pid}\n")
    write_text(_run_dir(state_dir) / INFO_FILE, info.model_dump_json(indent=2) + "\n")


def exec_server(cfg: ServingConfig, *, repository: Path, state_dir: Path,
                admin_key: str | None = None) -> None:
    """Become the tritonserver (``os.execve``, same pid), for a supervisor that keeps it alive
    (``medops.ops.supervise``, systemd). Records it like ``start_server`` does and writes the
    command line (key redacted) to stdout, which the supervisor sends to ``logs/triton.log``.

    What it serves is decided here, at each (re)start, from the repository alone: every model
    with a ``config.pbtxt``, at the versions that config pins (deploy pins a new version only
    after its golden check; a candidate is loaded by the API, never from the repository), so a
    restart serves exactly what was served before it, never a half-written version.
    Returns only by raising ServingError (already running, port taken).
    """
    state_dir = Path(state_dir).resolve()
    repository = Path(repository).resolve()
    admin_key = admin_key or admin_key_from_env()
    cmd = _prepare_start(cfg, repository=repository, state_dir=state_dir, admin_key=admin_key)
    _write_record(state_dir, _server_info(cfg, os.getpid(), repository, state_dir, admin_key))
    print(f"\n=== medops: {_redact(cmd, admin_key)}", flush=True)
    os.chdir(state_dir)
    os.execve(cmd[0], cmd, server_environment())


def start_server(
    cfg: ServingConfig, *, repository: Path, state_dir: Path, wait: bool = True,
    admin_key: str | None = None,
) -> ServerInfo:
    """Start the embedded tritonserver in the background and (by default) wait until it is ready.

    Args:
        cfg: serving settings (host, ports, startup timeout).
        repository: the model repository to serve (created if missing).
        state_dir: where the backend folder, ``run/triton.pid`` and ``logs/triton.log`` go.
        wait: wait for readiness (``cfg.startup_timeout_s``); on failure the server is stopped.
        admin_key: restrict the model-repository API to this key (see ``ADMIN_HEADER``);
            default ``$MEDOPS_TRITON_ADMIN_KEY``, unrestricted when that is unset. The key is
            never written to the log or the state files.

    Raises:
        ServingError: one is already running for ``state_dir``, a port is taken, or it did not
            become ready (the message carries the log tail).
    """
    state_dir = Path(state_dir).resolve()
    repository = Path(repository).resolve()
    admin_key = admin_key or admin_key_from_env()
    cmd = _prepare_start(cfg, repository=repository, state_dir=state_dir, admin_key=admin_key)
    log_path = _log_path(state_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _run_dir(state_dir).mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== medops: {_redact(cmd, admin_key)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=server_environment(), cwd=state_dir, start_new_session=True,
        )
    info = _server_info(cfg, proc.pid, repository, state_dir, admin_key)
    _write_record(state_dir, info)
    if wait:
        try:
            wait_ready(info, state_dir=state_dir, timeout=cfg.startup_timeout_s)
        except ServingError:
            stop_server(state_dir)
            raise
    return info


def _recorded_pid(state_dir: Path) -> int | None:
    try:
        return int((_run_dir(state_dir) / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def stop_server(state_dir: Path, *, timeout: float = 15.0) -> bool:
    """Stop the server recorded under ``state_dir``: SIGTERM, then SIGKILL after ``timeout`` s.

    The pid comes from the record (``triton.json``), else from the pid file alone (a record that
    cannot be read must not orphan a running server); it must still be a tritonserver.

    Returns:
        True if a running server was stopped, False if none was running.
    """
    state_dir = Path(state_dir).resolve()
    info = read_info(state_dir)
    pid = info.pid if info is not None else _recorded_pid(state_dir)
    if pid is None or not (pid_alive(pid) and _is_tritonserver(pid)):
        _clear_record(state_dir)
        return False
    # SIGTERM the server alone so it unloads models and ends its backend stubs itself; only a
    # server that ignores it gets SIGKILL for its whole session (it leads one), stubs included.
    terminate(pid, timeout, group_first=False)
    _clear_record(state_dir)
    return True


def server_status(state_dir: Path) -> ServerStatus:
    """Whether the recorded server is running and ready."""
    info = read_info(Path(state_dir).resolve())
    if info is None:
        return ServerStatus(running=False, ready=False, detail="no server recorded")
    if not (pid_alive(info.pid) and _is_tritonserver(info.pid)):
        return ServerStatus(running=False, ready=False, info=info,
                            detail=f"recorded pid {info.pid} is not running")
    ready = is_ready(info)
    return ServerStatus(running=True, ready=ready, info=info,
                        detail="ready" if ready else "running, not ready")
