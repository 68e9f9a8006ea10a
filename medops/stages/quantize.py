"""quantize: an optional INT8 copy of the exported model, evaluated beside FP32; the gate decides.

onnxruntime's static quantization (``quantize_static``, QDQ format: QuantizeLinear/DequantizeLinear
pairs around int8 weights and activations, which onnxruntime's CPU kernels and TensorRT both run),
calibrated on train images only (a seeded sample, fed by a CalibrationDataReader). Only the
classifier's part of the graph is quantised (the nodes ``probability`` depends on); the OOD
guard's own nodes (autoencoder, Mahalanobis distance) stay in float. Its penultimate features
come from the quantised classifier, so the guard's answers are checked too: ``in_distribution``
must agree with FP32's on the test split and on corrupted copies of it (``medops.learn.ood``).

Both models are then evaluated on the test split with onnxruntime, at the decision threshold the
evaluate stage uses (``resolve_threshold``), by ``medops.metrics.compute_metrics``: the function
evaluate's AUC and accuracy come from. And they are timed side by side: the same batch, the same
threads, FP32 and INT8 interleaved (the order alternating) for ``bench_repeats`` rounds; each
round's speedup is FP32 time / INT8 time, and the gate reads their median. Nothing is decided
here: ``medops.stages.gate.judge_int8`` serves INT8 only within ``gate.int8_*`` and writes why.

Inputs:
    onnx, export_result: ``models/model.onnx`` and ``models/export.json`` (the FP32 export).
    train_result: ``models/train.json`` (the decision threshold chosen on val).
    ingested_dir, split: the data; ``train`` rows calibrate, ``test`` rows evaluate.
Outputs (``out_dir``, ``models/int8``): ``quantize.json`` always (``enabled: false`` when off);
    when on also ``model.onnx`` (INT8) and ``golden.npz`` (export's golden images, the INT8
    model's outputs: what a server serving it must reproduce).
Params: ``quantize`` (QuantizeConfig); ``evaluate`` (the threshold rule).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from pydantic import BaseModel

from medops.atomic import atomic_path, write_bytes, write_text
from medops.config import EvaluateConfig, QuantizeConfig
from medops.data import load_split_images
from medops.errors import MedopsError, first_line
from medops.hashing import sha256_file
from medops.learn.inference import resolve_threshold
from medops.metrics import compute_metrics
from medops.paths import read_json
from medops.serving.contract import GUARDED_OUTPUTS, INPUT_NAME, OUTPUT_NAME
from medops.serving.repository import GOLDEN_FILE

RECORD = "quantize.json"
MODEL = "model.onnx"


class QuantizeResult(BaseModel):
    enabled: bool
    source_sha256: str | None = None   # the FP32 export it was made from (export.json's sha256)
    sha256: str | None = None          # of out_dir/model.onnx
    model: str | None = None           # file names inside out_dir
    golden: str | None = None
    golden_atol: float | None = None
    calibration: dict[str, Any] = {}
    quantized_nodes: int = 0
    float_nodes: int = 0               # the guard's own nodes, left in float
    threshold: float | None = None
    threshold_source: str | None = None
    fp32: dict[str, float] = {}        # test split: auc, accuracy, sensitivity, specificity, n
    int8: dict[str, float] = {}
    delta_auc: float | None = None     # int8 - fp32
    delta_accuracy: float | None = None
    ood: dict[str, Any] = {}           # guarded, agreement, n, max_abs_score_diff
    speed: dict[str, Any] = {}         # batch, threads, repeats, runs, per-round speedups, median


class _Reader(CalibrationDataReader):
    """onnxruntime's CalibrationDataReader over ``images`` in batches."""

    def __init__(self, images: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([{INPUT_NAME: images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # not needed by a single pass; onnxruntime may call it
        pass


def classifier_nodes(model: Any) -> tuple[list[str], list[str]]:
    """``(nodes probability depends on, the others)`` of an ONNX ModelProto, by node name."""
    producer = {out: node for node in model.graph.node for out in node.output}
    wanted, todo = set(), [OUTPUT_NAME]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in wanted:
            continue
        wanted.add(node.name)
        todo.extend(node.input)
    names = [n.name for n in model.graph.node]
    return [n for n in names if n in wanted], [n for n in names if n not in wanted]


def quantize_model(fp32: Path, out: Path, images: np.ndarray, cfg: QuantizeConfig) -> tuple[int, int]:
    """Write the QDQ INT8 model of ``fp32`` to ``out``, calibrated on ``images``; returns the
    number of classifier nodes offered for quantisation and of guard nodes kept in float."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(fp32))
    for node_no, node in enumerate(model.graph.node):  # quantize_static selects nodes by name
        node.name = node.name or f"node_{node_no}"
    keep, rest = classifier_nodes(model)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
    with tempfile.TemporaryDirectory(prefix="medops-quantize-") as tmp:
        named = Path(tmp) / "fp32.onnx"
        onnx.save(model, str(named))
        try:
            quantize_static(str(named), str(Path(tmp) / MODEL), _Reader(images),
                            quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method, nodes_to_quantize=keep)
        except Exception as exc:  # onnxruntime's own untyped errors
            raise MedopsError(f"static quantisation of {fp32} failed: {first_line(exc)}") from None
        write_bytes(out, (Path(tmp) / MODEL).read_bytes())
    return len(keep), len(rest)


def session(path: Path, threads: int = 0) -> Any:
    """An onnxruntime CPU session; ``threads`` intra-op threads (0: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs_of(sess: Any, images: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    """Every output of ``sess`` on ``images`` (probability first), concatenated over batches."""
    names = [o.name for o in sess.get_outputs()]
    parts = [sess.run(names, {INPUT_NAME: images[i:i + batch]}) for i in range(0, len(images), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]


def compare_guard(fp32: list[np.ndarray], int8: list[np.ndarray]) -> dict[str, Any]:
    """How far the INT8 graph's guard answers from FP32's (in_distribution agreement)."""
    if len(fp32) < len(GUARDED_OUTPUTS):
        return {"guarded": False}
    same = np.asarray(fp32[2]).astype(bool) == np.asarray(int8[2]).astype(bool)
    # as export's parity check: the graph's in_distribution is its own ood_score <= 1
    consistent = np.array_equal(np.asarray(int8[2]).astype(bool), np.asarray(int8[1]) <= 1.0)
    return {"guarded": True, "agreement": float(same.mean()), "n": int(same.size),
            "consistent": bool(consistent),
            "max_abs_score_diff": float(np.max(np.abs(fp32[1] - int8[1])))}


def measure_speed(fp32: Path, int8: Path, images: np.ndarray, cfg: QuantizeConfig) -> dict[str, Any]:
    """FP32 and INT8 timed side by side: one batch of ``bench_batch`` test images, the same
    ``bench_threads``, interleaved rounds (the order alternating); per round FP32 / INT8."""
    reps = int(np.ceil(cfg.bench_batch / len(images)))
    batch = {INPUT_NAME: np.ascontiguousarray(np.tile(images, (reps, 1, 1, 1))[:cfg.bench_batch])}
    sessions = {"fp32": session(fp32, cfg.bench_threads), "int8": session(int8, cfg.bench_threads)}
    for sess in sessions.values():  # warm-up
        for _ in range(2):
            sess.run(None, batch)
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for round_no in range(cfg.bench_repeats):
        for name in (("fp32", "int8") if round_no % 2 == 0 else ("int8", "fp32")):
            start = time.perf_counter()
            for _ in range(cfg.bench_runs):
                sessions[name].run(None, batch)
            times[name].append((time.perf_counter() - start) / cfg.bench_runs)
    speedups = [f / i for f, i in zip(times["fp32"], times["int8"])]
    return {"batch": cfg.bench_batch, "threads": cfg.bench_threads, "repeats": cfg.bench_repeats,
            "runs": cfg.bench_runs, "fp32_ms": float(np.median(times["fp32"]) * 1e3),
            "int8_ms": float(np.median(times["int8"]) * 1e3),
            "speedups": [round(s, 4) for s in speedups], "median_speedup": float(np.median(speedups))}


def _quality(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    m = compute_metrics(labels, np.asarray(probs, dtype=np.float64).reshape(-1), threshold)
    return {k: float(m[k]) for k in ("auc", "accuracy", "sensitivity", "specificity", "n")}


def _calibration_images(cfg: QuantizeConfig, ingested_dir: Path, split: Path) -> np.ndarray:
    images, _, _ = load_split_images(ingested_dir, split, "train")
    if not len(images):
        raise MedopsError("quantize: the train split holds no images to calibrate on")
    pick = np.random.default_rng(cfg.seed).permutation(len(images))[:cfg.calibration_images]
    return np.ascontiguousarray(images[np.sort(pick)], dtype=np.float32)


def write_golden(fp32_golden: Path, int8: Path, out: Path) -> None:
    """Export's golden images with the INT8 model's own outputs (what a server must reproduce)."""
    with np.load(fp32_golden) as data:
        kept = {k: data[k] for k in data.files}
    outs = outputs_of(session(int8), np.asarray(kept["images"], dtype=np.float32))
    kept["probabilities"] = outs[0].astype(np.float32)
    if len(outs) >= len(GUARDED_OUTPUTS):
        kept["ood_scores"], kept["in_distribution"] = outs[1].astype(np.float32), outs[2].astype(bool)
    with atomic_path(out) as tmp:
        np.savez(tmp, **kept)


def run(cfg: QuantizeConfig, evaluate: EvaluateConfig, *, onnx: Path, export_result: Path,
        train_result: Path, ingested_dir: Path, split: Path, out_dir: Path) -> QuantizeResult:
    """Quantise (when ``cfg.enabled``), evaluate FP32 and INT8 on the test split, time them side
    by side, write ``out_dir``/quantize.json (and the INT8 model and its golden samples)."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    if not cfg.enabled:
        result = QuantizeResult(enabled=False)
        write_text(out_dir / RECORD, result.model_dump_json(indent=2) + "\n")
        return result
    exported = read_json(export_result, "export result")
    int8 = out_dir / MODEL
    calibration = _calibration_images(cfg, ingested_dir, split)
    quantized, kept_float = quantize_model(Path(onnx), int8, calibration, cfg)
    threshold, source = resolve_threshold(evaluate, train_result)
    images, labels, _ = load_split_images(ingested_dir, split, "test")
    fp32_out, int8_out = outputs_of(session(Path(onnx)), images), outputs_of(session(int8), images)
    ood = compare_guard(fp32_out, int8_out)
    if ood["guarded"]:  # and on corrupted copies: the guard must still say no
        from medops.learn.ood import CORRUPTIONS, corrupt

        bad = np.concatenate([corrupt(images[:64], kind) for kind in CORRUPTIONS])
        ood = compare_guard([np.concatenate([a, b]) for a, b in zip(fp32_out, outputs_of(session(Path(onnx)), bad))],
                            [np.concatenate([a, b]) for a, b in zip(int8_out, outputs_of(session(int8), bad))])
    write_golden(Path(onnx).with_name(GOLDEN_FILE), int8, out_dir / GOLDEN_FILE)
    fp32_q, int8_q = _quality(labels, fp32_out[0], threshold), _quality(labels, int8_out[0], threshold)
    result = QuantizeResult(
        enabled=True, source_sha256=str(exported.get("sha256")), sha256=sha256_file(int8),
        model=MODEL, golden=GOLDEN_FILE, golden_atol=cfg.golden_atol,
        calibration={"split": "train", "n_images": len(calibration), "method": cfg.calibration_method,
                     "per_channel": cfg.per_channel, "seed": cfg.seed, "format": "QDQ"},
        quantized_nodes=quantized, float_nodes=kept_float, threshold=threshold,
        threshold_source=source, fp32=fp32_q, int8=int8_q,
        delta_auc=int8_q["auc"] - fp32_q["auc"], delta_accuracy=int8_q["accuracy"] - fp32_q["accuracy"],
        ood=ood, speed=measure_speed(Path(onnx), int8, images, cfg))
    write_text(out_dir / RECORD, json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
    return result
