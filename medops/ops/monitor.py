"""Drift monitoring: the last N served images (the recorder's log) against the training reference.

Tests, each a two-sample test of the window against the reference (``models/reference.json``,
``medops.stages.reference``):

- outputs: Kolmogorov-Smirnov on ``probability`` (reference: the served model's answers on the
  validation split) and on ``ood_score`` when both sides have it;
- header categories (``medops.drift.CATEGORY_FIELDS``): chi-square test of homogeneity on the
  2 x K table of category counts (a category the reference never saw counts as its own column);
  it fires only if the total-variation distance between the two distributions is at least
  ``min_category_shift`` too, so one stray upload in a window does not count as a drifting
  population (the OOD guard answers for single images);
- image statistics (``medops.drift.STAT_FIELDS``): Kolmogorov-Smirnov on each; and, jointly, an
  outlier-rate test: each image's Mahalanobis distance from the reference's statistics (mean and
  covariance fitted on half the reference), an outlier beyond the 99th percentile of the other
  half's distances; a one-sided binomial test of the window's outlier count against that half's
  own rate. A few unlike images in a window (a fifth of corrupted films, whatever the
  corruption) move no single statistic much, but each is an outlier.

Multiple testing: the p-values of all tests run are Holm-corrected (Holm 1979, step-down
Bonferroni; controls the family-wise error rate at ``alpha`` whatever their dependence); a test
fires when its adjusted p-value is below ``alpha``. Images preprocessing could not use (an error
in their record) are counted but not tested: they have no statistics or answer.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel

from medops.config import MonitorConfig
from medops.drift import CATEGORY_FIELDS, OUTPUT_FIELDS, STAT_FIELDS, RequestLog
from medops.errors import MonitorDataError
from medops.paths import read_json

class DriftTest(BaseModel):
    name: str              # e.g. "ks:probability", "chi2:modality", "ks:mean"
    kind: str              # output | category | image
    statistic: float
    p_value: float         # raw
    p_adjusted: float      # Holm
    fired: bool
    detail: str = ""


class MonitorResult(BaseModel):
    drift: bool
    n: int                 # images in the window
    n_errors: int          # of them, images preprocessing could not use (not tested)
    window: int
    alpha: float
    correction: str = "holm"
    tests: list[DriftTest]

    @property
    def fired(self) -> list[DriftTest]:
        return [t for t in self.tests if t.fired]

    def summary(self) -> str:
        head = (f"drift: {'YES' if self.drift else 'no'} over the last {self.n} served images "
                f"({self.n_errors} unusable); {len(self.tests)} tests, Holm-corrected at "
                f"alpha {self.alpha:g}")
        rows = [f"  {'FIRED' if t.fired else 'ok':5s} {t.name:24s} stat {t.statistic:8.4f}  "
                f"p {t.p_value:.3g}  p_holm {t.p_adjusted:.3g}  {t.detail}" for t in self.tests]
        return "\n".join([head, *rows])

    def evidence(self) -> dict[str, Any]:
        """The event payload: what fired, with its numbers."""
        return {"n": self.n, "alpha": self.alpha, "correction": self.correction,
                "fired": [t.model_dump() for t in self.fired]}


@dataclass(frozen=True)
class Reference:
    features: list[dict[str, Any]]
    outputs: dict[str, list[float] | None]

    @cached_property
    def categories(self) -> dict[str, list[str]]:
        return {f: [_category(r.get(f)) for r in self.features] for f in CATEGORY_FIELDS}

    @cached_property
    def numbers(self) -> dict[str, np.ndarray]:
        out = {f: _numbers(self.features, f) for f in STAT_FIELDS}
        return out | {f: np.asarray(self.outputs.get(f) or [], float) for f in OUTPUT_FIELDS}

    @cached_property
    def outlier_model(self) -> "OutlierModel | None":
        return OutlierModel.fit(self.features)

    @classmethod
    def load(cls, path: Path) -> "Reference":
        try:
            record = read_json(path, "the drift reference")
        except Exception as exc:  # noqa: BLE001 - MedopsError: missing or unreadable
            raise MonitorDataError(f"{exc} (the reference stage writes it)") from None
        return cls(record.get("features") or [], record.get("outputs") or {})


def _numbers(records: Sequence[dict[str, Any]], field: str) -> np.ndarray:
    values = [r.get(field) for r in records]
    return np.array([v for v in values if isinstance(v, (int, float)) and np.isfinite(v)], float)


def _category(value: Any) -> str:
    return "unknown" if value is None else str(value)


def ks_test(reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
    from scipy.stats import ks_2samp

    res = ks_2samp(reference, window)
    return float(res.statistic), float(res.pvalue)


def category_test(reference: Sequence[Any], window: Sequence[Any]) -> tuple[float, float, float]:
    """(chi-square statistic, p-value, total-variation distance) of the two samples' categories."""
    from scipy.stats import chi2_contingency

    from collections import Counter

    ref, win = Counter(_category(v) for v in reference), Counter(_category(v) for v in window)
    cats = sorted(set(ref) | set(win))
    table = np.array([[ref[c] for c in cats], [win[c] for c in cats]], float)
    tvd = float(0.5 * np.abs(table[0] / table[0].sum() - table[1] / table[1].sum()).sum())
    if len(cats) < 2:
        return 0.0, 1.0, tvd
    stat, p, _, _ = chi2_contingency(table, correction=False)
    return float(stat), float(p), tvd


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (monotone, capped at 1)."""
    p = np.asarray(p_values, float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def _matrix(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """The STAT_FIELDS of the records that have them all, one row each."""
    rows = [[r.get(f) for f in STAT_FIELDS] for r in records]
    return np.array([row for row in rows if all(isinstance(v, (int, float)) for v in row)], float)


@dataclass(frozen=True)
class OutlierModel:
    """Mahalanobis distance from half the reference; the cut at the other half's ``quantile``."""

    mean: np.ndarray
    inverse: np.ndarray
    cut: float
    rate: float  # the held-out half's share beyond the cut (about 1 - quantile)
    quantile: float

    @classmethod
    def fit(cls, reference: Sequence[dict[str, Any]], quantile: float = 0.99) -> "OutlierModel | None":
        ref = _matrix(reference)
        if len(ref) < 100:
            return None
        fit, held = ref[0::2], ref[1::2]
        mean = fit.mean(axis=0)
        inverse = np.linalg.pinv(np.cov(fit, rowvar=False) + 1e-6 * np.eye(ref.shape[1]))
        model = cls(mean, inverse, 0.0, 0.0, quantile)
        dist = model.distance(held)
        cut = float(np.quantile(dist, quantile))
        return cls(mean, inverse, cut, max(float(np.mean(dist > cut)), 1.0 - quantile), quantile)

    def distance(self, x: np.ndarray) -> np.ndarray:
        d = x - self.mean
        return np.einsum("ij,jk,ik->i", d, self.inverse, d)


def outlier_test(model: OutlierModel | None,
                 window: Sequence[dict[str, Any]]) -> tuple[float, float, str] | None:
    """(window outlier rate, one-sided binomial p-value, detail) or None (too little data)."""
    from scipy.stats import binomtest

    win = _matrix(window)
    if model is None or len(win) < 2:
        return None
    k = int((model.distance(win) > model.cut).sum())
    p = binomtest(k, len(win), model.rate, alternative="greater").pvalue
    return k / len(win), float(p), (f"{k} of {len(win)} beyond the reference's "
                                    f"{model.quantile:.0%} (expected {model.rate:.1%})")


def _raw_tests(ref: Reference, window: list[dict[str, Any]], cfg: MonitorConfig) -> list[dict]:
    raw = []
    for field in OUTPUT_FIELDS:
        r, w = ref.numbers[field], _numbers(window, field)
        if len(r) >= 2 and len(w) >= 2:
            stat, p = ks_test(r, w)
            raw.append({"name": f"ks:{field}", "kind": "output", "statistic": stat, "p_value": p,
                        "detail": f"reference n={len(r)} mean {r.mean():.3f}; window n={len(w)} "
                                  f"mean {w.mean():.3f}"})
    for field in CATEGORY_FIELDS:
        stat, p, tvd = category_test(ref.categories[field], [f.get(field) for f in window])
        top = _top_change(ref.categories[field], window, field)
        raw.append({"name": f"chi2:{field}", "kind": "category", "statistic": stat, "p_value": p,
                    "tvd": tvd, "detail": f"TVD {tvd:.3f}; {top}"})
    for field in STAT_FIELDS:
        r, w = ref.numbers[field], _numbers(window, field)
        if len(r) >= 2 and len(w) >= 2:
            stat, p = ks_test(r, w)
            raw.append({"name": f"ks:{field}", "kind": "image", "statistic": stat, "p_value": p,
                        "detail": f"median {np.median(r):.3f} -> {np.median(w):.3f}"})
    outliers = outlier_test(ref.outlier_model, window)
    if outliers is not None:
        rate, p, detail = outliers
        raw.append({"name": "outliers:image", "kind": "image", "statistic": rate, "p_value": p,
                    "detail": detail})
    return raw


def _top_change(ref: list[str], window: list[dict], field: str) -> str:
    """The category whose share grew most in the window, e.g. "CT 0% -> 20%"."""
    win = [_category(f.get(field)) for f in window]
    if not ref or not win:
        return ""
    shares = {c: (ref.count(c) / len(ref), win.count(c) / len(win)) for c in set(ref) | set(win)}
    cat, (a, b) = max(sorted(shares.items()), key=lambda kv: kv[1][1] - kv[1][0])
    return f"{cat[:24]} {a:.0%} -> {b:.0%}"


def compare(ref: Reference, records: list[dict[str, Any]], cfg: MonitorConfig) -> MonitorResult:
    """Test the window ``records`` against ``ref`` (see the module docstring)."""
    usable = [r for r in records if not r.get("error")]
    if len(usable) < cfg.min_records:
        raise MonitorDataError(
            f"{len(usable)} usable recorded answers in the window (of {len(records)}); at least "
            f"monitor.min_records = {cfg.min_records} are needed")
    if not ref.features:
        raise MonitorDataError("the drift reference holds no features: rerun the reference stage")
    raw = _raw_tests(ref, usable, cfg)
    adjusted = holm([t["p_value"] for t in raw])
    tests = []
    for t, p_adj in zip(raw, adjusted):
        fired = p_adj < cfg.alpha and t.pop("tvd", 1.0) >= cfg.min_category_shift
        tests.append(DriftTest(**t, p_adjusted=p_adj, fired=fired))
    return MonitorResult(drift=any(t.fired for t in tests), n=len(records),
                         n_errors=len(records) - len(usable), window=cfg.window, alpha=cfg.alpha,
                         tests=tests)


def monitor(cfg: MonitorConfig, *, log_dir: Path, reference: Path,
            window: int | None = None) -> tuple[MonitorResult, Reference, list[dict[str, Any]]]:
    """The last ``window`` (default ``cfg.window``) records of the drift log at ``log_dir``
    against ``reference``: the result, the reference and the window (for a report)."""
    n = window or cfg.window
    cfg = cfg.model_copy(update={"window": n})
    ref = Reference.load(Path(reference))
    records = RequestLog(log_dir).read_last(n)
    return compare(ref, records, cfg), ref, records


# -- the report ------------------------------------------------------------------------------------

def histogram_png(reference: np.ndarray, window: np.ndarray, title: str) -> bytes:
    """Reference vs window densities of one feature, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.6), dpi=80)
    both = np.concatenate([reference, window]) if len(reference) + len(window) else np.zeros(1)
    bins = np.linspace(float(both.min()), float(both.max()) + 1e-9, 31)
    ax.hist(reference, bins=bins, density=True, alpha=0.5, label=f"reference (n={len(reference)})")
    ax.hist(window, bins=bins, density=True, alpha=0.5, label=f"recent (n={len(window)})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def report_plots(result: MonitorResult, ref: Reference,
                 records: list[dict[str, Any]]) -> dict[str, bytes]:
    """``{feature: PNG}`` for the output tests and every numeric test that fired."""
    usable = [r for r in records if not r.get("error")]
    out = {}
    for test in result.tests:
        field = test.name.split(":", 1)[1]
        if field not in ref.numbers or not (test.kind == "output" or test.fired):
            continue  # header categories (their table says it) and the joint outlier test
        r = ref.numbers[field]
        out[field] = histogram_png(r, _numbers(usable, field), f"{field}: reference vs recent")
    return out


def render_markdown(result: MonitorResult, plots: dict[str, str] | None = None) -> str:
    """The report: verdict, the table of tests, and the plots (``{feature: image URL}``)."""
    lines = [f"# Drift monitor: {'drift detected' if result.drift else 'no drift'}", "",
             f"Last {result.n} served images ({result.n_errors} unusable, not tested); "
             f"{len(result.tests)} two-sample tests against the training reference, "
             f"Holm-corrected at family-wise alpha {result.alpha:g}.", "",
             "| test | statistic | p | p (Holm) | fired | detail |", "|---|---|---|---|---|---|"]
    lines += [f"| {t.name} | {t.statistic:.4f} | {t.p_value:.3g} | {t.p_adjusted:.3g} | "
              f"{'**yes**' if t.fired else 'no'} | {t.detail} |" for t in result.tests]
    for name, url in (plots or {}).items():
        lines += ["", f"![{name}]({url})"]
    return "\n".join(lines) + "\n"


def report(result: MonitorResult, ref: Reference,
           records: list[dict[str, Any]]) -> tuple[str, dict[str, str]]:
    """The markdown report and its plots as ``{feature: data: URL}`` (a Prefect UI page shows a
    data URL, never a file:// image)."""
    plots = {name: data_url(png) for name, png in report_plots(result, ref, records).items()}
    return render_markdown(result, plots), plots


def to_json(result: MonitorResult) -> dict[str, Any]:
    """``{"drift", "n", "tests": [{"name", "statistic", "p_value", "fired", ...}]}``."""
    return json.loads(result.model_dump_json())
