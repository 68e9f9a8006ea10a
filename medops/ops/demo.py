"""What ``make demo`` and ``make down`` do: start the local services, run the training flow against
them, serve the flow as a Prefect deployment, and stop it all again by recorded process ids.

Orchestration only: every step calls the one implementation elsewhere in medops (synth, the
Prefect server launcher, the Triton launcher, the flow). Run twice, it reuses the running servers,
the generated data and DVC's cache, so unchanged stages are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from medops.config import Params
from medops.errors import MedopsError
from medops.paths import BUNDLED_DATASET, ProjectPaths
from medops.procs import pid_alive, terminate

DEPLOYMENT_PID = "flow-serve.pid"
WATCHER_PID = "watch.pid"


def _read_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _service_env(paths: ProjectPaths, params: Params) -> dict[str, str]:
    from medops.ops.prefect_server import prefect_env

    # the Prefect server's own environment (API url and PREFECT_HOME under .medops/)
    env = {**os.environ, **prefect_env(params.prefect, paths.state)}
    env["MEDOPS_ROOT"] = str(paths.root)
    # the flow's `dvc repro` runs `medops stage NAME`: the venv's bin must come first on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    # how often the served deployments look for runs to start (Prefect's default, 10 s, would be
    # most of the time from studies landing to their ingest starting)
    env.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    return env


def ensure_export(paths: ProjectPaths, params: Params) -> bool:
    """Generate the demo's hospital export (``ingest.source``, synthetic PHI on purpose) from the
    bundled dataset if it is missing."""
    export = paths.export(params.ingest.source)
    if (export / "labels.csv").is_file() and (export / "dicom").is_dir():
        return False
    from medops.dicom import synth

    synth.run(params.synth, source_npz=BUNDLED_DATASET, out_dir=export)
    return True


def start_services(paths: ProjectPaths, params: Params) -> list[str]:
    """Start (or reuse) the Prefect server and the embedded Triton; returns what it did."""
    from medops.ops.prefect_server import start_prefect
    from medops.serving.server import resolve_admin_key, server_status, start_server

    lines = []
    info = start_prefect(params.prefect, state_dir=paths.state)
    lines.append(f"Prefect server: {params.prefect.ui_url} (pid {info.pid})")
    cfg = params.serving
    status = server_status(paths.state)
    if status.running:
        lines.append(f"Triton already running (pid {status.info.pid})")
    else:
        tinfo = start_server(cfg, repository=cfg.repository_path(paths.root), state_dir=paths.state,
                             admin_key=resolve_admin_key(cfg, state_dir=paths.state, create=True))
        lines.append(f"Triton: HTTP {cfg.http_url}, gRPC {cfg.grpc_url}, metrics "
                     f"{cfg.host}:{cfg.metrics_port} (pid {tinfo.pid})")
    return lines


def _start_background(paths: ProjectPaths, params: Params, argv: list[str], pid_name: str,
                      log_name: str, what: str) -> str:
    """Start ``argv`` as a background service of the demo (reused if its recorded pid is alive)."""
    pidfile = paths.run_dir / pid_name
    pid = _read_pid(pidfile)
    if pid:
        return f"{what} already running (pid {pid})"
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    log = open(paths.logs / log_name, "ab")
    proc = subprocess.Popen(
        argv, cwd=paths.root, env=_service_env(paths, params),
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    pidfile.write_text(f"{proc.pid}\n")
    time.sleep(3)
    if proc.poll() is not None:
        tail = (paths.logs / log_name).read_text(errors="replace")[-2000:]
        raise MedopsError(f"starting the {what} failed:\n{tail}")
    return f"{what} started (pid {proc.pid})"


def start_deployment_server(paths: ProjectPaths, params: Params) -> str:
    """Serve both flows as Prefect deployments in a background process (reused if alive)."""
    return _start_background(paths, params, [sys.executable, "-m", "flows.serve"], DEPLOYMENT_PID,
                             "flow-serve.log", f"deployments */{params.prefect.deployment_name}")


def start_watcher(paths: ProjectPaths, params: Params) -> str:
    """``medops watch`` in the background: new studies in the export folder start an ingest run."""
    return _start_background(paths, params, [sys.executable, "-m", "medops", "watch"], WATCHER_PID,
                             "watch.log", "export folder watcher")


def run_flow(paths: ProjectPaths, params: Params, name: str) -> None:
    """Run one flow (``python -m flows.run NAME``) once, recorded by the running Prefect server."""
    proc = subprocess.run([sys.executable, "-m", "flows.run", name, "--project", str(paths.root)],
                          cwd=paths.root, env=_service_env(paths, params))
    if proc.returncode != 0:
        raise MedopsError(f"the {name} flow failed (exit {proc.returncode}); see its output above "
                          f"and the run in the Prefect UI at {params.prefect.ui_url}")


def sample_dicom(paths: ProjectPaths, params: Params) -> Path | None:
    """A file from the official test split, for the `medops predict` line the demo prints."""
    import csv

    export = paths.export(params.ingest.source)
    try:
        with (export / "labels.csv").open() as fh:
            for row in csv.DictReader(fh):
                if row.get("split") == "test":
                    return export / "dicom" / row["path"]
    except OSError:
        return None
    return None


def run_demo(paths: ProjectPaths, params: Params) -> str:
    if not (paths.root / ".git").exists():
        raise MedopsError(f"{paths.root} is not a git repository: DVC needs one (clone medops with git)")
    lines = []
    if ensure_export(paths, params):
        lines.append(f"generated the demo's hospital export in {paths.export(params.ingest.source)}")
    lines += start_services(paths, params)
    for line in lines:
        print(line, flush=True)
    run_flow(paths, params, "ingest-studies")  # export -> de-identified, versioned dataset
    run_flow(paths, params, "training-pipeline")
    lines.append(start_deployment_server(paths, params))
    lines.append(start_watcher(paths, params))
    sample = sample_dicom(paths, params)
    rel = sample.relative_to(paths.root) if sample else "path/to/file.dcm"
    return "\n".join([
        "",
        "medops demo is up.",
        *[f"  {line}" for line in lines],
        f"  Prefect UI:  {params.prefect.ui_url}  (flow runs, artifacts; start "
        f"'training-pipeline/{params.prefect.deployment_name}' with edited parameters)",
        f"  Data Docs:   {paths.quality_dir / 'data_docs' / 'index.html'}",
        "  Reproduce:   . .venv/bin/activate && dvc status && dvc repro",
        f"  Try it:      .venv/bin/medops predict {rel}",
        "  Stop it:     make down",
    ])


def stop_services(paths: ProjectPaths) -> list[str]:
    """Stop the deployment server, Triton and Prefect, by the pids recorded when they started."""
    from medops.ops.prefect_server import stop_prefect
    from medops.serving.server import stop_server

    out = []
    for pid_name, what in ((WATCHER_PID, "the export folder watcher"), (DEPLOYMENT_PID, "the deployment server")):
        pidfile = paths.run_dir / pid_name
        pid = _read_pid(pidfile)
        if pid:
            terminate(pid, 10.0, group_first=True)
            out.append(f"stopped {what} (pid {pid})")
        pidfile.unlink(missing_ok=True)
    out.append("stopped Triton" if stop_server(paths.state) else "Triton was not running")
    out.append("stopped the Prefect server" if stop_prefect(paths.state) else "Prefect server was not running")
    return out
