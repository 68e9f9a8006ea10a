"""flows.monitor against a real Prefect server (the test harness): the drift report as artifacts,
and ``medops.drift.detected`` with the evidence when a test fires, not otherwise. Real data: the
bundled PneumoniaMNIST films recorded as the ensemble's recorder does (tests/unit/test_monitor.py)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_monitor import film_bytes, served_record  # noqa: E402
from test_flow_ingest import events_named  # noqa: E402

from medops.drift import RequestLog  # noqa: E402
from medops.paths import BUNDLED_DATASET  # noqa: E402

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def films():
    import numpy as np

    with np.load(BUNDLED_DATASET) as npz:  # as tests/unit/test_monitor.py's reference
        train, val = npz["train_images"], npz["val_images"][:500]
    train = train[np.random.default_rng(0).choice(len(train), 600, replace=False)]
    return {"reference": [served_record(film_bytes(x)) for x in train],
            "probabilities": [served_record(film_bytes(x))["probability"] for x in val[:300]],
            "recent": [served_record(film_bytes(x)) for x in val[300:500]],
            "inverted": [served_record(film_bytes(255 - x)) for x in val[:50]]}


def make_project(root: Path, repo_root: Path, films: dict, records: list[dict]) -> Path:
    root.mkdir()
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    (root / "models").mkdir()
    (root / "models" / "reference.json").write_text(json.dumps(
        {"features": films["reference"],
         "outputs": {"probability": films["probabilities"], "ood_score": None}}))
    RequestLog(root / ".medops" / "drift").append(records)
    return root


def test_the_flow_reports_and_announces_drift_only_when_a_test_fires(tmp_path, repo_root, films):
    from flows.events import DRIFT_DETECTED
    from flows.monitor import drift_monitor

    quiet = make_project(tmp_path / "quiet", repo_root, films, films["recent"])
    result = drift_monitor(project_root=str(quiet))
    assert result["drift"] is False and result["n"] == 200
    assert events_named(DRIFT_DETECTED, 1, timeout=5) == []

    shifted = make_project(tmp_path / "shifted", repo_root, films,
                           films["recent"][:150] + films["inverted"])
    result = drift_monitor(project_root=str(shifted))
    assert result["drift"] is True
    (event,) = events_named(DRIFT_DETECTED, 1)
    assert event.resource.id == "medops.model.pneumonia_classifier"
    fired = event.payload["fired"]
    assert fired and all(t["fired"] and t["p_adjusted"] < 0.01 for t in fired)
    assert {t["name"] for t in fired} == {t["name"] for t in result["tests"] if t["fired"]}
    assert event.payload["n"] == 200 and event.payload["correction"] == "holm"

    reports = artifacts("drift-report")
    assert len(reports) == 2 and {a["type"] for a in reports} == {"markdown"}
    latest = max(reports, key=lambda a: a["created"])
    assert "drift detected" in latest["data"] and "data:image/png;base64," in latest["data"]
    images = artifacts("drift-probability")
    assert images and images[0]["type"] == "image"
    assert images[0]["data"].startswith("data:image/png;base64,")


def artifacts(key: str) -> list[dict]:
    """The Prefect API's artifacts under ``key``."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", timeout=10,
                          json={"artifacts": {"key": {"any_": [key]}}, "limit": 50, "offset": 0,
                                "sort": "CREATED_DESC"})
    response.raise_for_status()
    return response.json()


def test_too_few_answers_skips_the_run(tmp_path, repo_root, films):
    from flows.monitor import drift_monitor

    project = make_project(tmp_path / "new", repo_root, films, films["recent"][:5])
    assert drift_monitor(project_root=str(project)) == {"drift": False, "skipped": True}
