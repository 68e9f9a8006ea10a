"""flows.serve against a real Prefect server started by medops.ops.prefect_server: the deployment
appears under params.prefect.deployment_name, with the parameter form and its constraints."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from medops.config import update_params_file
from medops.ops.prefect_server import prefect_env, start_prefect, stop_prefect

# make test serves the same deployments through medops up in tests/e2e; this file checks what
# flows.serve registers, field by field, in make test-long
pytestmark = [pytest.mark.prefect, pytest.mark.slow, pytest.mark.long]

REPO = Path(__file__).resolve().parents[2]


def _read_deployment(api_url: str, flow: str, name: str) -> dict | None:
    resp = httpx.get(f"{api_url}/deployments/name/{flow}/{name}", timeout=5)
    return resp.json() if resp.status_code == 200 else None


def test_serve_registers_the_deployment_with_typed_parameters(tmp_path: Path, free_port) -> None:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    params = update_params_file(root / "params.yaml", {
        "prefect": {"port": free_port(), "deployment_name": "medops-test"}})
    state = root / ".medops"
    proc = None
    try:
        start_prefect(params.prefect, state_dir=state)
        env = {**os.environ, **prefect_env(params.prefect, state), "MEDOPS_ROOT": str(root)}
        log = open(tmp_path / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # flows.serve registers its deployments one after another: wait for all three
        names = ("training-pipeline", "ingest-studies", "drift-monitor")
        found: dict[str, dict | None] = dict.fromkeys(names)
        deadline = time.monotonic() + 120
        while None in found.values() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            found = {n: found[n] or _read_deployment(params.prefect.api_url, n, "medops-test") for n in names}
        assert None not in found.values(), (found, (tmp_path / "serve.log").read_text()[-3000:])
        deployment = found["training-pipeline"]

        assert deployment["parameters"] == {"project_root": str(root)}
        assert "epochs=5" in deployment["description"]
        schema = deployment["parameter_openapi_schema"]["properties"]
        assert {"epochs", "batch_size", "learning_rate", "min_auc", "min_accuracy",
                "min_sensitivity", "min_specificity", "project_root"} <= set(schema)
        assert {"minimum": 1, "type": "integer"} in schema["epochs"]["anyOf"]
        assert {"maximum": 1, "minimum": 0, "type": "number"} in schema["min_auc"]["anyOf"]

        # the server enforces the schema: a run asking for 0 epochs is refused before it starts
        bad = httpx.post(f"{params.prefect.api_url}/deployments/{deployment['id']}/create_flow_run",
                         json={"parameters": {"epochs": 0}}, timeout=10)
        assert bad.status_code == 409 and "epochs" in bad.text

        # the ingest deployment is served beside it (no schedule unless params.yaml sets one)
        api = params.prefect.api_url
        ingest = _read_deployment(api, "ingest-studies", "medops-test")
        assert ingest is not None and ingest["parameters"] == {"project_root": str(root)}
        assert ingest["schedules"] == []
        # and the drift monitor, also unscheduled unless prefect.monitor_schedule is set
        monitor = _read_deployment(api, "drift-monitor", "medops-test")
        assert monitor is not None and monitor["schedules"] == []
        # a new data version starts a training run with it: the trigger is real, so emit the
        # event as ingest-studies does and watch the run it creates (it then fails: this project
        # has no dataset at that version, which the run says)
        autos = httpx.post(f"{api}/automations/filter", json={}, timeout=10).json()
        assert sorted(a["trigger"]["expect"] for a in autos) == [["medops.dataset.versioned"],
                                                                 ["medops.export.changed"]]
        # from a process of its own, as the ingest flow runs (Prefect's events worker is global)
        emit = ("from flows.ingest import emit_versioned; from prefect.events.worker import EventsWorker; "
                "emit_versioned('deadbeef.dir', {'files_seen': 1, 'used': 1, 'decoded': 1, "
                "'quarantined': 0, 'quarantined_by_reason': {}}, None); EventsWorker.drain_all()")
        subprocess.run([sys.executable, "-c", emit], cwd=REPO, env=env, check=True, timeout=60)
        runs = []
        deadline = time.monotonic() + 60
        while not runs and time.monotonic() < deadline:
            time.sleep(1)
            runs = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}},
                              timeout=10).json()
        assert [r["parameters"] for r in runs] == [{"project_root": str(root), "data_version": "deadbeef.dir"}]
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        stop_prefect(state)
