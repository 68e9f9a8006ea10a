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


def test_ingest_flow_versions_the_deidentified_dataset_and_a_rerun_changes_nothing(project, tmp_path):
    from flows.ingest import ingest_studies
    from medops.ops import dvc
    export = tmp_path / "hospital"
    synth.run(SynthConfig(max_images_per_split=4), source_npz=BUNDLED_DATASET, out_dir=export)
    grown_later = sorted((export / "dicom").iterdir())[-2:]  # two patients arrive later
    parked = tmp_path / "later"
    parked.mkdir()
    for p in grown_later:
        shutil.move(p, parked / p.name)
    manifest = str(export / "labels.csv")

    first = ingest_studies(str(export / "dicom"), manifest=manifest, project_root=str(project))
    assert first["changed"] and first["ingest"]["used"] == first["ingest"]["decoded"] > 0
    assert first["data_version"] == dvc.data_version(project, project / "data" / "deidentified")
    remote = project / "dvc-remote"
    assert list(remote.rglob(first["data_version"].removesuffix(".dir")[2:] + ".dir"))  # pushed
    # only de-identified data is versioned: no original PatientID in the tracked dataset
    import pydicom

    original = pydicom.dcmread(next((export / "dicom").rglob("*.dcm")), stop_before_pixels=True)
    tracked = b"".join(p.read_bytes() for p in (project / "data" / "deidentified").rglob("*") if p.is_file())
    assert original.PatientID.encode() not in tracked and str(original.PatientName).encode() not in tracked

    again = ingest_studies(str(export / "dicom"), manifest=manifest, project_root=str(project))
    assert again["changed"] is False and again["ingest"]["decoded"] == 0
    assert again["data_version"] == first["data_version"]

    for p in grown_later:
        shutil.move(parked / p.name, export / "dicom" / p.name)
    grown = ingest_studies(str(export / "dicom"), manifest=manifest, project_root=str(project))
    new_files = sum(1 for p in grown_later for _ in (export / "dicom" / p.name).rglob("*.dcm"))
    assert grown["changed"] and grown["ingest"]["decoded"] == new_files > 0
    assert grown["ingest"]["used"] == first["ingest"]["used"] + new_files
    assert grown["data_version"] != first["data_version"]

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
