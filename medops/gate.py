"""gate: decide whether the evaluated model may be deployed, and write the decision down.

The decision is an artifact (like TFX's BLESSED file): deploy reads it with ``read_decision`` and
refuses unless ``passed`` is true. Every check produces a reason line, pass or fail, with the
value and the threshold, so the decision explains itself in the Prefect UI and in git history.

Inputs:
    metrics: ``reports/metrics.json`` (from evaluate).
    train_result: ``models/train.json`` (from train; gives data_version and the model name).
Outputs:
    out: ``reports/gate.json``, the GateDecision.
Params (``gate`` section, GateConfig):
    min_auc, min_accuracy, min_sensitivity, min_specificity.

No TensorFlow here.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from medops.config import GateConfig
from medops.errors import GateRejectedError, MedopsError

# (metric key in metrics.json, GateConfig field); every metric must be >= its threshold
CHECKS: tuple[tuple[str, str], ...] = (
    ("auc", "min_auc"),
    ("accuracy", "min_accuracy"),
    ("sensitivity", "min_sensitivity"),
    ("specificity", "min_specificity"),
)


class GateDecision(BaseModel):
    passed: bool
    reasons: list[str]
    data_version: str
    model: str | None = None
    metrics: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    timestamp: str


def check_metrics(cfg: GateConfig, metrics: dict[str, Any]) -> tuple[bool, list[str]]:
    """Compare each metric with its threshold; returns (all passed, one reason per check).

    A missing or non-numeric metric fails its check (a gate must not pass on absent evidence).
    """
    reasons: list[str] = []
    passed = True
    for key, field in CHECKS:
        limit = float(getattr(cfg, field))
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            reasons.append(f"{key} missing from metrics (need {field} {limit:.3f}): fail")
            passed = False
            continue
        ok = value >= limit
        passed = passed and ok
        reasons.append(f"{key} {value:.3f} {'>=' if ok else '<'} {field} {limit:.3f}: {'pass' if ok else 'fail'}")
    return passed, reasons


def decide(cfg: GateConfig, metrics: dict[str, Any], train_record: dict[str, Any]) -> GateDecision:
    passed, reasons = check_metrics(cfg, metrics)
    return GateDecision(
        passed=passed,
        reasons=reasons,
        data_version=str(train_record.get("data_version", "unknown")),
        model=train_record.get("model"),
        metrics={k: float(metrics[k]) for k, _ in CHECKS if isinstance(metrics.get(k), (int, float))},
        thresholds={f: float(getattr(cfg, f)) for _, f in CHECKS},
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MedopsError(f"gate needs {what} at {path}, which does not exist") from None
    except json.JSONDecodeError as exc:
        raise MedopsError(f"gate cannot parse {what} at {path}: {exc}") from None


def read_decision(path: Path) -> GateDecision:
    """Read a gate.json written by ``run``; missing or invalid files raise GateRejectedError."""
    try:
        return GateDecision.model_validate_json(Path(path).read_text())
    except FileNotFoundError:
        raise GateRejectedError(f"no gate decision at {path}: run the gate before deploying") from None
    except ValueError as exc:
        raise GateRejectedError(f"gate decision at {path} is not valid: {exc}") from None


def require_passed(path: Path) -> GateDecision:
    """The decision at ``path`` if it passed; otherwise GateRejectedError listing the failed checks."""
    decision = read_decision(path)
    if not decision.passed:
        failed = [r for r in decision.reasons if r.endswith("fail")]
        raise GateRejectedError(f"gate rejected the model ({decision.timestamp}): {'; '.join(failed)}")
    return decision


def run(cfg: GateConfig, *, metrics: Path, train_result: Path, out: Path) -> GateDecision:
    """Read metrics and train result, decide, write the decision JSON (pass or fail)."""
    decision = decide(cfg, _read_json(metrics, "metrics"), _read_json(train_result, "the train result"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(decision.model_dump_json(indent=2) + "\n")
    return decision
