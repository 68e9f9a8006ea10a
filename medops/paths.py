"""The one definition of where medops keeps things, relative to a project root.

Every stage, the CLI, the flows and dvc.yaml use these locations; tests point ``ProjectPaths`` at a
temporary copy of the project.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medops.errors import MedopsError

PACKAGE_ROOT = Path(__file__).resolve().parent
BUNDLED_DATASET = PACKAGE_ROOT.parent / "datasets" / "pneumoniamnist" / "pneumoniamnist.npz"


def find_project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` with params.yaml (``start`` itself if none has one).

    ``start`` defaults to $MEDOPS_ROOT, then the current folder; an explicit ``start`` wins. A
    command that DVC runs as a dvc.yaml stage (DVC sets DVC_STAGE) starts from the current folder,
    where DVC runs it: the project being reproduced, which for ``dvc exp run --queue`` is a
    temporary copy that no MEDOPS_ROOT names (and DVC_ROOT names the original there).
    """
    if start is None:
        env = None if os.environ.get("DVC_STAGE") else os.environ.get("MEDOPS_ROOT")
        start = Path(env) if env else Path.cwd()
    here = Path(start).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "params.yaml").is_file():
            return candidate
    return here


def read_json(path: Path | str, what: str) -> dict[str, Any]:
    """The JSON object a stage wrote at ``path`` (``what``, e.g. "the train result", names it in
    errors).

    Raises:
        MedopsError: no file there (its stage has not run), or it is not a JSON object.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise MedopsError(f"no {what} at {path}: run the stage that writes it first") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MedopsError(f"cannot read {what} at {path}: {exc}") from None
    if not isinstance(record, dict):
        raise MedopsError(f"{what} at {path} is not a JSON object")
    return record


@dataclass(frozen=True)
class ProjectPaths:
    root: Path

    @classmethod
    def discover(cls, start: Path | None = None) -> "ProjectPaths":
        return cls(find_project_root(start))

    # configuration
    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    # the hospital's export (synthetic PHI in the demo): params ingest.source, read only, never
    # versioned; its studies and its label manifests (*.csv) arrive there
    def export(self, source: str | Path = "data/export") -> Path:
        source = Path(source).expanduser()
        return source if source.is_absolute() else self.root / source

    # the de-identified dataset that DVC versions (data/ingested.dvc): de-identified DICOM, array
    # shards, metadata table, and a quarantine list that names no file by its path
    @property
    def ingested(self) -> Path:
        return self.root / "data" / "ingested"

    # the ingest stage's own output, private: the same dataset plus what names the export's files
    # by their paths (its incremental index; the quarantine report an operator reads)
    @property
    def ingest_work(self) -> Path:
        return self.state / "ingest"

    @property
    def ingest_report(self) -> Path:
        """The operator's quarantine report: path, reason, detail (never versioned)."""
        return self.ingest_work / "quarantine.csv"

    @property
    def metadata(self) -> Path:
        return self.ingested / "metadata.parquet"

    @property
    def quarantine(self) -> Path:
        return self.ingested / "quarantine.csv"

    @property
    def split(self) -> Path:
        return self.root / "data" / "split" / "split.csv"

    # reports
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def quality_dir(self) -> Path:
        """The quality report (result.json) and the Data Docs (reports/quality/data_docs/index.html)
        of the Great Expectations project in ``gx/``."""
        return self.reports / "quality"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def explain_dir(self) -> Path:
        """Grad-CAM heatmaps over a sample of the test split (PNG)."""
        return self.reports / "explain"

    @property
    def gate(self) -> Path:
        return self.reports / "gate.json"

    # models
    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def keras_model(self) -> Path:
        return self.models / "model.keras"

    @property
    def train_result(self) -> Path:
        return self.models / "train.json"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard logs, one folder per training run, kept across runs (a persistent DVC
        output): `tensorboard --logdir models/tensorboard` shows every run side by side."""
        return self.models / "tensorboard"

    @property
    def dvclive(self) -> Path:
        """DVCLive's per-epoch curves of the last training run (the train stage's metrics and
        plots in dvc.yaml: `dvc plots show`, `dvc exp show`)."""
        return self.root / "dvclive"

    @property
    def train_backup(self) -> Path:
        """Per-epoch backups of a training run in progress, from which a killed run resumes
        (medops.learn.resume); deleted when the run finishes. Never versioned."""
        return self.state / "train-backup"

    @property
    def ood_dir(self) -> Path:
        """The OOD guard fitted by the ood stage (autoencoder.keras, detector.npz, ood.json)."""
        return self.models / "ood"

    @property
    def onnx_model(self) -> Path:
        return self.models / "model.onnx"

    @property
    def export_result(self) -> Path:
        return self.models / "export.json"

    @property
    def drift_reference(self) -> Path:
        """What served images should look like (the reference stage; ``medops monitor``)."""
        return self.models / "reference.json"

    # runtime state of servers started by medops (pids, logs); never versioned
    @property
    def state(self) -> Path:
        return self.root / ".medops"

    @property
    def run_dir(self) -> Path:
        return self.state / "run"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    def stage_result(self, stage: str) -> Path:
        """JSON result every stage writes, read by the Prefect flow to post as an artifact."""
        return self.reports / "stages" / f"{stage}.json"
