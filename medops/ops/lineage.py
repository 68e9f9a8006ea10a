"""lineage: where a served model came from, and which data versions and models hold a patient.

Both directions come from records medops writes anyway, not from a database of its own:

- **A model version**: when deploy serves a version, :func:`record_deployment` keeps what it was
  made from in ``.medops/lineage/<model>/<version>.json``: the data version, the code commit and
  params of its training (``models/train.json``), the gate decision (``reports/gate.json``) and
  the Prefect flow run that deployed it (None from the CLI). Triton's repository says which
  version is served.
- **A patient** (by the pseudonymous patient ID, as it appears in the dataset): every data version
  DVC holds in its cache (each ``dvc add data/ingested`` left a ``.dir`` manifest there) whose
  ``metadata.parquet`` lists the patient, and every recorded model version trained on one of
  them: what a hospital needs to answer an erasure request.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medops.errors import MedopsError
from medops.paths import ProjectPaths


def _lineage_dir(paths: ProjectPaths, model_name: str) -> Path:
    return paths.state / "lineage" / model_name


def record_deployment(paths: ProjectPaths, deployed: dict[str, Any], *,
                      flow_run_id: str | None = None) -> Path:
    """Keep the lineage of the version ``deployed`` (a DeployResult as a dict) just served."""
    train = _read(paths.train_result)
    gate = _read(paths.gate)
    record = {
        "model_name": deployed["model_name"],
        "model_version": deployed["version"],
        "data_version": deployed["data_version"],
        "code_commit": train.get("code_commit"),
        "model": train.get("model"),
        "params": train.get("params", {}),
        "trained": train.get("created"),
        "quality": {k: gate.get("metrics", {}).get(k) for k in ("auc", "accuracy", "sensitivity",
                                                                "specificity")},
        "gate": {"passed": gate.get("passed"), "reasons": gate.get("reasons", [])},
        "flow_run_id": flow_run_id,
        "onnx_sha256": deployed.get("sha256"),
        "deployed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out = _lineage_dir(paths, deployed["model_name"]) / f"{deployed['version']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def model_lineage(paths: ProjectPaths, repository: Path, model_name: str,
                  version: int | None = None) -> dict[str, Any]:
    """The lineage of ``version`` (default: the one Triton serves).

    Raises:
        MedopsError: nothing is served, or the version has no lineage record.
    """
    from medops.serving.repository import served_version

    version = served_version(repository, model_name) if version is None else version
    if version is None:
        raise MedopsError(f"no version of {model_name} is served from {repository}")
    record = _read(_lineage_dir(paths, model_name) / f"{version}.json")
    if not record:
        raise MedopsError(f"{model_name} version {version} has no lineage record in "
                          f"{_lineage_dir(paths, model_name)} (deployed before medops kept them?)")
    return record


def _cache_file(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def dataset_versions(paths: ProjectPaths) -> dict[str, Path]:
    """Every version of the dataset DVC's cache holds: data version -> its metadata.parquet."""
    cache = paths.root / ".dvc" / "cache"
    found: dict[str, Path] = {}
    for manifest in sorted((cache / "files" / "md5").glob("*/*.dir")):
        try:
            entries = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        meta = next((e for e in entries if isinstance(e, dict) and e.get("relpath") == "metadata.parquet"), None)
        if meta and _cache_file(cache, meta["md5"]).is_file():
            found[manifest.parent.name + manifest.name] = _cache_file(cache, meta["md5"])
    return found


def patient_lineage(paths: ProjectPaths, patient_id: str) -> dict[str, Any]:
    """The data versions whose dataset holds ``patient_id`` (with how many images) and every
    recorded model version trained on one of them."""
    import pyarrow.parquet as pq

    versions: dict[str, int] = {}
    for version, metadata in dataset_versions(paths).items():
        ids = pq.read_table(metadata, columns=["patient_id"]).column("patient_id").to_pylist()
        n = sum(1 for i in ids if i == patient_id)
        if n:
            versions[version] = n
    models = []
    for record_file in sorted((paths.state / "lineage").glob("*/*.json")):
        record = _read(record_file)
        if record.get("data_version") in versions:
            models.append({"model_name": record["model_name"], "model_version": record["model_version"],
                           "data_version": record["data_version"]})
    return {"patient_id": patient_id,
            "data_versions": [{"data_version": v, "images": n} for v, n in sorted(versions.items())],
            "model_versions": models}
