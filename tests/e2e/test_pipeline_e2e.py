"""The whole pipeline on a small subset, with every part real, driven by events (issue 16's loop).

A fresh copy of the project (what a clone holds) in a temporary git repository, with its own
services as `medops up` starts them (supervisord: a Prefect server, Triton, the served deployments,
the export folder watcher). The test only delivers an export; the watcher's event starts the
ingest-studies deployment, its new data version's event starts training-pipeline, which gates and
deploys. The fixtures read those runs back from the Prefect API. Real DVC with its local remote; a real
Great Expectations checkpoint; one epoch of Keras training; tf2onnx; the real `tritonserver`
started by medops on free ports; answers read back with tritonclient and `medops predict`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.triton, pytest.mark.prefect, pytest.mark.dvc]

SUBSET = 500  # images per official split: enough for two short epochs to learn something


GENERATED = ("tests/", "benchmarks/", "data/", "models/", "reports/", ".medops/", "dvc-remote/")


def _copy_clone(repo_root: Path, dest: Path) -> None:
    """Copy what a fresh clone holds (git-tracked files and those about to be), nothing generated."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=repo_root, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    for rel in listed:
        src = repo_root / rel
        # not tests, and none of what a `make demo` in this checkout left (DVC's lock, outputs)
        if not src.is_file() or rel.startswith(GENERATED) or rel == "dvc.lock":
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root, free_port):
    from medops.config import update_params_file

    root = tmp_path_factory.mktemp("clone")
    _copy_clone(repo_root, root)
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    update_params_file(root / "params.yaml", {
        "synth": {"max_images_per_split": SUBSET},
        # lr 0.003 left two epochs on a knife edge (loss 0.698 -> 0.693): test AUC 0.52-0.93 over
        # five training orders, 0.672 in one CI-like run on an AVX-512 machine; at 0.001 fifteen
        # orders (oneDNN on and off) gave 0.85-0.94, far from the gate's 0.7 on any CPU
        "train": {"epochs": 2, "batch_size": 16, "learning_rate": 0.001},
        "serving": {**ports, "repository": str(root / ".medops" / "triton" / "repository")},
        # the project's own Prefect server (medops up), never the demo's port
        "prefect": {"port": free_port()},
        # a two-epoch model on 500 training images: the gate is set for it, and tested both ways
        "gate": {"min_auc": 0.7, "min_accuracy": 0.5, "min_sensitivity": 0.0, "min_specificity": 0.0},
    })
    git = ["git", "-c", "user.name=medops-test", "-c", "user.email=test@medops.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "clone"], cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def paths(project):
    from medops.paths import ProjectPaths

    return ProjectPaths(project)


@pytest.fixture(scope="module")
def params(project):
    from medops.config import load_params

    return load_params(project / "params.yaml")


@pytest.fixture(scope="module")
def services(project, paths, params, monkeypatch_module):
    """The project's own services as `medops up` starts them, kept by supervisord: its Prefect
    server, Triton (repository API locked with the project's key), the served deployments
    (`python -m flows.serve`) and the export folder watcher (`medops watch`)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from medops.ops.prefect_server import prefect_env
    from medops.ops.supervise import start_supervisor, stop_supervisor, stop_unsupervised

    monkeypatch_module.chdir(project)
    monkeypatch_module.setenv("MEDOPS_ROOT", str(project))
    monkeypatch_module.setenv("MEDOPS_DEID_KEY", "e2e-test-key")  # the served flow runs inherit it
    monkeypatch_module.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    env = prefect_env(params.prefect, paths.state)
    for key, value in env.items():
        monkeypatch_module.setenv(key, value)
    # the flow runs' results, read back here as the fixtures' states (kept below .medops/prefect)
    monkeypatch_module.setenv("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    try:
        start_supervisor(paths, params, timeout=600.0)
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"],
                                         PREFECT_HOME: env["PREFECT_HOME"]}):
            try:
                yield paths
            finally:
                # Prefect's events worker is one per process and keeps the API it was started
                # with: drain it into this server, so later tests' events go to theirs
                from prefect.events.worker import EventsWorker

                EventsWorker.drain_all(timeout=30)
    finally:
        stop_supervisor(paths)
        stop_unsupervised(paths)


@pytest.fixture(scope="module")
def triton(services, paths):
    from medops.serving.server import server_status

    status = server_status(paths.state)
    assert status.ready and status.info is not None and status.info.restricted
    return status.info


# How long each step of the loop may take on a loaded 2-core machine (generous, but bounded).
STEP_TIMEOUT_S = {"watcher": 180, "ingest": 600, "training": 1200}


class Loop:
    """What the events did, read back from the Prefect API."""

    def __init__(self, paths) -> None:
        self.paths = paths
        self.runs: dict[str, object] = {}  # flow name -> its one FlowRun

    def _runs(self, flow: str) -> list:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName
        from prefect.client.schemas.sorting import FlowRunSort

        with get_client(sync_client=True) as client:
            return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])), limit=20,
                                         sort=FlowRunSort.EXPECTED_START_TIME_ASC)

    def _logs(self) -> str:
        tails = []
        for name in ("watch.log", "flow-serve.log"):
            try:
                text = (self.paths.logs / name).read_text(errors="replace")
            except OSError:
                text = "(no log)"
            tails.append(f"--- last lines of .medops/logs/{name}:\n" + "\n".join(text.splitlines()[-25:]))
        return "\n".join(tails)

    def wait(self, flow: str, step: str, timeout: float):
        """The one run of ``flow``, once it finished; fails naming ``step`` when it did not happen."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            runs = self._runs(flow)
            if len(runs) > 1:
                pytest.fail(f"{len(runs)} {flow} runs, not one: {[(r.name, r.state_name) for r in runs]}")
            if runs and runs[0].state is not None and runs[0].state.is_final():
                self.runs[flow] = runs[0]
                return runs[0]
            if time.monotonic() > deadline:
                seen = f"its run is {runs[0].state_name}" if runs else f"no {flow} run was started"
                pytest.fail(f"the loop stopped at {step} after {timeout:g} s: {seen}\n{self._logs()}")
            time.sleep(2.0)


def _deliver(project: Path, paths, params) -> None:
    """A hospital's delivery: the export (with the canary study) written aside, then moved into
    the export folder at once, as a copy tool's final rename would: one delivery, one event."""
    from medops.dicom import synth
    from medops.paths import BUNDLED_DATASET

    staging = project / ".delivery"
    synth.run(params.synth, source_npz=BUNDLED_DATASET, out_dir=staging)
    add_canary_study(staging)
    export = paths.export(params.ingest.source)
    for entry in sorted(staging.iterdir()):
        entry.rename(export / entry.name)
    staging.rmdir()


@pytest.fixture(scope="module")
def loop(project, paths, params, services, triton):
    """The loop, driven by events only: the delivery lands -> the watcher's medops.export.changed
    -> its trigger starts ingest-studies -> medops.dataset.versioned -> its trigger starts
    training-pipeline -> gate -> deploy on Triton. Nothing here starts a flow."""
    from medops.ops.demo import wait_for_deployments

    wait_for_deployments(params, timeout=600.0)
    _deliver(project, paths, params)
    loop = Loop(paths)
    watched = medops_events("medops.export.changed", timeout=STEP_TIMEOUT_S["watcher"])
    assert watched, "the watcher emitted no medops.export.changed\n" + loop._logs()
    ingest = loop.wait("ingest-studies", "the ingest-studies run (started by medops.export.changed)",
                       STEP_TIMEOUT_S["ingest"])
    assert ingest.state.is_completed(), \
        f"ingest-studies ended {ingest.state_name}: {ingest.state.message}\n{loop._logs()}"
    loop.wait("training-pipeline", "the training-pipeline run (started by medops.dataset.versioned)",
              STEP_TIMEOUT_S["training"])
    return loop


@pytest.fixture(scope="module")
def ingest_run(loop):
    """The ingest-studies run the watcher's event started (its final state, from the API)."""
    return loop.runs["ingest-studies"].state


@pytest.fixture(scope="module")
def flow_run(loop):
    """The training-pipeline run the new data version's event started (its final state)."""
    return loop.runs["training-pipeline"].state


# Distinctive synthetic PHI, put everywhere it hides; none of it may reach any output.
CANARIES = {
    "PatientName": "Zebracanary^Quintessa",
    "PatientID": "QX-CANARY-7731",
    "PatientBirthDate": "19010203",
    "PatientAddress": "17 Canarylane Road, Birdtown",
    "OtherPatientIDs": "QX-CANARY-OTHER-1",
    "InstitutionName": "Canarywood Memorial",
    "InstitutionAddress": "1 Canarywood Plaza",
    "ReferringPhysicianName": "Drcanary^Ophelia",
    "PerformingPhysicianName": "Perfcanary^Ignatius",
    "AccessionNumber": "CANACC99127",
    "StudyDescription": "canarystudy description of the chest",
    "ImageComments": "canarycomment patient said hello",
    "StudyID": "CANSTUDY42",
}
NESTED_CANARY = "canarynested requested procedure"
# hospitals name export folders and files after the patient: the canary study's own path
CANARY_FOLDER = "Zebracanary_Quintessa_QXMRN7731"
CANARY_FILE = "Zebracanary_chest_QXMRN7731.dcm"
PRIVATE_CANARY = "canaryprivate vendor note"


def canary_strings() -> list[str]:
    values = [v for v in CANARIES.values()] + [NESTED_CANARY, PRIVATE_CANARY]
    # names also appear as their components
    return values + ["Zebracanary", "Quintessa", "Drcanary", "Perfcanary", "QX-CANARY", "QXMRN7731"]


def add_canary_study(export: Path) -> None:
    """One labelled study full of canary PHI, and a truncated copy of it (to be quarantined)."""
    import csv

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    with (export / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    template = next(r for r in rows if r["split"] == "train")
    ds = pydicom.dcmread(export / "dicom" / template["path"])
    for keyword, value in CANARIES.items():
        setattr(ds, keyword, value)
    item = Dataset()
    item.RequestedProcedureDescription = NESTED_CANARY
    item.RequestedProcedureID = "CANREQ1"
    ds.RequestAttributesSequence = [item]
    block = ds.private_block(0x0011, "CANARYCORP", create=True)
    block.add_new(0x01, "LO", PRIVATE_CANARY)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder = export / CANARY_FOLDER
    folder.mkdir(parents=True)
    ds.save_as(folder / CANARY_FILE, enforce_file_format=True)
    data = (folder / CANARY_FILE).read_bytes()
    (folder / ("cut_" + CANARY_FILE)).write_bytes(data[: len(data) - 300])  # a transfer cut short
    # its label arrives as a manifest of its own, as a hospital's second delivery would
    with (export / "labels-canary.csv").open("w", newline="") as fh:
        fh.write("SOPInstanceUID,label,split\n")
        fh.write(f"{ds.SOPInstanceUID},{template['label']},{template['split']}\n")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def medops_events(name: str, expected: int = 1, timeout: float = 30.0) -> list:
    """The Prefect API's events called ``name``, once it holds ``expected`` of them."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=50).events
            if len(events) >= expected or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def _started_by(run) -> tuple[set, list]:
    """What the automation that created ``run`` expects, and the events its action followed."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    assert run.created_by is not None and run.created_by.type == "AUTOMATION", \
        f"{run.name} was not started by an automation: {run.created_by}"
    with get_client(sync_client=True) as client:
        automation = client.read_automation(run.created_by.id)
        executed = client.read_events(EventFilter(
            event=EventNameFilter(name=["prefect.automation.action.executed"]),
            related=EventRelatedFilter(id=[f"prefect.flow-run.{run.id}"])), limit=10).events
    triggering = [r.id.removeprefix("prefect.event.") for e in executed for r in e.related
                  if r.role == "triggering-event"]
    return set(automation.trigger.expect), triggering


def _deployment_id(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name).id


def test_the_events_drove_the_loop(loop, ingest_run, flow_run, paths, params, capsys):
    from medops.cli import main

    ingest, training = loop.runs["ingest-studies"], loop.runs["training-pipeline"]
    # one delivery, one watcher event; its automation started the ingest run
    [changed] = medops_events("medops.export.changed")
    assert _started_by(ingest) == ({"medops.export.changed"}, [str(changed.id)])
    assert (ingest.deployment_id, training.deployment_id) == (
        _deployment_id(f"ingest-studies/{params.prefect.deployment_name}"),
        _deployment_id(f"training-pipeline/{params.prefect.deployment_name}"))
    # the new data version's event; its automation started training with that version
    [versioned] = medops_events("medops.dataset.versioned")
    data_version = ingest_run.result()["data_version"]
    assert versioned.payload["data_version"] == data_version and versioned.payload["previous_version"] is None
    assert _started_by(training) == ({"medops.dataset.versioned"}, [str(versioned.id)])
    assert training.parameters == {"project_root": str(paths.root), "data_version": data_version}
    assert flow_run.result()["data_version"] == data_version
    # and the served model's lineage names that run
    assert main(["--project", str(paths.root), "lineage", "--json"]) == 0
    served = json.loads(capsys.readouterr().out)
    assert served["flow_run_id"] == str(training.id) and served["data_version"] == data_version


def test_flow_completes_and_deploys(flow_run, ingest_run, paths):
    assert flow_run.is_completed(), flow_run.message
    summary = flow_run.result()
    gate = json.loads(paths.gate.read_text())
    assert gate["passed"] is True, gate["reasons"]
    assert summary["deployed"]["version"] == 1
    # the loop's events: a new data version, then the model deployed from it
    [versioned] = medops_events("medops.dataset.versioned")
    [deployed] = medops_events("medops.model.deployed")
    assert versioned.payload["data_version"] == summary["data_version"] == ingest_run.result()["data_version"]
    assert deployed.payload == {"model_name": "pneumonia_classifier", "model_version": 1,
                                "data_version": summary["data_version"]}


def test_lineage_both_ways(flow_run, paths, capsys):
    import pandas as pd

    from medops.cli import main

    summary = flow_run.result()
    assert main(["--project", str(paths.root), "lineage", "--json"]) == 0
    served = json.loads(capsys.readouterr().out)
    train = json.loads(paths.train_result.read_text())
    assert served["model_version"] == 1 and served["data_version"] == summary["data_version"]
    assert served["code_commit"] == train["code_commit"] and served["code_commit"]
    assert served["flow_run_id"] == str(flow_run.state_details.flow_run_id)
    assert served["gate"]["passed"] is True and served["params"]["train"]["epochs"] == 2
    # a patient of the dataset: the data version holding their images, and the model trained on it
    meta = pd.read_parquet(paths.metadata)
    patient = meta["patient_id"].iloc[0]
    assert main(["--project", str(paths.root), "lineage", "--patient", patient, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["data_versions"] == [{"data_version": summary["data_version"],
                                       "images": int((meta["patient_id"] == patient).sum())}]
    assert found["model_versions"] == [{"model_name": "pneumonia_classifier", "model_version": 1,
                                        "data_version": summary["data_version"]}]
    assert main(["--project", str(paths.root), "lineage", "--patient", "ANON-nobody", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data_versions"] == []


def test_every_stage_ran_through_dvc_and_is_up_to_date(flow_run, paths):
    from medops.ops import dvc
    assert (paths.root / "dvc.lock").is_file()
    lock = (paths.root / "dvc.lock").read_text()
    for stage in ("quality", "split", "train", "ood", "evaluate", "gate", "export"):
        assert f"  {stage}:" in lock
    assert "  ingest:" not in lock  # the export is no DVC dependency: ingest is the ingest flow's
    assert dvc.status(paths.root) == {}


def test_the_deidentified_dataset_is_versioned_pushed_and_recorded_with_the_model(flow_run, ingest_run, paths):
    import onnx
    import yaml

    from medops.ops import dvc
    version = dvc.data_version(paths.root, paths.ingested)
    dvcfile = yaml.safe_load((paths.root / "data" / "ingested.dvc").read_text())
    assert version == dvcfile["outs"][0]["md5"] == ingest_run.result()["data_version"]
    assert not (paths.root / "data" / "raw.dvc").exists() and not (paths.root / "data" / "export.dvc").exists()
    assert json.loads(paths.train_result.read_text())["data_version"] == version
    meta = {p.key: p.value for p in onnx.load(str(paths.onnx_model)).metadata_props}
    assert meta["data_version"] == version
    # pushed: the remote holds the directory manifest
    remote = paths.root / "dvc-remote"
    h = version.removesuffix(".dir")
    assert list(remote.rglob(h[2:] + ".dir")), f"{version} not in the local remote"


def test_no_phi_left_in_the_processed_metadata(flow_run, paths):
    import pandas as pd
    import pydicom

    meta = pd.read_parquet(paths.metadata)
    raw_files = sorted((paths.root / "data" / "export" / "dicom").rglob("*.dcm"))[:20]
    originals = [pydicom.dcmread(f, stop_before_pixels=True) for f in raw_files]
    text = meta.to_csv()
    for ds in originals:
        for value in (str(ds.PatientName), ds.PatientID, ds.AccessionNumber, ds.SOPInstanceUID,
                      ds.StudyInstanceUID):
            assert value not in text


def test_quality_checkpoint_wrote_data_docs(flow_run, paths):
    index = paths.quality_dir / "data_docs" / "index.html"
    assert index.is_file()
    assert "<html" in index.read_text().lower()


def test_metrics_and_plots_are_dvc_metrics(flow_run, paths):
    metrics = json.loads(paths.metrics.read_text())
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        assert 0.0 <= metrics[key] <= 1.0
    assert (paths.plots / "roc.csv").is_file() and (paths.plots / "confusion.csv").is_file()


def test_triton_answers_like_the_exported_model(flow_run, paths, params):
    import onnxruntime as ort
    import pandas as pd
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from medops.data import load_images

    meta = pd.read_parquet(paths.metadata).head(8)
    x = load_images(paths.ingested, meta)
    expected = ort.InferenceSession(str(paths.onnx_model)).run(None, {"image": x})[0]
    cfg = params.serving
    with grpcclient.InferenceServerClient(cfg.grpc_url) as client:
        inp = grpcclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer(cfg.model_name, [inp]).as_numpy("probability")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with httpclient.InferenceServerClient(cfg.http_url) as client:
        inp = httpclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer(cfg.model_name, [inp]).as_numpy("probability")
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_medops_predict_on_dicom_and_on_a_broken_file(flow_run, paths, tmp_path, capsys):
    from medops.cli import main
    from medops.errors import ExitCode

    dicom_file = next((paths.root / "data" / "export" / "dicom").rglob("*.dcm"))
    broken = tmp_path / "notes.dcm"
    broken.write_text("this is not DICOM")
    code = main(["--project", str(paths.root), "predict", "--json", str(dicom_file), str(broken)])
    out = json.loads(capsys.readouterr().out)  # one JSON object
    assert code == ExitCode.BAD_INPUT  # one file got no answer
    assert out["failed"] == 1
    ok, bad = out["predictions"]
    assert 0.0 <= ok["probability"] <= 1.0 and ok["label"] in ("normal", "pneumonia")
    assert ok["model_version"] == "1"
    assert bad["file"].endswith("notes.dcm") and bad["error"]


def test_the_run_is_recorded_in_prefect_with_a_task_per_stage(flow_run):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, FlowRunFilterId, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort, TaskRunSort

    run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.state_details.flow_run_id]))

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=run_filter, limit=200,
                                               sort=TaskRunSort.EXPECTED_START_TIME_ASC)
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(), flow_run_filter=run_filter,
                task_run_filter=TaskRunFilter(), sort=ArtifactSort.KEY_ASC, limit=200)
            return runs, artifacts

    runs, artifacts = asyncio.run(read())
    completed = {r.name for r in runs if r.state and r.state.is_completed()}
    for stage in ("check_data_version", "quality", "split", "train", "ood", "evaluate", "gate", "export", "deploy"):
        assert any(n == stage or n.startswith(stage + "-") for n in completed), \
            f"no completed task run for {stage}: {sorted(completed)}"
    keys = {a.key for a in artifacts}
    for stage in ("quality", "split", "train", "ood", "evaluate", "gate", "export"):
        assert f"stage-{stage}" in keys, f"no artifact for {stage}: {sorted(k for k in keys if k)}"
    assert "deployment" in keys


def test_a_stricter_gate_blocks_deployment_and_dvc_skips_training(flow_run, paths, params):
    import tritonclient.grpc as grpcclient

    from flows.training import training_pipeline

    model_mtime = paths.keras_model.stat().st_mtime
    state = training_pipeline(project_root=str(paths.root), min_auc=0.999, return_state=True)
    assert state.is_completed(), state.message
    gate = json.loads(paths.gate.read_text())
    assert gate["passed"] is False
    assert any("min_auc" in r and "fail" in r for r in gate["reasons"])
    assert paths.keras_model.stat().st_mtime == model_mtime  # DVC skipped train: only gate re-ran
    cfg = params.serving
    with grpcclient.InferenceServerClient(cfg.grpc_url) as client:
        ready = [v for v in ("1", "2") if client.is_model_ready(cfg.model_name, v)]
    assert ready == ["1"], "the blocked model must not be served"
    [rejected] = medops_events("medops.model.rejected")
    assert any("min_auc" in r for r in rejected.payload["reasons"])
    model_dir = cfg.repository_path(paths.root) / cfg.model_name
    assert sorted(p.name for p in model_dir.iterdir() if p.name.isdigit()) == ["1"]


def test_no_phi_canary_reaches_any_output(flow_run, ingest_run, paths):
    import asyncio

    import pandas as pd
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, FlowRunFilterId, TaskRunFilter
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import ArtifactSort, LogSort

    # the canary study was used (de-identified, not quarantined) and its broken copy quarantined
    # the operator's private report names it; the versioned quarantine list does not
    report = pd.read_csv(paths.ingest_report)
    assert report["path"].str.endswith(f"{CANARY_FOLDER}/cut_{CANARY_FILE}").any()
    assert list(pd.read_csv(paths.quarantine).columns) == ["file_id", "reason"]
    assert len(pd.read_parquet(paths.metadata)) == 3 * SUBSET + 1

    needles = [c.lower().encode() for c in canary_strings()]
    # everything versioned or published: the dataset, DVC's cache and remote, reports, models,
    # logs, Triton's repository, dvc.lock and the .dvc files (the export and the private ingest
    # folder .medops/ingest are neither)
    outputs = [paths.ingested, paths.reports, paths.models, paths.split.parent, paths.logs,
               paths.root / ".medops" / "triton" / "repository", paths.root / "dvc.lock",
               paths.root / ".medops" / "drift",  # the served images' drift log
               paths.root / ".dvc" / "cache", paths.root / "dvc-remote",
               *sorted((paths.root / "data").glob("*.dvc"))]
    searched = 0
    for top in outputs:
        for f in ([top] if top.is_file() else top.rglob("*")):
            if f.is_file():
                data = f.read_bytes().lower()  # the packs of de-identified files are stored uncompressed
                searched += 1 if f.suffix != ".zip" else len(zipfile.ZipFile(f).namelist())
                hits = [n.decode() for n in needles if n in data]
                assert not hits, f"PHI canary {hits} in {f.relative_to(paths.root)}"
    assert searched > 100

    run_ids = [flow_run.state_details.flow_run_id, ingest_run.state_details.flow_run_id]

    async def prefect_texts():
        from prefect.events.filters import EventFilter, EventNameFilter

        async with get_client() as client:
            run_filter = FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(), flow_run_filter=run_filter,
                task_run_filter=TaskRunFilter(), sort=ArtifactSort.KEY_ASC, limit=200)
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)),
                                          limit=200, offset=0, sort=LogSort.TIMESTAMP_ASC)
            runs = [await client.read_flow_run(r) for r in run_ids]
            events = await client.read_events(EventFilter(event=EventNameFilter(prefix=["medops."])),
                                              limit=50)
            return ([str(a.data) for a in artifacts] + [log.message for log in logs]
                    + [str(r.parameters) for r in runs]
                    + [e.model_dump_json() for e in events.events])

    texts = asyncio.run(prefect_texts())
    assert texts
    for text in texts:
        hits = [c for c in canary_strings() if c.lower() in text.lower()]
        assert not hits, f"PHI canary {hits} in a Prefect artifact, log, parameter or event"


def test_the_run_is_recorded_as_a_dvc_experiment_with_its_metrics(flow_run, paths):
    import csv
    import io

    from medops.ops import dvc
    name = flow_run.result()["experiment"]
    assert name, "the flow did not record the run as a DVC experiment"
    rows = list(csv.DictReader(io.StringIO(dvc.run_dvc(paths.root, "exp", "show", "--csv").stdout)))
    [row] = [r for r in rows if r.get("Experiment") == name]
    metrics = json.loads(paths.metrics.read_text())
    assert float(row["auc"]) == pytest.approx(metrics["auc"])
    assert row["train.epochs"] == "2" and row["gate.min_auc"] == "0.7"
