"""results: decisions that one step writes and another must read (TFX's BLESSED file).

The gate stage writes a ``GateDecision`` to ``reports/gate.json``; deploy reads it here with
``require_passed`` and has no way around it, without importing the gate stage itself.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from medops.errors import GateRejectedError


class ChampionComparison(BaseModel):
    """The side-by-side AUC of the served model and the candidate on the same test rows."""

    compared: bool                        # both AUCs were computed
    passed: bool                          # the candidate may replace the champion
    reason: str
    version: int | None = None            # the served version, if any
    sha256: str | None = None             # of its model.onnx
    auc: float | None = None              # the champion's AUC
    candidate_auc: float | None = None    # the candidate's AUC on the same rows
    difference: float | None = None       # candidate_auc - auc
    margin: float | None = None
    n: int | None = None                  # test images both were scored on


class Int8Decision(BaseModel):
    """Whether the quantize stage's INT8 model is served instead of the FP32 export, and why.

    Never fails the gate: when ``serve`` is false the FP32 model is served. ``reasons``: one line
    per check, ending ": pass" or ": fail"; ``summary``: the one line a person reads."""

    serve: bool
    summary: str
    reasons: list[str] = []
    sha256: str | None = None          # of models/int8/model.onnx, the file deploy must find
    source_sha256: str | None = None   # the FP32 export it was made from
    golden_atol: float | None = None
    delta_auc: float | None = None
    delta_accuracy: float | None = None
    median_speedup: float | None = None


class GateDecision(BaseModel):
    passed: bool
    reasons: list[str]
    data_version: str
    model: str | None = None
    metrics: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    champion: ChampionComparison | None = None
    timestamp: str
    int8: Int8Decision | None = None   # None: decided before the quantize stage existed (FP32)

    @property
    def failed_reasons(self) -> list[str]:
        """The reasons of the checks that failed (each reason line ends in "pass" or "fail")."""
        return [r for r in self.reasons if r.endswith("fail")]


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
        raise GateRejectedError(
            f"gate rejected the model ({decision.timestamp}): {'; '.join(decision.failed_reasons)}"
        )
    return decision
