"""flows.ingest against a real Prefect server, real DVC (git repo, local remote) and real DICOM."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from medops.config import SynthConfig
from medops.dicom import synth
from medops.paths import BUNDLED_DATASET

pytestmark = [pytest.mark.prefect, pytest.mark.dvc, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    monkeypatch.setenv("MEDOPS_DEID_KEY", "ingest-flow-test-key")
    return root


def events_named(name: str, expected: int, timeout: float = 30.0) -> list:
    """The Prefect API's events called ``name``, once it holds ``expected`` of them (the server
    stores events asynchronously) or the timeout passed."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=50)
            if len(page.events) >= expected or time.monotonic() > deadline:
                return page.events
            time.sleep(0.5)


# an export folder named as hospitals often do: patient name and record number
PHI_FOLDER = "Doe_John_MRN123"


def test_ingest_flow_versions_the_export_and_announces_each_new_version_once(project, tmp_path):
    from flows.ingest import DATASET_VERSIONED, ingest_studies
    from medops.ops import dvc

    export = project / "data" / "export"  # params.yaml's ingest.source
    synth.run(SynthConfig(max_images_per_split=4), source_npz=BUNDLED_DATASET, out_dir=export)
    grown_later = sorted((export / "dicom").iterdir())[-2:]  # two patients arrive later
    parked = tmp_path / "later"
    parked.mkdir()
    for p in grown_later:
        shutil.move(p, parked / p.name)
    (export / PHI_FOLDER).mkdir()
    (export / PHI_FOLDER / "Doe_John_scan.dcm").write_bytes(b"not a DICOM file")  # quarantined

    first = ingest_studies(project_root=str(project))
    assert first["changed"] and first["ingest"]["used"] == first["ingest"]["decoded"] - 1 > 0
    assert first["ingest"]["quarantined"] == 1  # the manifest (labels.csv) is labels, not a study
    dataset = project / "data" / "ingested"
    assert first["data_version"] == dvc.data_version(project, dataset)
    remote = project / "dvc-remote"
    assert list(remote.rglob(first["data_version"].removesuffix(".dir")[2:] + ".dir"))  # pushed
    # only de-identified data is versioned: no original PatientID, no export path
    import pydicom

    original = pydicom.dcmread(next((export / "dicom").rglob("*.dcm")), stop_before_pixels=True)
    tracked = b"".join(p.read_bytes() for p in dataset.rglob("*") if p.is_file())
    for phi in (original.PatientID, str(original.PatientName), PHI_FOLDER, "Doe_John", "PAT0000"):
        assert phi.encode() not in tracked, phi
    assert (dataset / "quarantine.csv").read_text().splitlines()[0] == "file_id,reason"
    # the operator still finds the file, in the private report
    assert f"{PHI_FOLDER}/Doe_John_scan.dcm" in (project / ".medops" / "ingest" / "quarantine.csv").read_text()

    again = ingest_studies(project_root=str(project))
    assert again["changed"] is False and again["ingest"]["decoded"] == 0
    assert again["data_version"] == first["data_version"]

    for p in grown_later:
        shutil.move(parked / p.name, export / "dicom" / p.name)
    # the new files are decoded on a Dask LocalCluster the run starts (the flow's cluster parameter)
    grown = ingest_studies(project_root=str(project), cluster="local")
    new_files = sum(1 for p in grown_later for _ in (export / "dicom" / p.name).rglob("*.dcm"))
    assert grown["changed"] and grown["ingest"]["used"] == first["ingest"]["used"] + new_files
    assert grown["data_version"] != first["data_version"]

    # one event per new data version, none for the unchanged rerun; counts only, no path
    events = events_named(DATASET_VERSIONED, expected=2)
    versions = sorted(e.payload["data_version"] for e in events)
    assert versions == sorted([first["data_version"], grown["data_version"]])
    grown_event = next(e for e in events if e.payload["data_version"] == grown["data_version"])
    assert grown_event.payload["previous_version"] == first["data_version"]
    assert grown_event.resource.id == f"medops.dataset.{grown['data_version']}"
    assert PHI_FOLDER not in str([e.model_dump(mode="json") for e in events])

    # what the run posted: a progress artifact that reached 100 %, and the summary as a table
    progress, summary = _artifact("ingest-progress"), _artifact("ingest-studies")
    assert progress["type"] == "progress" and float(progress["data"]) == 100.0
    assert progress["description"] == f"ingest: {grown['ingest']['files_seen']}/{grown['ingest']['files_seen']} files"
    assert summary["type"] == "table"
    assert {"field": "data version", "value": grown["data_version"]} in json.loads(summary["data"])


def _artifact(key: str) -> dict:
    """The newest artifact with ``key``, from the server's REST API (see test_flow_training)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    resp = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", timeout=10, json={
        "artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1, "offset": 0})
    resp.raise_for_status()
    return resp.json()[0]
