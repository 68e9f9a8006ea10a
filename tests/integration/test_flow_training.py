"""flows.training against a real Prefect server (Prefect's test harness), real DVC and real files.

The whole pipeline runs in the e2e test; here: the deploy gating (skip on a failed gate, no retry
on a rejected model, retries on an unreachable Triton), params written for a run, a stage run
through `dvc repro --single-item` with its artifact, and a quality failure stopping the flow.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from medops.config import load_params, update_params_file
from medops.errors import ConfigError, DataQualityError, GateRejectedError, ServingError
from medops.paths import ProjectPaths

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def project(tmp_path: Path) -> ProjectPaths:
    """A project folder with the repo's params.yaml; Triton (never started here) on a free port."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    update_params_file(root / "params.yaml", {"serving": {
        "grpc_port": _free_port(), "http_port": _free_port(), "metrics_port": _free_port(),
        "repository": str(root / ".medops" / "triton" / "repository")}})
    return ProjectPaths(root)


def _write_gate(paths: ProjectPaths, passed: bool, data_version: str = "0123abcd.dir") -> None:
    paths.gate.parent.mkdir(parents=True, exist_ok=True)
    reasons = ["auc 0.910 >= min_auc 0.850: pass",
               "accuracy 0.700 < min_accuracy 0.750: fail" if not passed else
               "accuracy 0.800 >= min_accuracy 0.750: pass"]
    paths.gate.write_text(json.dumps({"passed": passed, "reasons": reasons, "data_version": data_version,
                                      "timestamp": "2026-11-21T10:00:00+00:00"}))


def _write_export(paths: ProjectPaths, sha256: str | None = None, data_version: str = "0123abcd.dir") -> None:
    paths.models.mkdir(parents=True, exist_ok=True)
    paths.onnx_model.write_bytes(b"not really onnx: deploy must stop before Triton reads it")
    digest = sha256 or hashlib.sha256(paths.onnx_model.read_bytes()).hexdigest()
    paths.export_result.write_text(json.dumps({"sha256": digest, "data_version": data_version}))
    np.savez(paths.models / "golden.npz", images=np.full((2, 28, 28, 1), 0.5, np.float32),
             probabilities=np.array([0.3, 0.7], np.float32))


def _run_gating(paths: ProjectPaths):
    """flows.training.deploy_if_passed inside a flow, as training_pipeline runs it."""
    from prefect import flow

    import flows.training as training

    fast_deploy = training.deploy_model.with_options(retry_delay_seconds=0)

    @flow(name="deploy-gating-test")
    def gating() -> dict | None:
        original = training.deploy_model
        training.deploy_model = fast_deploy
        try:
            return training.deploy_if_passed(paths, load_params(paths.params))
        finally:
            training.deploy_model = original

    return gating(return_state=True)


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def read():
        async with get_client() as client:
            # sort and limit explicitly: Prefect 3.8.8's server answers 422 to the client's None
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)

    return asyncio.run(read())


def _logs(flow_run_id, timeout: float = 15.0) -> str:
    """The flow run's log messages as recorded by the Prefect server (sent in batches: poll)."""
    return "\n".join(message for _, message in _log_records(flow_run_id, timeout))


def _artifact(key: str) -> dict | None:
    """The newest artifact with ``key``, read from the server's REST API.

    (Prefect 3.8.8's client sends null for unset filters, which this server answers with 422.)
    """
    import httpx
    from prefect.settings import PREFECT_API_URL

    resp = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", timeout=10, json={
        "artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1, "offset": 0})
    resp.raise_for_status()
    found = resp.json()
    return found[0] if found else None


def _events(name: str, since, timeout: float = 30.0) -> list:
    """The events called ``name`` that occurred since ``since`` (a run's state) began, once there
    are any (the server stores events asynchronously) or the timeout passed."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    start = since.state_details.flow_run_id and since.timestamp
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(since.state_details.flow_run_id)
            occurred = EventOccurredFilter(since=run.start_time or start)
            found = client.read_events(EventFilter(event=EventNameFilter(name=[name]), occurred=occurred),
                                       limit=50).events
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)


def test_failed_gate_skips_deploy_and_the_flow_completes(project: ProjectPaths) -> None:
    _write_gate(project, passed=False)
    _write_export(project)

    state = _run_gating(project)

    assert state.is_completed(), state.message
    assert state.result() is None
    assert _task_runs(state.state_details.flow_run_id) == []  # the deploy task never ran
    logs = _logs(state.state_details.flow_run_id)
    assert "gate rejected the model, not deploying: accuracy 0.700 < min_accuracy 0.750: fail" in logs
    assert not (project.root / ".medops" / "triton").exists()
    # and says so as an event a user can attach an automation to
    [event] = _events("medops.model.rejected", since=state)
    assert event.payload["reasons"] == ["accuracy 0.700 < min_accuracy 0.750: fail"]


def test_rejected_model_is_not_retried(project: ProjectPaths) -> None:
    _write_gate(project, passed=True)
    _write_export(project, sha256="0" * 64)  # export.json names another file: not the gated model

    state = _run_gating(project)

    assert state.is_failed()
    with pytest.raises(GateRejectedError, match="not the model that was exported and gated"):
        state.result()
    (run,) = _task_runs(state.state_details.flow_run_id)
    assert run.name == "deploy" or run.name.startswith("deploy-")
    assert run.run_count == 1
    # recorded as refused, with the flow run as the reason
    from medops.serving.audit import history

    [entry] = history(project.root / ".medops" / "triton" / "repository")
    assert entry["outcome"] == "refused" and "not the model that was exported" in entry["error"]
    assert str(state.state_details.flow_run_id) in entry["reason"]


def test_unreachable_triton_is_retried_then_fails(project: ProjectPaths) -> None:
    _write_gate(project, passed=True)
    _write_export(project)

    state = _run_gating(project)

    assert state.is_failed()
    with pytest.raises(ServingError, match="cannot reach Triton"):
        state.result()
    (run,) = _task_runs(state.state_details.flow_run_id)
    assert run.run_count == 3  # the first try and two retries
    assert not any((project.root / ".medops" / "triton" / "repository").rglob("model.onnx"))
    # every try is in the deploy audit log, with the flow run as the reason
    from medops.serving.audit import history

    entries = history(project.root / ".medops" / "triton" / "repository")
    assert [e["outcome"] for e in entries] == ["failed"] * 3
    assert all("cannot reach Triton" in e["error"] and e["reason"].startswith("Prefect flow run ")
               and str(state.state_details.flow_run_id) in e["reason"] for e in entries)


def test_write_params_records_only_changed_values(project: ProjectPaths) -> None:
    from prefect import flow

    from flows.training import write_params

    before = project.params.read_text()
    epochs = load_params(project.params).train.epochs

    @flow
    def edit(overrides):
        return write_params(project, overrides)

    params = edit({"train": {"epochs": epochs, "learning_rate": 0.0005}, "gate": {"min_auc": 0.95}})
    assert params.train.learning_rate == 0.0005 and params.gate.min_auc == 0.95
    after = project.params.read_text()
    assert "learning_rate: 0.0005" in after and "min_auc: 0.95" in after
    assert "# medops pipeline settings" in after  # comments kept
    changed = [a for b, a in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(changed) == 2, changed  # epochs was unchanged and is not rewritten
    artifact = _artifact("params-changed")
    assert artifact is not None and "learning_rate" in artifact["data"] and "epochs" not in artifact["data"]

    with pytest.raises(ConfigError):
        edit({"train": {"epochs": 0}})
    assert project.params.read_text() == after  # an invalid value never reaches the file


def test_flow_parameters_are_validated_with_the_params_constraints() -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.training import training_pipeline

    with pytest.raises(ParameterTypeError, match="epochs"):
        training_pipeline.validate_parameters({"epochs": 0})
    with pytest.raises(ParameterTypeError, match="min_auc"):
        training_pipeline.validate_parameters({"min_auc": 1.5})
    assert training_pipeline.validate_parameters({"learning_rate": "0.01"})["learning_rate"] == 0.01


@pytest.fixture
def dvc_project(tmp_path: Path) -> ProjectPaths:
    """A git + DVC project with the repo's dvc.yaml, params.yaml and GX project and an ingested folder."""
    from test_quality_gx import build_ingested

    from medops.ops import dvc
    root = tmp_path / "dvcproject"
    root.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "medops", root / "medops", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "gx", root / "gx", ignore=shutil.ignore_patterns("uncommitted"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc.init(root)
    dvc.ensure_remote(root, "local", "dvc-remote")
    build_ingested(root / "data" / "ingested")
    return ProjectPaths(root)


def _run_quality_task(paths: ProjectPaths):
    from prefect import flow

    from flows.training import run_stage

    @flow
    def only_quality():
        return run_stage.with_options(name="quality", task_run_name="quality")(paths, "quality")

    return only_quality(return_state=True)


def test_stage_task_reproduces_with_dvc_and_posts_its_result(dvc_project: ProjectPaths) -> None:
    state = _run_quality_task(dvc_project)

    assert state.is_completed(), state.message
    result = state.result()
    assert result["success"] is True and result["n_rows"] > 0
    lock = yaml.safe_load((dvc_project.root / "dvc.lock").read_text())
    assert lock["stages"]["quality"]["params"]["params.yaml"]["quality"]["min_rows"] == 50
    fields = _artifact("stage-quality")
    assert fields is not None and fields["type"] == "table"
    assert {"field": "n_rows", "value": result["n_rows"]} in json.loads(fields["data"])
    expectations = _artifact("quality-expectations")
    assert expectations["type"] == "table"
    rows = json.loads(expectations["data"])
    assert len(rows) == result["n_expectations"] and rows[3]["type"] == "expect_column_values_to_be_unique"
    docs = _artifact("quality-report")  # Prefect posts a link artifact as markdown
    assert docs["type"] == "markdown" and Path(result["data_docs"]).as_uri() in docs["data"]
    (run,) = _task_runs(state.state_details.flow_run_id)
    assert run.name == "quality"
    logs = _logs(state.state_details.flow_run_id)
    assert "quality | Running stage 'quality':" in logs  # dvc's own lines, logged as they came


def test_quality_failure_stops_the_flow_with_its_message(dvc_project: ProjectPaths) -> None:
    import pandas as pd

    table = pd.read_parquet(dvc_project.metadata)
    table.loc[:4, "patient_id"] = None
    table.to_parquet(dvc_project.metadata, index=False)

    state = _run_quality_task(dvc_project)

    assert state.is_failed()
    with pytest.raises(DataQualityError) as err:
        state.result()
    assert str(err.value).startswith(
        f"expect_column_values_to_not_be_null failed on metadata.patient_id: 5 of {len(table):,} rows")
    [event] = _events("medops.data.rejected", since=state)
    assert event.payload["reason"] == str(err.value)


def test_ui_parameters_are_declared_once(monkeypatch) -> None:
    import inspect

    import flows.training as training

    props = training.training_pipeline.parameters.model_dump()["properties"]
    assert list(props) == ["project_root", "data_version"] + [d.split(".")[1] for d in training.UI_PARAMETERS]
    assert training.overrides_by_section({"epochs": 3, "min_auc": None, "min_accuracy": 0.6}) == {
        "train": {"epochs": 3}, "gate": {"min_accuracy": 0.6}}
    # one more line in the table is one more typed, documented parameter of the flow
    monkeypatch.setattr(training, "UI_PARAMETERS", training.UI_PARAMETERS + ("train.dropout",))

    def pipeline(project_root=None, **overrides):
        """Args:
            project_root: where.
            {ui_parameters}
        """
        return overrides

    wrapped = training.with_ui_parameters(pipeline)
    dropout = inspect.signature(wrapped).parameters["dropout"]
    assert dropout.default is None and "dropout: train.dropout for this run" in wrapped.__doc__
    from prefect import flow
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="dropout"):
        flow(wrapped).validate_parameters({"dropout": 1.5})  # TrainConfig.dropout < 1


FAKE_TRAIN = """\
import json, sys, time
from pathlib import Path
from PIL import Image

print("medops progress: train 0/2 epochs", file=sys.stderr)
print("before the sleep")
print("medops progress: train 1/2 epochs (loss 0.5000)", file=sys.stderr)
time.sleep(3)
print("after the sleep")
print("medops progress: train 2/2 epochs (loss 0.4000)", file=sys.stderr)
Path("models").mkdir(exist_ok=True)
Path("models/model.keras").write_text("not a model")
Image.new("L", (8, 8), 200).save("models/augmentation_preview.png")
Path("reports/stages").mkdir(parents=True, exist_ok=True)
Path("reports/stages/train.json").write_text(json.dumps({
    "epochs_run": 2, "val_auc": 0.81, "model_path": str(Path("models/model.keras").resolve()),
    "history": {"loss": [0.5, 0.4], "val_auc": [0.75, 0.81]}}))
"""


def _log_records(flow_run_id, timeout: float = 20.0) -> list[tuple[float, str]]:
    """(timestamp, message) of the flow run's logs, once the run's last line has arrived (the
    server receives logs in batches: poll)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    async def read():
        async with get_client() as client:
            return await client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                limit=200, offset=0, sort=LogSort.TIMESTAMP_ASC)

    deadline = time.monotonic() + timeout
    while True:
        logs = asyncio.run(read())
        if any("Finished in state" in log.message for log in logs) or time.monotonic() > deadline:
            return [(log.timestamp.timestamp(), log.message) for log in logs]
        time.sleep(0.5)


def test_a_long_stage_is_logged_while_it_runs_with_progress_and_typed_artifacts(tmp_path: Path) -> None:
    from prefect import flow

    from flows.training import run_stage
    from medops.ops import dvc

    root = tmp_path / "slow"
    root.mkdir()
    (root / "params.yaml").write_text("{}\n")
    (root / "fake_train.py").write_text(FAKE_TRAIN)
    (root / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: python fake_train.py\n    deps: [fake_train.py]\n"
        "    outs: [models/model.keras]\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc.init(root)
    paths = ProjectPaths(root)

    @flow
    def only_train():
        return run_stage.with_options(name="train", task_run_name="train")(paths, "train")

    state = only_train(return_state=True)

    assert state.is_completed(), state.message
    logs = _log_records(state.state_details.flow_run_id)
    when = {message: t for t, message in logs}
    assert when["train | after the sleep"] - when["train | before the sleep"] >= 2.5, logs
    assert "train | medops progress: train 1/2 epochs (loss 0.5000)" in when
    progress = _artifact("train-progress")
    assert progress["type"] == "progress" and float(progress["data"]) == 100.0
    fields = _artifact("stage-train")
    assert fields["type"] == "table" and {"field": "val_auc", "value": 0.81} in json.loads(fields["data"])
    history = _artifact("train-history")
    assert history["type"] == "table" and json.loads(history["data"])[1] == {
        "epoch": 2, "loss": 0.4, "val_auc": 0.81}
    preview = _artifact("train-augmentation-preview")
    assert preview["type"] == "image" and preview["data"].startswith("data:image/png;base64,")
