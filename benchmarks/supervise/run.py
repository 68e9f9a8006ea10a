"""Kill each supervised service with SIGKILL, several times, and time its way back.

    make demo                                              # or any project where `medops up` ran
    .venv/bin/python benchmarks/supervise/run.py [--project .] [--kills 3] [--json FILE]

For each kill of each service (prefect, triton, deployments, watcher, in turn): the time until
supervisord runs it again under a new pid ("running"), and until it does its job again ("back"):
the Prefect server answers /api/health; Triton is ready with every model the repository pins
loaded (the same (model, version) set as before the kill, from its repository index) and answers
a prediction through the DICOM ensemble when a model is served; flows.serve says its deployments
are served again; the watcher says it is watching again. It checks that the restart count went up
by one each time. It only signals processes of the project's own supervisord.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from medops.config import load_params  # noqa: E402
from medops.ops.supervise import SERVICES, is_supervised, services_status  # noqa: E402
from medops.paths import ProjectPaths  # noqa: E402

MARK = "=== medops.ops.supervise"
BACK_LINES = {"deployments": "Your deployments are being served", "watcher": "watching "}


def _row(paths: ProjectPaths, params: Any, name: str) -> Any:
    return next(r for r in services_status(paths, params) if r.name == name)


def _ready_models(paths: ProjectPaths, params: Any) -> set[tuple[str, str]]:
    import tritonclient.http as httpclient

    from medops.serving.server import admin_headers, resolve_admin_key

    cfg = params.serving
    client = httpclient.InferenceServerClient(cfg.http_url)
    try:
        index = client.get_model_repository_index(
            headers=admin_headers(resolve_admin_key(cfg, state_dir=paths.state)))
    except Exception:  # noqa: BLE001 - not up yet
        return set()
    finally:
        client.close()
    return {(m["name"], m.get("version", "")) for m in index if m.get("state") == "READY"}


def _answers(paths: ProjectPaths, params: Any, sample: Path | None) -> bool:
    if sample is None:
        return True
    from medops.serving.client import predict_files

    cfg = params.serving
    pred = predict_files([sample], url=cfg.grpc_url, model_name=cfg.model_name,
                         preprocessing=params.ingest.preprocessing, retries=0)[0]
    return pred.error is None


def _is_back(paths: ProjectPaths, params: Any, name: str, row: Any, before: dict[str, Any]) -> bool:
    if name == "prefect":
        return bool(row.healthy)
    if name == "triton":
        return bool(row.healthy) and _ready_models(paths, params) == before["models"] and \
            _answers(paths, params, before["sample"])
    log = (paths.logs / SERVICES[name].log).read_text(errors="replace").rsplit(MARK, 1)[-1]
    return BACK_LINES[name] in log


def kill_once(paths: ProjectPaths, params: Any, name: str, sample: Path | None,
              limit_s: float = 120.0) -> dict[str, Any]:
    row = _row(paths, params, name)
    before = {"models": _ready_models(paths, params), "sample": sample}
    if name == "triton":
        assert _answers(paths, params, sample), "Triton does not answer before the kill"
    os.kill(row.pid, signal.SIGKILL)
    t0 = time.monotonic()
    running = None
    while time.monotonic() - t0 < limit_s:
        now = _row(paths, params, name)
        if now.running and now.pid != row.pid:
            running = running or time.monotonic() - t0
            if _is_back(paths, params, name, now, before):
                return {"service": name, "old_pid": row.pid, "new_pid": now.pid,
                        "running_s": round(running, 2), "back_s": round(time.monotonic() - t0, 2),
                        "restarts": now.restarts, "restarts_before": row.restarts}
        time.sleep(0.2)
    raise SystemExit(f"{name} not back {limit_s:g} s after SIGKILL (pid {row.pid})")


def _sample(paths: ProjectPaths, params: Any) -> Path | None:
    from medops.ops.demo import sample_dicom, served_version

    return sample_dicom(paths, params) if served_version(paths, params) is not None else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".", help="a project whose supervisord runs")
    parser.add_argument("--kills", type=int, default=3, help="kills per service")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    paths = ProjectPaths(Path(args.project).resolve())
    params = load_params(paths.params)
    if not is_supervised(paths):
        raise SystemExit(f"no supervisord runs for {paths.root}: `make demo` or `medops up` first")
    names = [r.name for r in services_status(paths, params)]
    sample = _sample(paths, params)
    load_before = os.getloadavg()
    kills = []
    for _ in range(args.kills):
        for name in names:
            result = kill_once(paths, params, name, sample)
            assert result["restarts"] == result["restarts_before"] + 1, result
            print(json.dumps(result), flush=True)
            kills.append(result)
    summary = {}
    for name in names:
        back = [k["back_s"] for k in kills if k["service"] == name]
        running = [k["running_s"] for k in kills if k["service"] == name]
        summary[name] = {"kills": len(back), "back_median_s": statistics.median(back),
                         "back_max_s": max(back), "running_median_s": statistics.median(running)}
    out = {"summary": summary, "kills": kills, "model_answered": sample is not None,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "cpus": os.cpu_count(), "python": platform.python_version()}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
