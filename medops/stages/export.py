"""export: convert the trained Keras model to ONNX for Triton's onnxruntime backend, and prove it.

The conversion is tf2onnx.convert.from_keras with input ``image`` (float32, (batch, S, S, 1)) and
output ``probability`` (float32, (batch, 1)). The exported model is then checked against Keras on
real validation images: if the largest absolute difference exceeds ``parity_atol`` the stage
fails with ExportParityError (a silently wrong serving model is the worst outcome). The data
version and training metadata are stored in the ONNX ``metadata_props``, and a few golden samples
(images and Keras outputs) are saved beside the model for serving smoke tests.

Inputs:
    model: ``models/model.keras``.
    ingested_dir, split: the data and ``split.csv``; parity and golden samples come from ``val``.
    train_result: ``models/train.json`` (data_version, params, input size).
Outputs:
    onnx_out: ``models/model.onnx``; ``golden.npz`` in the same folder (``images`` (n, S, S, 1),
        ``probabilities`` (n, 1) from Keras, ``labels`` (n,), ``sop_instance_uids`` (n,)).
    result_out: ``models/export.json``: parity max diff, sample count, input/output names and
        shapes, data_version, decision_threshold, sha256 of the ONNX file.
    The ONNX metadata_props hold data_version, model, input_size, train_params, val_auc and
    decision_threshold (the serving side reads the threshold from there or from export.json).
Params (``export`` section, ExportConfig):
    opset: ONNX opset; parity_atol: largest tolerated |keras - onnx| on the parity samples.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from medops.atomic import atomic_path, crash_point, write_bytes, write_text
from medops.config import ExportConfig
from medops.errors import ExportParityError, MedopsError
from medops.hashing import sha256_file
from medops.paths import read_json
from medops.serving.contract import INPUT_NAME, OUTPUT_NAME
from medops.serving.repository import GOLDEN_FILE
from medops.data import load_split_images


class TensorInfo(BaseModel):
    name: str
    shape: list[int | str]
    dtype: str


class ExportResult(BaseModel):
    onnx_path: str
    golden_path: str
    sha256: str
    opset: int
    data_version: str
    decision_threshold: float | None  # chosen on val in training; serving calls >= it positive
    parity_max_abs_diff: float
    parity_atol: float
    n_parity_samples: int
    n_golden: int
    input: TensorInfo
    output: TensorInfo


def convert_to_onnx(model: Any, input_size: int, opset: int, metadata: dict[str, str]) -> Any:
    """The Keras model as an ONNX ModelProto with input ``image`` and output ``probability``.

    The batch dimension is named ``batch`` (tf2onnx leaves an ``unk__N`` placeholder), and
    ``metadata`` is stored as the model's metadata_props.
    """
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, input_size, input_size, 1), tf.float32, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    graph = proto.graph
    if [i.name for i in graph.input] != [INPUT_NAME]:
        raise MedopsError(f"ONNX inputs are {[i.name for i in graph.input]}, expected [{INPUT_NAME!r}]")
    if len(graph.output) != 1:
        raise MedopsError(f"ONNX model has {len(graph.output)} outputs, expected 1")
    if graph.output[0].name != OUTPUT_NAME:
        # Rename the graph output and every consumer reference, so the contract name holds.
        old = graph.output[0].name
        for node in graph.node:
            node.output[:] = [OUTPUT_NAME if o == old else o for o in node.output]
            node.input[:] = [OUTPUT_NAME if i == old else i for i in node.input]
        graph.output[0].name = OUTPUT_NAME
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del proto.metadata_props[:]
    for key, val in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(val)
    return proto


def run_onnx(onnx_model: bytes | Path, images: np.ndarray) -> np.ndarray:
    """Run an ONNX model (bytes or path) on ``images`` with onnxruntime (CPU); returns (n, 1)."""
    import onnxruntime as ort

    source = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model
    try:
        session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for invalid graphs
        raise ExportParityError(f"the exported ONNX model does not load in onnxruntime: {exc}") from exc
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(images, dtype=np.float32)})[0]


def check_parity(keras_out: np.ndarray, onnx_out: np.ndarray, atol: float) -> float:
    """The largest |keras - onnx|; raises ExportParityError when it exceeds ``atol``."""
    keras_out = np.asarray(keras_out, dtype=np.float64)
    onnx_out = np.asarray(onnx_out, dtype=np.float64)
    if keras_out.shape != onnx_out.shape:
        raise ExportParityError(f"ONNX output shape {onnx_out.shape} != Keras output shape {keras_out.shape}")
    if not np.isfinite(onnx_out).all():
        raise ExportParityError(f"ONNX produced {int((~np.isfinite(onnx_out)).sum())} non-finite outputs")
    diff = np.abs(keras_out - onnx_out)
    worst = float(diff.max())
    if worst > atol:
        i = int(diff.reshape(len(diff), -1).max(axis=1).argmax())
        raise ExportParityError(
            f"export parity check failed: max |keras - onnx| = {worst:.3g} > parity_atol {atol:g} "
            f"on {len(diff)} samples ({int((diff > atol).sum())} over; worst sample {i}: "
            f"keras {keras_out.reshape(len(diff), -1)[i, 0]:.6f}, onnx {onnx_out.reshape(len(diff), -1)[i, 0]:.6f})"
        )
    return worst


def choose_golden(labels: np.ndarray, n_per_class: int) -> np.ndarray:
    """Indices of the first ``n_per_class`` images of each label (both classes, if present)."""
    picks = [np.nonzero(labels == c)[0][:n_per_class] for c in (0, 1)]
    return np.sort(np.concatenate(picks))


def _shape(value: Any) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def run(
    cfg: ExportConfig,
    *,
    model: Path,
    ingested_dir: Path,
    split: Path,
    train_result: Path,
    onnx_out: Path,
    result_out: Path,
    n_parity: int = 64,
    n_golden_per_class: int = 4,
) -> ExportResult:
    """Convert, write model.onnx, check parity on val images, write golden.npz and export.json."""
    import keras
    import onnx

    from medops.learn.inference import load_model

    record = read_json(train_result, "train result")
    data_version = str(record.get("data_version", "unknown"))
    keras_model = load_model(model)
    images, labels, rows = load_split_images(ingested_dir, split, "val")
    input_size = int(images.shape[1])
    metadata = {
        "data_version": data_version,
        "model": str(record.get("model", keras_model.name)),
        "input_size": str(input_size),
        "train_params": json.dumps(record.get("params", {}), sort_keys=True),
        "train_created": str(record.get("created", "")),
        "val_auc": str(record.get("val_auc", "")),
        "keras_version": keras.__version__,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if record.get("decision_threshold") is not None:
        metadata["decision_threshold"] = str(record["decision_threshold"])
    proto = convert_to_onnx(keras_model, input_size, cfg.opset, metadata)
    onnx.checker.check_model(proto)
    payload = proto.SerializeToString()

    # Parity before writing: a model that fails it never reaches models/model.onnx.
    sample = images[:n_parity]
    keras_probs = np.asarray(keras_model.predict(sample, batch_size=256, verbose=0), dtype=np.float32)
    worst = check_parity(keras_probs, run_onnx(payload, sample), cfg.parity_atol)

    onnx_out = Path(onnx_out)
    # model.onnx, golden.npz, then export.json (its sha256 ties them: deploy refuses a
    # model.onnx that export.json does not name, so a run killed in between deploys nothing)
    write_bytes(onnx_out, payload)
    crash_point("export.onnx")

    golden_idx = choose_golden(labels, n_golden_per_class)
    golden_path = onnx_out.parent / GOLDEN_FILE
    with atomic_path(golden_path) as tmp:
        np.savez(
            tmp,
            images=images[golden_idx],
            probabilities=np.asarray(keras_model.predict(images[golden_idx], verbose=0), dtype=np.float32),
            labels=labels[golden_idx].astype(np.int64),
            sop_instance_uids=rows["sop_instance_uid"].to_numpy()[golden_idx].astype(str),
        )
    graph = proto.graph
    result = ExportResult(
        onnx_path=str(onnx_out),
        golden_path=str(golden_path),
        sha256=sha256_file(onnx_out),
        opset=cfg.opset,
        data_version=data_version,
        decision_threshold=record.get("decision_threshold"),
        parity_max_abs_diff=worst,
        parity_atol=cfg.parity_atol,
        n_parity_samples=len(sample),
        n_golden=len(golden_idx),
        input=TensorInfo(name=graph.input[0].name, shape=_shape(graph.input[0]), dtype="float32"),
        output=TensorInfo(name=graph.output[0].name, shape=_shape(graph.output[0]), dtype="float32"),
    )
    write_text(result_out, result.model_dump_json(indent=2) + "\n")
    return result
