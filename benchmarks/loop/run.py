"""The operating loop, measured on a running `make demo`: studies land in the export folder, and
medops watch -> ingest-studies -> training-pipeline -> Triton follow by events alone.

    make demo                                   # once: servers, deployments, watcher, model v1
    .venv/bin/python benchmarks/loop/run.py [--project .] [--deliveries 3] [--big 300] [--json F]

Measures, through Prefect's API and Triton:
1. landing -> ingest start: from the last file of a small delivery (`medops synth --add 3`)
   written to the ingest-studies flow run (started by the trigger on medops.export.changed)
   starting, per delivery (target p95 <= 10 s); each delivery waits for the loop to be idle;
2. 300 new labelled studies -> a new model version answering on Triton (reported with each
   stage's share: the watcher's quiet time and the trigger, ingest, every training task);
3. Prefect's overhead per stage: a training run with nothing to do (every DVC stage up to date),
   whose tasks then take only Prefect's task machinery plus `dvc repro`'s own up-to-date check
   (target <= 1 s per stage).
It sends traffic only to the demo's servers on 127.0.0.1 and stops by itself (bounded waits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _t(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else None


class Api:
    def __init__(self, url: str) -> None:
        self.url = url

    def runs(self, since: float) -> list[dict[str, Any]]:
        runs = httpx.post(f"{self.url}/flow_runs/filter", timeout=10, json={
            "sort": "EXPECTED_START_TIME_ASC", "limit": 50,
            "flow_runs": {"expected_start_time": {"after_": datetime.fromtimestamp(since).astimezone().isoformat()}},
        }).json()
        flows = {f["id"]: f["name"] for f in httpx.post(f"{self.url}/flows/filter", json={}, timeout=10).json()}
        for r in runs:
            r["flow"] = flows.get(r["flow_id"])
        return runs

    def tasks(self, run_id: str) -> list[dict[str, Any]]:
        return httpx.post(f"{self.url}/task_runs/filter", timeout=10, json={
            "flow_runs": {"id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 100}).json()

    def wait(self, since: float, flow: str, *, done: bool, timeout: float) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for r in self.runs(since):
                if r["flow"] == flow and (r["state_type"] in ("COMPLETED", "FAILED", "CRASHED") if done
                                          else r["start_time"]):
                    return r
            time.sleep(0.5)
        raise TimeoutError(f"no {flow} run {'finished' if done else 'started'} within {timeout} s")

    def idle(self, timeout: float = 1800, quiet_s: float = 15.0) -> None:
        """Wait until no run is active for ``quiet_s`` in a row: a finished ingest's event starts
        its training run a few seconds later, so one empty look is not enough."""
        deadline = time.time() + timeout
        quiet_since = None
        while time.time() < deadline:
            active = httpx.post(f"{self.url}/flow_runs/filter", timeout=10, json={
                "flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING", "SCHEDULED"]}}}}).json()
            if active:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.time()
            elif time.time() - quiet_since >= quiet_s:
                return
            time.sleep(1)
        raise TimeoutError("the loop did not go idle")


def add_studies(project: Path, n: int) -> float:
    """``medops synth --add n``; returns when its last file was written (the process's end)."""
    subprocess.run([sys.executable, "-m", "medops", "--project", str(project), "synth", "--add", str(n)],
                   check=True, capture_output=True, cwd=project)
    return time.time()


def landing_latency(api: Api, project: Path, deliveries: int) -> list[float]:
    out = []
    for _ in range(deliveries):
        api.idle()
        landed = add_studies(project, 3)
        run = api.wait(landed - 1, "ingest-studies", done=False, timeout=120)
        out.append(_t(run["start_time"]) - landed)
        print(f"  delivery of 3 studies: ingest started {out[-1]:.1f} s after the last file landed", flush=True)
    return out


def big_delivery(api: Api, project: Path, n: int, model_name: str, grpc_url: str) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    api.idle()
    with grpcclient.InferenceServerClient(grpc_url) as client:
        before = max(int(v) for v in client.get_model_config(model_name).config.version_policy.specific.versions)
    landed = add_studies(project, n)
    ingest = api.wait(landed - 1, "ingest-studies", done=True, timeout=900)
    train = api.wait(landed - 1, "training-pipeline", done=True, timeout=3600)
    with grpcclient.InferenceServerClient(grpc_url) as client:
        deadline = time.time() + 120
        while time.time() < deadline and not client.is_model_ready(model_name, str(before + 1)):
            time.sleep(0.5)
        answering = time.time()
        ready = client.is_model_ready(model_name, str(before + 1))
    shares = {"watcher quiet + trigger + start": _t(ingest["start_time"]) - landed,
              "ingest-studies": ingest["total_run_time"],
              "trigger -> training start": _t(train["start_time"]) - _t(ingest["end_time"])}
    for task in api.tasks(train["id"]):
        shares[f"training: {task['name']}"] = task["total_run_time"]
    return {"studies": n, "new_version": before + 1, "answering": ready,
            "seconds_to_answering": answering - landed, "shares_s": shares,
            "training_state": train["state_name"]}


def noop_overhead(api: Api, project: Path) -> dict[str, float]:
    api.idle()
    started = time.time()
    subprocess.run([sys.executable, "-m", "flows.run", "training-pipeline", "--project", str(project)],
                   check=True, capture_output=True, cwd=project)
    run = api.wait(started - 1, "training-pipeline", done=True, timeout=600)
    return {t["name"]: t["total_run_time"] for t in api.tasks(run["id"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=REPO)
    parser.add_argument("--deliveries", type=int, default=3)
    parser.add_argument("--big", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from medops.config import load_params
    from medops.ops.prefect_server import prefect_env

    project = args.project.resolve()
    params = load_params(project / "params.yaml")
    import os

    os.environ.update(prefect_env(params.prefect, project / ".medops"))
    api = Api(params.prefect.api_url)
    print("1. landing -> ingest start", flush=True)
    latencies = landing_latency(api, project, args.deliveries)
    print(f"2. {args.big} new studies -> a new model version answering on Triton", flush=True)
    big = big_delivery(api, project, args.big, params.serving.model_name, params.serving.grpc_url)
    print("3. Prefect's overhead per stage (a training run with nothing to do)", flush=True)
    overhead = noop_overhead(api, project)
    p95 = sorted(latencies)[max(0, int(round(0.95 * len(latencies))) - 1)]
    print(f"\nlanding -> ingest start: {', '.join(f'{v:.1f}' for v in latencies)} s; "
          f"median {statistics.median(latencies):.1f} s, p95 {p95:.1f} s (target <= 10 s) "
          f"{'PASS' if p95 <= 10 else 'FAIL'}")
    print(f"{args.big} studies -> version {big['new_version']} answering: {big['seconds_to_answering']:.0f} s "
          f"(training {big['training_state']}, answering={big['answering']})")
    total = sum(big["shares_s"].values())
    for name, secs in big["shares_s"].items():
        print(f"  {name:40s} {secs:7.1f} s  {100 * secs / total:5.1f} %")
    from medops.pipeline import STAGES

    stage_times = {name: secs for name, secs in overhead.items() if name in STAGES}
    worst = max(stage_times.values()) if stage_times else float("nan")
    print(f"no-op training run, per stage task (Prefect + dvc's up-to-date check): worst {worst:.2f} s "
          f"(target <= 1 s) {'PASS' if worst <= 1 else 'FAIL'}; the other tasks for reference:")
    for name, secs in overhead.items():
        print(f"  {name:40s} {secs:6.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"landing_to_ingest_s": latencies, "p95_s": p95, "big": big,
                                         "noop_task_s": overhead}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
