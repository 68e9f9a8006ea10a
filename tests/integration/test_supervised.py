"""The supervised services (medops up / make demo) killed with SIGKILL: each is back within 30 s,
counted as a restart, and Triton serves again exactly the versions it served before (the model
repository is the truth: a half-written version a killed deploy left on disk is not loaded).

One supervisord for the module, in a project of its own (free ports), with the Prefect server,
Triton (two tiny deployed versions, see test_triton_serving) and the export folder watcher; the
deployments (flows.serve, which imports TensorFlow) are left out to keep it light: the kill and
restart path is the same for all four (medops.ops.supervise). Stopped with `medops down`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from medops.cli import main
from medops.config import load_params, update_params_file
from medops.errors import ExitCode
from medops.ops.supervise import ServiceStatus, services_status, start_supervisor
from medops.paths import ProjectPaths
from test_triton_serving import (
    SPEC, V1, V2, V2_THRESHOLD, expected_probability, write_bundled_dicom, write_export_result,
    write_gate, write_golden, write_tiny_onnx)

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.triton, pytest.mark.prefect]

SERVICES = ("prefect", "triton", "watcher")
BACK_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root, free_port):
    root = tmp_path_factory.mktemp("supervised")
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    update_params_file(root / "params.yaml", {
        "serving": {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port(),
                    "startup_timeout_s": 120},
        "prefect": {"port": free_port()}})
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    try:
        lines = start_supervisor(paths, params, SERVICES, timeout=240)
        yield {"paths": paths, "params": params, "lines": lines, "root": root}
    finally:
        assert main(["--project", str(root), "down"]) == ExitCode.OK


def status(project) -> dict[str, ServiceStatus]:
    return {s.name: s for s in services_status(project["paths"], project["params"])}


def kill_and_wait(project, name: str) -> tuple[ServiceStatus, ServiceStatus, float]:
    """SIGKILL the service's process; wait until another process of it runs and is healthy."""
    before = status(project)[name]
    assert before.running and before.pid
    os.kill(before.pid, signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < BACK_WITHIN_S + 30:
        now = status(project)[name]
        if now.running and now.pid != before.pid and now.healthy is not False:
            return before, now, time.monotonic() - t0
        time.sleep(0.25)
    pytest.fail(f"{name} not back {BACK_WITHIN_S + 30:g} s after SIGKILL: {status(project)[name]}")


def deploy_two_versions(project) -> None:
    from medops.serving.deploy import deploy
    from medops.serving.server import resolve_admin_key

    paths, cfg = project["paths"], project["params"].serving
    base = project["root"] / "artifacts"
    for n, coef, chosen in ((1, V1, None), (2, V2, V2_THRESHOLD)):
        onnx_path = write_tiny_onnx(base / f"export{n}" / "model.onnx", **coef)
        write_golden(onnx_path, **coef)
        deploy(cfg, onnx=onnx_path, gate=write_gate(base / f"gate{n}.json", passed=True),
               export_result=write_export_result(onnx_path, decision_threshold=chosen),
               repository=cfg.repository_path(paths.root), url=cfg.grpc_url, protocol="grpc",
               preprocessing=SPEC, admin_key=resolve_admin_key(cfg, state_dir=paths.state))


def ready_models(project) -> set[tuple[str, str]]:
    """(model, version) of every READY entry of Triton's repository index (admin API)."""
    import tritonclient.http as httpclient

    from medops.serving.server import admin_headers, resolve_admin_key

    paths, cfg = project["paths"], project["params"].serving
    client = httpclient.InferenceServerClient(cfg.http_url)
    try:
        index = client.get_model_repository_index(
            headers=admin_headers(resolve_admin_key(cfg, state_dir=paths.state)))
    finally:
        client.close()
    return {(m["name"], m.get("version", "")) for m in index if m.get("state") == "READY"}


def test_all_start_and_status_reports_each(project, capsys):
    assert main(["--project", str(project["root"]), "status", "--json"]) == ExitCode.OK
    out = json.loads(capsys.readouterr().out)
    assert out["supervisor"]["running"] is True
    rows = {r["name"]: r for r in out["services"]}
    assert sorted(rows) == sorted(SERVICES)
    for row in rows.values():
        assert row["running"] and row["state"] == "RUNNING" and row["restarts"] == 0
        assert row["pid"] > 0 and row["uptime_s"] >= 0
    assert rows["prefect"]["healthy"] and rows["triton"]["healthy"]
    # the recorded pids are the supervised processes themselves (they exec the server)
    run = project["paths"].run_dir
    assert int((run / "triton.pid").read_text()) == rows["triton"]["pid"]
    assert int((run / "prefect.pid").read_text()) == rows["prefect"]["pid"]


def test_triton_killed_comes_back_serving_exactly_what_it_served(project, tmp_path):
    from medops.serving.client import predict_files
    from medops.serving.repository import list_versions

    cfg = project["params"].serving
    repo = cfg.repository_path(project["root"])
    deploy_two_versions(project)
    served = ready_models(project)
    assert (cfg.model_name, "2") in served and (cfg.model_name, "1") not in served
    # what a deploy killed after writing its version folder leaves: files of version 3 on disk,
    # not pinned by config.pbtxt (a truncated model, no deploy.json)
    half = repo / cfg.model_name / "3"
    shutil.copytree(repo / cfg.model_name / "2", half)
    (half / "model.onnx").write_bytes((half / "model.onnx").read_bytes()[:100])
    (half / "deploy.json").unlink(missing_ok=True)
    assert list_versions(repo, cfg.model_name) == [1, 2, 3]

    before, after, seconds = kill_and_wait(project, "triton")
    print(f"\ntriton: SIGKILL pid {before.pid} -> pid {after.pid} ready after {seconds:.1f} s")
    assert seconds <= BACK_WITHIN_S
    assert after.restarts == before.restarts + 1
    assert ready_models(project) == served  # the same models at the same versions; not 3
    cr = write_bundled_dicom(tmp_path / "cr.dcm", index=3)
    pred = predict_files([cr], url=cfg.grpc_url, model_name=cfg.model_name, preprocessing=SPEC)[0]
    assert pred.error is None and pred.model_version == "2"
    assert pred.probability == pytest.approx(expected_probability(cr, **V2), abs=1e-5)


def test_prefect_killed_comes_back_with_its_database(project):
    import urllib.request

    api = project["params"].prefect.api_url
    before, after, seconds = kill_and_wait(project, "prefect")
    print(f"\nprefect: SIGKILL pid {before.pid} -> pid {after.pid} healthy after {seconds:.1f} s")
    assert seconds <= BACK_WITHIN_S and after.restarts == before.restarts + 1
    with urllib.request.urlopen(f"{api}/version", timeout=10) as resp:
        assert resp.status == 200


def test_watcher_killed_comes_back_and_reports_the_next_delivery(project):
    paths, params = project["paths"], project["params"]
    before, after, seconds = kill_and_wait(project, "watcher")
    print(f"\nwatcher: SIGKILL pid {before.pid} -> pid {after.pid} running after {seconds:.1f} s")
    assert seconds <= BACK_WITHIN_S and after.restarts == before.restarts + 1
    log = paths.logs / "watch.log"
    deadline = time.monotonic() + 30
    while "watching" not in log.read_text().rsplit("=== medops.ops.supervise", 1)[-1]:
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.25)
    (paths.export(params.ingest.source) / "new-study.dcm").write_bytes(b"not yet a DICOM file")
    deadline = time.monotonic() + 30
    while "emitted medops.export.changed" not in log.read_text().rsplit("=== medops.ops.supervise", 1)[-1]:
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)


def test_serve_stop_under_supervision_stays_stopped_until_started(project, capsys):
    root = str(project["root"])
    assert main(["--project", root, "serve", "stop"]) == ExitCode.OK
    time.sleep(5)  # longer than a restart takes
    row = status(project)["triton"]
    assert not row.running and row.state == "STOPPED"
    assert main(["--project", root, "serve", "status"]) == ExitCode.UNAVAILABLE
    assert main(["--project", root, "serve", "start"]) == ExitCode.OK
    assert status(project)["triton"].running and status(project)["triton"].healthy


def test_down_stops_everything(project, capsys):
    rows = status(project)
    pids = [r.pid for r in rows.values()]
    assert main(["--project", str(project["root"]), "down"]) == ExitCode.OK
    assert "stopped supervisord" in capsys.readouterr().out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    cfg, pcfg = project["params"].serving, project["params"].prefect
    for port in (cfg.http_port, cfg.grpc_port, pcfg.port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    assert not (project["paths"].run_dir / "supervisord.pid").exists()
