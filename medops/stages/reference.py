"""reference: what the served data should look like, for drift monitoring (``medops monitor``).

The same features the DICOM ensemble records per served image (``medops.drift``), computed over
the training split: header categories from each image's de-identified file (the fields the
monitor reads survive de-identification: Modality, Body Part, Manufacturer, Photometric
Interpretation, spacing, size, transfer syntax) and statistics of its prepared pixels (ingest's
arrays: the preprocessing the server runs). The answers the served model gives on the
validation split (``probability``, and ``ood_score`` when the exported model has that output)
come from the exported ONNX model itself, so they are the served model's, on images it was not
trained on.

Inputs:
    ingested_dir, split: the data and ``split.csv`` (train: features; val: answers).
    onnx: ``models/model.onnx`` (the exported, served model).
Outputs:
    out: ``models/reference.json``: ``features`` (one record per sampled train image, the
        recorder's fields), ``outputs`` (``probability`` and ``ood_score`` lists on val; null
        when the model has no such output), counts and the data version.
Params (``reference`` section, ReferenceConfig):
    max_images: train images sampled (seeded) for the features; seed.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from medops.atomic import write_text
from medops.config import ReferenceConfig
from medops.data import load_images, load_split_images, pack_path, select_split
from medops.drift import OUTPUT_FIELDS, header_features, image_features, read_header
from medops.errors import MedopsError


class ReferenceResult(BaseModel):
    reference_path: str
    n_features: int
    n_outputs: int
    outputs: list[str]  # the answers it holds (probability; ood_score where the model has it)


def train_features(ingested_dir: Path, split: Path, cfg: ReferenceConfig) -> list[dict[str, Any]]:
    """The recorder's features of (a seeded sample of) the training split's images."""
    rows = select_split(ingested_dir, split, "train")
    if len(rows) > cfg.max_images:
        pick = np.random.default_rng(cfg.seed).choice(len(rows), cfg.max_images, replace=False)
        rows = rows.iloc[np.sort(pick)].reset_index(drop=True)
    images = load_images(Path(ingested_dir), rows)
    records: list[dict[str, Any]] = [{} for _ in range(len(rows))]
    for shard, group in rows.groupby("shard"):  # each shard's pack opened once
        with zipfile.ZipFile(pack_path(Path(ingested_dir), int(shard))) as pack:
            for i, deid_path in zip(group.index, group["deid_path"]):
                record = header_features(read_header(pack.read(str(deid_path))))
                records[i] = record | image_features(images[i]) | {"error": None}
    return records


def model_outputs(onnx: Path, images: np.ndarray) -> dict[str, list[float] | None]:
    """The answers of the ONNX model on ``images``: each of OUTPUT_FIELDS it has, else None."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own untyped errors
        raise MedopsError(f"the exported model {onnx} does not load in onnxruntime: {exc}") from exc
    names = [o.name for o in session.get_outputs()]
    wanted = [n for n in OUTPUT_FIELDS if n in names]
    feed = session.get_inputs()[0].name
    out: dict[str, list[float]] = {n: [] for n in wanted}
    for start in range(0, len(images), 256):
        values = session.run(wanted, {feed: images[start:start + 256].astype(np.float32)})
        for name, value in zip(wanted, values):
            out[name].extend(np.asarray(value, dtype=np.float64).reshape(-1).round(6).tolist())
    return {n: out.get(n) for n in OUTPUT_FIELDS}


def run(cfg: ReferenceConfig, *, ingested_dir: Path, split: Path, onnx: Path,
        out: Path) -> ReferenceResult:
    """Write the drift reference (see the module docstring)."""
    if not Path(onnx).is_file():
        raise MedopsError(f"no exported model at {onnx}: run the export stage first")
    features = train_features(Path(ingested_dir), Path(split), cfg)
    images, _, _ = load_split_images(Path(ingested_dir), Path(split), "val")
    outputs = model_outputs(Path(onnx), images)
    record = {"features": features, "outputs": outputs, "n_features": len(features),
              "n_outputs": len(images)}
    write_text(Path(out), json.dumps(record, separators=(",", ":")) + "\n")
    return ReferenceResult(reference_path=str(out), n_features=len(features),
                           n_outputs=len(images), outputs=[k for k, v in outputs.items() if v])
