"""export: convert the trained Keras model to ONNX for Triton's onnxruntime backend, and prove it.

The conversion is tf2onnx.convert.from_keras with input ``image`` (float32, (batch, S, S, 1)) and
output ``probability`` (float32, (batch, 1)); with the ood stage's guard (``models/ood``), one graph
answers also ``ood_score`` (float32, (batch, 1)) and ``in_distribution`` (bool, (batch, 1)), so the
classifier and its detector are one versioned file: a rollout or rollback moves both. The guard's
outputs are checked against a reference computed apart (Keras networks, float64 numpy arithmetic)
on val images and corrupted copies of them (``ood_parity_atol``). The exported model is then checked against Keras on
real validation images: if the largest absolute difference exceeds ``parity_atol`` the stage
fails with ExportParityError (a silently wrong serving model is the worst outcome). The data
version and training metadata are stored in the ONNX ``metadata_props``, and a few golden samples
(images and Keras outputs) are saved beside the model for serving smoke tests.

Inputs:
    model: ``models/model.keras``.
    ingested_dir, split: the data and ``split.csv``; parity and golden samples come from ``val``.
    ood_dir: ``models/ood`` (autoencoder.keras, detector.npz, ood.json from the ood stage).
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
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel

from medops.atomic import atomic_path, crash_point, write_bytes, write_text
from medops.config import ExportConfig
from medops.errors import ExportParityError, MedopsError
from medops.hashing import sha256_file
from medops.paths import read_json
from medops.serving.contract import GUARDED_OUTPUTS as OUTPUT_NAMES
from medops.serving.contract import INPUT_NAME, OUTPUT_NAME
from medops.serving.repository import GOLDEN_FILE
from medops.data import load_split_images


class TensorInfo(BaseModel):
    name: str
    shape: list[int | str]
    dtype: str


class GuardInfo(BaseModel):
    """The OOD guard exported in the same graph (medops.learn.ood), and its parity."""

    threshold: float                  # of the combined standardized score (ood_score = it / this)
    false_alarm_rate_target: float
    val_false_alarm_rate: float       # the ood stage's out-of-sample figure the gate checks
    parity_max_abs_diff: float        # |reference - onnx| of ood_score
    parity_atol: float
    n_parity_samples: int             # val images and corrupted copies of them


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
    output: TensorInfo                # the first output, probability
    outputs: list[TensorInfo] = []    # every output (probability[, ood_score, in_distribution])
    ood: GuardInfo | None = None    # the OOD guard in the same graph; None: exported without


def convert_to_onnx(model: Any, input_size: int, opset: int, metadata: dict[str, str],
                    output_names: tuple[str, ...] = (OUTPUT_NAME,)) -> Any:
    """The Keras model as an ONNX ModelProto with input ``image`` and outputs ``output_names``
    (the model's outputs, in order: ``probability``, and for a guarded model ``ood_score`` and
    ``in_distribution``).

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
    if len(graph.output) != len(output_names):
        raise MedopsError(f"ONNX model has {len(graph.output)} outputs, expected {len(output_names)}")
    for value, name in zip(graph.output, output_names):
        if value.name != name:
            # Rename the graph output and every consumer reference, so the contract name holds.
            old = value.name
            for node in graph.node:
                node.output[:] = [name if o == old else o for o in node.output]
                node.input[:] = [name if i == old else i for i in node.input]
            value.name = name
    for value in (graph.input[0], *graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del proto.metadata_props[:]
    for key, val in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(val)
    return proto


def run_onnx(onnx_model: bytes | Path, images: np.ndarray, outputs: tuple[str, ...] | None = None):
    """Run an ONNX model (bytes or path) on ``images`` with onnxruntime (CPU); returns the
    ``probability`` (n, 1), or the list of ``outputs`` when given."""
    import onnxruntime as ort

    source = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model
    try:
        session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for invalid graphs
        raise ExportParityError(f"the exported ONNX model does not load in onnxruntime: {exc}") from exc
    feed = {INPUT_NAME: np.asarray(images, dtype=np.float32)}
    if outputs is not None:
        return session.run(list(outputs), feed)
    return session.run([OUTPUT_NAME], feed)[0]


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


_DTYPES = {1: "float32", 9: "bool"}  # onnx.TensorProto element types


def _shape(value: Any) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


class _Guard(NamedTuple):
    autoencoder: Any
    detector: Any
    record: dict[str, Any]


def load_guard(ood_dir: Path | None) -> _Guard | None:
    """The ood stage's autoencoder, detector and record in ``ood_dir``; None without a guard."""
    if ood_dir is None:
        return None
    from medops.learn.inference import load_model
    from medops.learn.ood import Detector

    ood_dir = Path(ood_dir)
    if not (ood_dir / "detector.npz").is_file():
        raise MedopsError(f"no OOD detector in {ood_dir}: run the ood stage first")
    return _Guard(load_model(ood_dir / "autoencoder.keras"), Detector.load(ood_dir / "detector.npz"),
                  read_json(ood_dir / "ood.json", "ood result"))


def check_guard_parity(cfg: ExportConfig, reference: tuple, onnx_out: list) -> float:
    """ood_score within ``ood_parity_atol`` of the reference; in_distribution exactly
    ``ood_score <= 1`` of the graph's own score, and the reference's wherever the reference is
    not within the tolerance of the threshold. Returns the largest ood_score difference."""
    _, ref_score, ref_in = reference
    _, score, inside = onnx_out
    worst = check_parity(ref_score, score, cfg.ood_parity_atol)
    inside = np.asarray(inside).astype(bool)
    if inside.dtype != bool or not np.array_equal(inside, np.asarray(score) <= 1.0):
        raise ExportParityError("exported in_distribution is not ood_score <= 1")
    clear = np.abs(ref_score - 1.0) > cfg.ood_parity_atol
    if np.any(inside[clear] != ref_in[clear]):
        raise ExportParityError(f"exported in_distribution differs from the reference on "
                                f"{int(np.sum(inside[clear] != ref_in[clear]))} images")
    return worst


def _parity_images(images: np.ndarray, n_parity: int, guard: _Guard | None) -> np.ndarray:
    """Val images, and with a guard also corrupted copies (scores far above the threshold)."""
    sample = images[:n_parity]
    if guard is None:
        return sample
    from medops.learn.ood import CORRUPTIONS, corrupt

    return np.concatenate([sample, *(corrupt(sample[:8], kind) for kind in CORRUPTIONS)])


def _convert_checked(cfg: ExportConfig, keras_model: Any, guard: _Guard | None, input_size: int,
                     metadata: dict[str, str], sample: np.ndarray) -> tuple[bytes, float, GuardInfo | None]:
    """Convert (the guarded model when there is a guard), check parity; the ONNX bytes, the
    probability parity and the guard's record."""
    import onnx

    if guard is None:
        proto = convert_to_onnx(keras_model, input_size, cfg.opset, metadata)
        onnx.checker.check_model(proto)
        payload = proto.SerializeToString()
        keras_probs = np.asarray(keras_model.predict(sample, batch_size=256, verbose=0), dtype=np.float32)
        return payload, check_parity(keras_probs, run_onnx(payload, sample), cfg.parity_atol), None
    from medops.learn.ood import build_guarded_model, reference_outputs

    det = guard.detector
    metadata = metadata | {"ood_threshold": repr(det.threshold),
                           "ood_false_alarm_rate": str(guard.record.get("false_alarm_rate_target", "")),
                           "ood_detectors": ",".join(guard.record.get("detectors", []))}
    guarded = build_guarded_model(keras_model, guard.autoencoder, det)
    proto = convert_to_onnx(guarded, input_size, cfg.opset, metadata, OUTPUT_NAMES)
    onnx.checker.check_model(proto)
    payload = proto.SerializeToString()
    reference = reference_outputs(keras_model, guard.autoencoder, det, sample)
    got = run_onnx(payload, sample, OUTPUT_NAMES)
    worst = check_parity(reference[0], got[0], cfg.parity_atol)
    info = GuardInfo(threshold=det.threshold,
                     false_alarm_rate_target=float(guard.record["false_alarm_rate_target"]),
                     val_false_alarm_rate=float(guard.record["val_false_alarm_rate"]),
                     parity_max_abs_diff=check_guard_parity(cfg, reference, got),
                     parity_atol=cfg.ood_parity_atol, n_parity_samples=len(sample))
    return payload, worst, info


def write_golden(path: Path, keras_model: Any, guard: _Guard | None, images: np.ndarray,
                 labels: np.ndarray, uids: np.ndarray) -> None:
    """golden.npz: images, Keras probabilities, labels, uids; with a guard also the reference
    ``ood_scores`` and ``in_distribution``, and two inverted images among them (so the served
    guard is seen to say no as well as yes)."""
    extra: dict[str, np.ndarray] = {}
    if guard is not None:
        from medops.learn.ood import corrupt, reference_outputs

        images = np.concatenate([images, corrupt(images[:2], "inverted")])
        labels, uids = np.concatenate([labels, labels[:2]]), np.concatenate([uids, uids[:2]])
        probs, scores, inside = reference_outputs(keras_model, guard.autoencoder, guard.detector, images)
        extra = {"ood_scores": scores.astype(np.float32), "in_distribution": inside}
    else:
        probs = np.asarray(keras_model.predict(images, verbose=0), dtype=np.float32)
    with atomic_path(path) as tmp:
        np.savez(tmp, images=images, probabilities=probs, labels=labels.astype(np.int64),
                 sop_instance_uids=uids.astype(str), **extra)


def run(
    cfg: ExportConfig,
    *,
    model: Path,
    ingested_dir: Path,
    split: Path,
    train_result: Path,
    onnx_out: Path,
    result_out: Path,
    ood_dir: Path | None = None,
    n_parity: int = 64,
    n_golden_per_class: int = 4,
) -> ExportResult:
    """Convert, write model.onnx, check parity on val images, write golden.npz and export.json.

    ``ood_dir``: the ood stage's output; the ONNX graph then answers ``probability``,
    ``ood_score`` and ``in_distribution`` (None: ``probability`` only, as before the guard).
    """
    import keras

    from medops.learn.inference import load_model

    record = read_json(train_result, "train result")
    data_version = str(record.get("data_version", "unknown"))
    keras_model = load_model(model)
    guard = load_guard(ood_dir)
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
    # Parity before writing: a model that fails it never reaches models/model.onnx.
    sample = _parity_images(images, n_parity, guard)
    payload, worst, guard_info = _convert_checked(cfg, keras_model, guard, input_size, metadata, sample)

    onnx_out = Path(onnx_out)
    # model.onnx, golden.npz, then export.json (its sha256 ties them: deploy refuses a
    # model.onnx that export.json does not name, so a run killed in between deploys nothing)
    write_bytes(onnx_out, payload)
    crash_point("export.onnx")

    golden_idx = choose_golden(labels, n_golden_per_class)
    golden_path = onnx_out.parent / GOLDEN_FILE
    write_golden(golden_path, keras_model, guard, images[golden_idx], labels[golden_idx],
                 rows["sop_instance_uid"].to_numpy()[golden_idx])
    import onnx

    graph = onnx.load_from_string(payload).graph
    outputs = [TensorInfo(name=o.name, shape=_shape(o), dtype=_DTYPES.get(o.type.tensor_type.elem_type, "?"))
               for o in graph.output]
    result = ExportResult(
        onnx_path=str(onnx_out), golden_path=str(golden_path), sha256=sha256_file(onnx_out),
        opset=cfg.opset, data_version=data_version,
        decision_threshold=record.get("decision_threshold"),
        parity_max_abs_diff=worst, parity_atol=cfg.parity_atol,
        n_parity_samples=min(n_parity, len(images)),  # val images (the guard adds corrupted copies)
        n_golden=len(np.load(golden_path)["labels"]),
        input=TensorInfo(name=graph.input[0].name, shape=_shape(graph.input[0]), dtype="float32"),
        output=outputs[0], outputs=outputs, ood=guard_info,
    )
    write_text(result_out, result.model_dump_json(indent=2) + "\n")
    return result
