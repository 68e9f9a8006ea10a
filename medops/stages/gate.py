"""gate: decide whether the evaluated model may be deployed, and write the decision down.

The decision is an artifact (like TFX's BLESSED file): deploy reads it with ``read_decision`` and
refuses unless ``passed`` is true. Every check produces a reason line, pass or fail, with the
value and the threshold, so the decision explains itself in the Prefect UI and in git history.

Three kinds of check:

1. Absolute thresholds: every test metric must reach its ``min_*`` value from params.yaml.
1b. The evidence behind the threshold (``check_evidence``): the test ECE and the width of the
   decision threshold's bootstrap interval on val (from train.json) within their ``max_*``.
2. Champion/challenger: the model now serving (the champion) is scored with onnxruntime on the
   same test split in the same run, and the candidate (the challenger, through its recorded
   test probabilities) must not have an AUC lower than the champion's by more than
   ``champion_margin``. Both AUCs are computed here, on exactly the same rows and labels, so the
   comparison does not depend on an old number recorded under other data.

Inputs:
    metrics: ``reports/metrics.json`` (from evaluate).
    ood_result: ``models/ood/ood.json`` (from ood): the OOD guard's false-alarm rate on held-out
        val images, which must lie within ``ood_false_alarm_margin`` of its target.
    train_result: ``models/train.json`` (from train; gives data_version and the model name).
    For the champion comparison (all optional; without ``repository`` nothing is compared):
    predictions: ``reports/plots/predictions.csv`` (from evaluate: the candidate's test
        probabilities per sop_instance_uid).
    ingested_dir, split: the data and ``split.csv``; the ``test`` rows are scored.
    repository: the Triton model repository the deploy step writes to;
        ``<repository>/<model_name>/<N>/model.onnx`` of the served version N is the champion.
Outputs:
    out: ``reports/gate.json``, the GateDecision (``champion`` holds the comparison).
Params (``gate`` section, GateConfig):
    min_auc, min_accuracy, min_sensitivity, min_specificity, compare_with_serving,
    champion_margin, ood_false_alarm_margin; max_ece and max_threshold_interval
    (``check_evidence``; null = off).

No TensorFlow here (the champion runs in onnxruntime).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medops.atomic import write_text
from medops.config import GateConfig
from medops.errors import MedopsError, first_line
from medops.paths import read_json
from medops.results import ChampionComparison, GateDecision, Int8Decision

# (metric key in metrics.json, GateConfig field); every metric must be >= its threshold
CHECKS: tuple[tuple[str, str], ...] = (
    ("auc", "min_auc"),
    ("accuracy", "min_accuracy"),
    ("sensitivity", "min_sensitivity"),
    ("specificity", "min_specificity"),
)


def metric_value(metrics: dict[str, Any], key: str) -> float | None:
    """``metrics[key]`` as a float if it is a finite number (not a bool); None otherwise.

    The one test of a usable metric: ``check_metrics`` fails a check without one, and ``decide``
    records only these (NaN or infinity would be written to gate.json as null, which
    ``read_decision`` could not read back).
    """
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def check_metrics(cfg: GateConfig, metrics: dict[str, Any]) -> tuple[bool, list[str]]:
    """Compare each metric with its threshold; returns (all passed, one reason per check).

    A missing, non-numeric or non-finite (NaN, infinite) metric fails its check (a gate must not
    pass on absent evidence).
    """
    reasons: list[str] = []
    passed = True
    for key, field in CHECKS:
        limit = float(getattr(cfg, field))
        value = metric_value(metrics, key)
        if value is None:
            what = "missing from metrics" if key not in metrics else f"is not a finite number ({metrics[key]!r})"
            reasons.append(f"{key} {what} (need {field} {limit:.3f}): fail")
            passed = False
            continue
        ok = value >= limit
        passed = passed and ok
        reasons.append(f"{key} {value:.3f} {'>=' if ok else '<'} {field} {limit:.3f}: {'pass' if ok else 'fail'}")
    return passed, reasons


def check_ood(cfg: GateConfig, ood_record: dict[str, Any] | None) -> tuple[bool, str]:
    """The OOD guard's own check: its false-alarm rate on held-out val images (the ood stage's
    two-fold figure) within ``ood_false_alarm_margin`` of its target. A missing or unreadable
    record fails (a model must not be served with a guard nobody checked)."""
    if ood_record is None:
        return False, "ood guard record missing (run the ood stage): fail"
    rate = metric_value(ood_record, "val_false_alarm_rate")
    target = metric_value(ood_record, "false_alarm_rate_target")
    if rate is None or target is None:
        return False, "ood guard record has no val_false_alarm_rate / false_alarm_rate_target: fail"
    off = abs(rate - target)
    ok = off <= cfg.ood_false_alarm_margin
    return ok, (f"ood val false-alarm rate {rate:.3f} is {off:.3f} off its target {target:.3f} "
                f"({'<=' if ok else '>'} ood_false_alarm_margin {cfg.ood_false_alarm_margin:.3f}): "
                f"{'pass' if ok else 'fail'}")
def check_evidence(cfg: GateConfig, metrics: dict[str, Any],
                   train_record: dict[str, Any]) -> tuple[bool, list[str]]:
    """Calibration and threshold stability: the test ECE at most ``max_ece``, and the width of the
    decision threshold's bootstrap interval on val (train.json ``threshold_interval``, as a
    probability of the candidate) at most ``max_threshold_interval``. A threshold that moves that
    much with the val images drawn (an argmax over a few borderline images) would move as much with
    the next training run, and so would the accuracy at it. Each limit is off when null; missing
    evidence for a limit that is on fails."""
    reasons: list[str] = []
    passed = True
    if cfg.max_ece is not None:
        ece = metric_value(metrics, "ece")
        ok = ece is not None and ece <= cfg.max_ece
        shown = "missing" if ece is None else f"{ece:.3f}"
        reasons.append(f"ece {shown} {'<=' if ok else 'not <='} max_ece {cfg.max_ece:.3f}: {'pass' if ok else 'fail'}")
        passed = passed and ok
    if cfg.max_threshold_interval is not None:
        interval = train_record.get("threshold_interval")
        width = None
        if isinstance(interval, (list, tuple)) and len(interval) == 2 and \
                all(isinstance(v, (int, float)) and math.isfinite(v) for v in interval):
            width = float(interval[1]) - float(interval[0])
        ok = width is not None and width <= cfg.max_threshold_interval
        shown = "missing from train.json" if width is None else (
            f"width {width:.3f} ({interval[0]:.3f} to {interval[1]:.3f})")
        reasons.append(f"decision threshold's val bootstrap interval {shown} "
                       f"{'<=' if ok else 'not <='} max_threshold_interval {cfg.max_threshold_interval:.3f}: "
                       f"{'pass' if ok else 'fail'}")
        passed = passed and ok
    return passed, reasons


def compare_with_champion(
    margin: float, *, version: int, y_true: np.ndarray, candidate: np.ndarray, champion: np.ndarray,
    sha256: str | None = None,
) -> ChampionComparison:
    """Compare the candidate's and the champion's test AUC on the same rows and labels.

    The candidate passes unless its AUC is lower than the champion's by more than ``margin``
    (equal to the margin passes). AUC is threshold-free, so the two models' different decision
    thresholds do not bias the comparison.
    """
    from medops.metrics import compute_auc

    champion_auc = compute_auc(y_true, champion)
    candidate_auc = compute_auc(y_true, candidate)
    difference = candidate_auc - champion_auc
    # a tiny tolerance so that "worse by exactly the margin" is not failed by float rounding
    ok = difference >= -margin - 1e-12
    head = f"champion v{version} auc {champion_auc:.3f}, candidate auc {candidate_auc:.3f}"
    if ok:
        reason = f"{head}: within margin {margin:.3f}: pass"
    else:
        reason = f"{head}: worse by {-difference:.3f} > margin {margin:.3f}: fail"
    return ChampionComparison(
        compared=True, passed=ok, reason=reason, version=version, sha256=sha256, auc=champion_auc,
        candidate_auc=candidate_auc, difference=difference, margin=margin, n=int(len(y_true)),
    )


@dataclass(frozen=True)
class _TestSplit:
    images: np.ndarray
    labels: np.ndarray
    uids: np.ndarray


def read_candidate_scores(predictions: Path, uids: np.ndarray) -> np.ndarray:
    """The candidate's test probabilities from evaluate's predictions.csv, in ``uids`` order.

    Raises:
        MedopsError: the file is missing or lacks a probability for some test image (it was
            written for another split or dataset, so it cannot stand for this candidate).
    """
    import pandas as pd

    try:
        table = pd.read_csv(predictions, dtype={"sop_instance_uid": str})
    except FileNotFoundError:
        raise MedopsError(
            f"gate needs the candidate's test predictions at {predictions}, which does not exist"
        ) from None
    missing_cols = {"sop_instance_uid", "probability"} - set(table.columns)
    if missing_cols:
        raise MedopsError(f"{predictions} lacks column(s) {sorted(missing_cols)}")
    scores = table.drop_duplicates("sop_instance_uid").set_index("sop_instance_uid")["probability"]
    found = pd.Series(uids).map(scores)
    lacking = found.isna().to_numpy()
    if lacking.any():
        raise MedopsError(
            f"{predictions} has no probability for {int(lacking.sum())} of {len(uids)} test images "
            f"(e.g. {uids[lacking][0]}): it is not this test split's evaluation"
        )
    return found.to_numpy(dtype=np.float64)


def score_onnx(path: Path, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Probabilities (n,) of the ONNX model at ``path`` (contract: input "image" (N, S, S, 1),
    output "probability" (N, 1)), run with onnxruntime on the CPU.

    Raises:
        MedopsError: the model does not load, its input does not fit ``images`` or it fails to run.
    """
    import onnxruntime as ort

    from medops.serving.contract import INPUT_NAME, OUTPUT_NAME

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable graphs
        raise MedopsError(f"{path} does not load in onnxruntime: {first_line(exc)}") from None
    inputs = {i.name: i.shape for i in session.get_inputs()}
    if INPUT_NAME not in inputs:
        raise MedopsError(f"{path} has inputs {sorted(inputs)}, not {INPUT_NAME!r}")
    want = inputs[INPUT_NAME]
    have = images.shape
    if len(want) != len(have) or any(isinstance(w, int) and w != h for w, h in zip(want[1:], have[1:])):
        raise MedopsError(f"{path} takes {INPUT_NAME} of shape {want}, the test images are {list(have)}")
    out = []
    try:
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start : start + batch_size], dtype=np.float32)
            probs = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
            out.append(np.asarray(probs, dtype=np.float64).reshape(-1))
    except Exception as exc:
        raise MedopsError(f"{path} failed to run on the test images: {first_line(exc)}") from None
    scores = np.concatenate(out) if out else np.zeros(0)
    if len(scores) != len(images):
        raise MedopsError(f"{path} gave {len(scores)} outputs for {len(images)} images")
    if not np.isfinite(scores).all():
        raise MedopsError(f"{path} gave {int((~np.isfinite(scores)).sum())} non-finite probabilities")
    return scores


def judge_champion(
    cfg: GateConfig,
    *,
    repository: Path | None,
    model_name: str,
    load_test: Callable[[], _TestSplit],
    predictions: Path | None,
) -> ChampionComparison:
    """The champion/challenger check, as a ChampionComparison (its reason ends pass or fail).

    Outcomes:
        - comparison off, no repository or no served version: pass, nothing to compare.
        - the candidate's predictions are missing or do not cover the test split: a typed
          error (MedopsError): the stage was called wrongly, and judging would be guessing.
        - the champion cannot be scored (its file is gone or corrupted, its input shape differs
          from today's images, it fails in onnxruntime): pass with a reason saying so. The
          absolute thresholds still apply, so nothing below the params.yaml bar is deployed.
          Blocking instead would make one broken or obsolete served model (e.g. after a
          deliberate change of image_size) freeze deployment for good, and the only way out
          would be to switch the check off, which protects less than this does.
        - otherwise: ``compare_with_champion``.

    ``load_test`` is a callable returning the test split (_TestSplit); it is called only when
    a comparison will be made, so the gate without a served model reads no pixels.
    """
    margin = float(cfg.champion_margin)
    if not cfg.compare_with_serving:
        return ChampionComparison(compared=False, passed=True, margin=margin,
                                  reason="compare_with_serving is off: champion not compared: pass")
    if repository is None:
        return ChampionComparison(compared=False, passed=True, margin=margin,
                                  reason="no model repository given: nothing to compare: pass")
    from medops.serving.repository import served_version
    from medops.serving.contract import ONNX_FILENAME

    version = served_version(Path(repository), model_name)
    if version is None:
        return ChampionComparison(
            compared=False, passed=True, margin=margin,
            reason=f"no model is serving ({model_name} in {repository}): nothing to compare: pass",
        )
    if predictions is None:
        raise MedopsError(
            f"champion v{version} of {model_name} is serving, but the gate was not given the "
            "candidate's test predictions"
        )
    test = load_test()
    candidate = read_candidate_scores(Path(predictions), test.uids)
    onnx_path = Path(repository) / model_name / str(version) / ONNX_FILENAME
    from medops.hashing import sha256_file

    sha = None
    try:
        sha = sha256_file(onnx_path)
        champion = score_onnx(onnx_path, test.images)
    except (MedopsError, OSError) as exc:
        why = first_line(exc) if isinstance(exc, MedopsError) else f"cannot read {onnx_path}: {exc.strerror or exc}"
        return ChampionComparison(
            compared=False, passed=True, version=version, sha256=sha, margin=margin,
            reason=(f"champion v{version} could not be evaluated ({why}): not compared, "
                    "absolute thresholds only: pass"),
        )
    return compare_with_champion(margin, version=version, y_true=test.labels, candidate=candidate,
                                 champion=champion, sha256=sha)


def _within(what: str, value: float | None, limit: float, unit: float = 1.0) -> tuple[bool, str]:
    """``|value| <= limit`` as a reason line (``unit`` 100: shown in points)."""
    if value is None or not math.isfinite(value):
        return False, f"{what} missing: fail"
    ok = abs(value) <= limit + 1e-12
    return ok, (f"|{what}| {abs(value) * unit:.4g} {'<=' if ok else '>'} {limit * unit:.4g}: "
                f"{'pass' if ok else 'fail'}")


def judge_int8(cfg: GateConfig, record: dict[str, Any] | None) -> Int8Decision:
    """Serve the quantize stage's INT8 model only if, against FP32 on the test split, its AUC
    and accuracy moved by at most ``int8_max_auc_change`` / ``int8_max_accuracy_change``, its
    metrics still pass the absolute thresholds, its OOD guard agrees with FP32's on at least
    ``int8_min_ood_agreement`` of the test and corrupted images, and the median of the
    interleaved side-by-side speedups (FP32 time / INT8 time, same batch and threads) is at
    least ``int8_min_speedup`` (> 1 with a stated margin: the rule does not depend on the CPU,
    the outcome does). Otherwise FP32 is served; ``summary`` says why."""
    if record is None or not record.get("enabled"):
        why = "no quantize record" if record is None else "quantize.enabled is false"
        return Int8Decision(serve=False, summary=f"int8 not served ({why}): fp32 served")
    checks = [_within("delta auc", record.get("delta_auc"), cfg.int8_max_auc_change),
              _within("delta accuracy (points)", record.get("delta_accuracy"),
                      cfg.int8_max_accuracy_change, unit=100.0)]
    absolute_ok, absolute = check_metrics(cfg, record.get("int8") or {})
    checks += [(absolute_ok, f"int8 {line}") for line in absolute]
    ood = record.get("ood") or {}
    if ood.get("guarded"):
        agree = metric_value(ood, "agreement")
        ok = agree is not None and agree >= cfg.int8_min_ood_agreement and ood.get("consistent") is True
        checks.append((ok, f"ood in_distribution agreement with fp32 {agree} "
                           f"{'>=' if ok else '<'} {cfg.int8_min_ood_agreement}"
                           f"{'' if ood.get('consistent') else ' (in_distribution is not ood_score <= 1)'}"
                           f": {'pass' if ok else 'fail'}"))
    speed = metric_value(record.get("speed") or {}, "median_speedup")
    ok = speed is not None and speed >= cfg.int8_min_speedup
    checks.append((ok, f"median speedup {speed if speed is None else round(speed, 3)} "
                       f"{'>=' if ok else '<'} int8_min_speedup {cfg.int8_min_speedup}: {'pass' if ok else 'fail'}"))
    serve = all(ok for ok, _ in checks)
    failed = [line.rsplit(":", 1)[0] for ok, line in checks if not ok]
    return Int8Decision(
        serve=serve, reasons=[line for _, line in checks],
        summary="int8 served" if serve else f"int8 not served ({'; '.join(failed)}): fp32 served",
        sha256=record.get("sha256"), source_sha256=record.get("source_sha256"),
        golden_atol=record.get("golden_atol"), delta_auc=record.get("delta_auc"),
        delta_accuracy=record.get("delta_accuracy"), median_speedup=speed)


def decide(
    cfg: GateConfig, metrics: dict[str, Any], train_record: dict[str, Any],
    champion: ChampionComparison | None = None, ood: tuple[bool, str] | None = None,
) -> GateDecision:
    """The decision: every absolute threshold passed and, if given, the OOD guard's check
    (``check_ood``) and the champion check passed."""
    passed, reasons = check_metrics(cfg, metrics)
    if ood is not None:
        passed = passed and ood[0]
        reasons = [*reasons, ood[1]]
    evidence_ok, evidence = check_evidence(cfg, metrics, train_record)
    passed, reasons = passed and evidence_ok, [*reasons, *evidence]
    if champion is not None:
        passed = passed and champion.passed
        reasons = [*reasons, champion.reason]
    return GateDecision(
        passed=passed,
        reasons=reasons,
        data_version=str(train_record.get("data_version", "unknown")),
        model=train_record.get("model"),
        metrics={k: v for k, _ in CHECKS if (v := metric_value(metrics, k)) is not None},
        thresholds={**{f: float(getattr(cfg, f)) for _, f in CHECKS},
                    **{f: float(v) for f in ("max_ece", "max_threshold_interval")
                       if (v := getattr(cfg, f)) is not None}},
        champion=champion,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def run(
    cfg: GateConfig,
    *,
    metrics: Path,
    train_result: Path,
    out: Path,
    predictions: Path | None = None,
    ingested_dir: Path | None = None,
    split: Path | None = None,
    repository: Path | None = None,
    model_name: str = "pneumonia_classifier",
    ood_result: Path | None = None,
    quantize_result: Path | None = None,
) -> GateDecision:
    """Read metrics and train result, compare with the served model, write the decision JSON.

    Without ``repository`` only the absolute thresholds are checked (and a reason says so).
    With it, ``predictions``, ``ingested_dir`` and ``split`` are needed once a model is serving.
    ``ood_result``: the ood stage's ``ood.json``; its guard must pass ``check_ood`` (a path that
    does not exist fails the gate; None skips the check: a model without a guard).
    ``quantize_result``: the quantize stage's ``quantize.json``: ``judge_int8`` decides whether
    the INT8 model is served (``int8`` in the decision); None: FP32, no ``int8`` entry.
    """
    metrics_record = read_json(metrics, "metrics")
    train_record = read_json(train_result, "train result")
    ood = None
    if ood_result is not None:
        ood = check_ood(cfg, read_json(ood_result, "ood result") if Path(ood_result).is_file() else None)

    def load_test() -> _TestSplit:
        if ingested_dir is None or split is None:
            raise MedopsError("the champion comparison needs ingested_dir and split to score the test images")
        from medops.data import load_split_images

        images, labels, rows = load_split_images(Path(ingested_dir), Path(split), "test")
        return _TestSplit(images=images, labels=labels, uids=rows["sop_instance_uid"].astype(str).to_numpy())

    champion = judge_champion(cfg, repository=repository, model_name=model_name, load_test=load_test,
                              predictions=predictions)
    decision = decide(cfg, metrics_record, train_record, champion, ood)
    if quantize_result is not None:  # which precision is served (never fails the gate)
        record = read_json(quantize_result, "quantize result") if Path(quantize_result).is_file() else None
        decision = decision.model_copy(update={"int8": judge_int8(cfg, record)})
    write_text(out, decision.model_dump_json(indent=2) + "\n")
    return decision
