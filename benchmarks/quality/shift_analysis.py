"""Why the recipe's test ECE is ~0.12 while its val ECE is ~0.02, and what each candidate means of
issue 13 does on val and on test, from trained seed projects (no training).

For each seed project (``models/model.keras``, Platt-calibrated on val as the recipe trains it),
the calibrated logits of the val and test images, plain and under test-time augmentation
(horizontal flip; shifts of one pixel; zoom 0.9 and 1.1), then:

1. the candidates, each measured on val AND test: one seed, TTA per seed, the seed ensemble (mean
   logit, Platt refitted on val), the ensemble with TTA, leave-one-out 4-seed ensembles;
2. the val-only evidence the choice rests on: val log-loss and Brier after Platt, and the paired
   stratified bootstrap (1,000 resamples of val) of the val AUC gain of each candidate;
3. the shift: median logit of normal and pneumonia images on val and test, the fraction of normal
   images above 0.9, and calibration corrections for comparison: the Saerens et al. (2002) EM
   estimate of the positive fraction from the UNLABELLED test images (no labels read) with the
   matching prior-shift correction, and two oracles that read the test labels and are shown only
   to bound what any correction could do: the true test prior (62.5 %), and Platt refitted on test.

Usage:
    .venv/bin/python benchmarks/quality/shift_analysis.py SEED_PROJECT [SEED_PROJECT ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from medops.metrics import compute_auc, compute_calibration, compute_metrics, fit_platt, logit, sigmoid  # noqa: E402


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return np.ascontiguousarray(p[:, 1 + dy:1 + dy + x.shape[1], 1 + dx:1 + dx + x.shape[2], :])


def zoomed(x: np.ndarray, f: float) -> np.ndarray:
    import tensorflow as tf

    s = x.shape[1]
    n = int(round(s * f))
    r = tf.image.resize(x, (n, n), method="bilinear").numpy()
    if n >= s:
        o = (n - s) // 2
        return np.ascontiguousarray(r[:, o:o + s, o:o + s, :])
    p = (s - n) // 2
    return np.pad(r, ((0, 0), (p, s - n - p), (p, s - n - p), (0, 0)), mode="edge").astype(np.float32)


VIEWS = {"id": lambda x: x, "flip": lambda x: np.ascontiguousarray(x[:, :, ::-1, :]),
         "s+x": lambda x: shifted(x, 0, 1), "s-x": lambda x: shifted(x, 0, -1),
         "s+y": lambda x: shifted(x, 1, 0), "s-y": lambda x: shifted(x, -1, 0),
         "z0.9": lambda x: zoomed(x, 0.9), "z1.1": lambda x: zoomed(x, 1.1)}
TTA = {"none": ["id"], "flip": ["id", "flip"], "shift": ["id", "s+x", "s-x", "s+y", "s-y"],
       "zoom": ["id", "z0.9", "z1.1"], "all": list(VIEWS)}


def logits(projects: list[Path]) -> tuple[dict, dict]:
    """labels per split, and logits[(seed, view, split)]."""
    from medops.data import load_split_images
    from medops.learn.calibration import model_logits
    from medops.learn.inference import load_model

    data = {s: load_split_images(projects[0] / "data" / "ingested", projects[0] / "data" / "split" / "split.csv", s)[:2]
            for s in ("val", "test")}
    out = {}
    for i, project in enumerate(projects):
        model = load_model(project / "models" / "model.keras")
        for split, (x, _) in data.items():
            for view, f in VIEWS.items():
                out[(i, view, split)] = model_logits(model, f(x))
    return {s: y for s, (_, y) in data.items()}, out


def figures(y: dict, zv: np.ndarray, zt: np.ndarray, prior: float) -> dict:
    pv, pt = sigmoid(zv), sigmoid(zt)
    test = compute_metrics(y["test"], pt, prior)
    return {"val_auc": compute_auc(y["val"], zv), "val_ece": compute_calibration(y["val"], pv)[1],
            "test_auc": test["auc"], "acc": test["accuracy"], "sens": test["sensitivity"],
            "spec": test["specificity"], "test_ece": compute_calibration(y["test"], pt)[1]}


def candidates(y: dict, z: dict, n: int) -> list[tuple[str, dict]]:
    prior = float(np.mean(y["val"]))
    mean = lambda members, views, split: np.mean([z[(i, v, split)] for i in members for v in views], axis=0)  # noqa: E731

    def platt(members: list[int], views: list[str]) -> dict:
        zv, zt = mean(members, views, "val"), mean(members, views, "test")
        a, b = fit_platt(y["val"], zv)
        return figures(y, a * zv + b, zt * a + b, prior)

    rows = []
    for name, views in TTA.items():
        per = [platt([i], views) if name != "none" else figures(y, z[(i, "id", "val")], z[(i, "id", "test")], prior)
               for i in range(n)]
        rows.append((f"one seed, TTA {name} (mean of {n} seeds)",
                     {**{k: float(np.mean([p[k] for p in per])) for k in per[0]},
                      "test_auc_sd": float(np.std([p["test_auc"] for p in per], ddof=1))}))
    for name, views in TTA.items():
        rows.append((f"{n}-seed ensemble + Platt, TTA {name}", platt(list(range(n)), views)))
    for k in range(n):
        rows.append((f"{n - 1}-seed ensemble without seed #{k + 1} + Platt", platt([i for i in range(n) if i != k], ["id"])))
    return rows


def val_evidence(y: dict, z: dict, n: int, samples: int = 1000) -> list[str]:
    from sklearn.metrics import roc_auc_score

    yv = np.asarray(y["val"]).astype(int)
    rng = np.random.default_rng(0)
    pos, neg = np.flatnonzero(yv == 1), np.flatnonzero(yv == 0)
    boots = [np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(samples)]
    ens = lambda views: np.mean([z[(i, v, "val")] for i in range(n) for v in views], axis=0)  # noqa: E731
    base = ens(["id"])
    lines = []
    for name, views in TTA.items():
        zv = ens(views)
        a, b = fit_platt(yv, zv)
        p = sigmoid(a * zv + b)
        ll = -np.mean(yv * np.log(p) + (1 - yv) * np.log(1 - p))
        gain = np.array([roc_auc_score(yv[i], zv[i]) - roc_auc_score(yv[i], base[i]) for i in boots])
        lines.append(f"| ensemble, TTA {name} vs no TTA | {ll:.4f} | {np.mean((p - yv) ** 2):.4f} | {gain.mean():+.4f} "
                     f"[{np.percentile(gain, 5):+.4f}, {np.percentile(gain, 95):+.4f}] |")
    singles = [z[(i, "id", "val")] for i in range(n)]
    gain = np.array([np.mean([roc_auc_score(yv[i], base[i]) - roc_auc_score(yv[i], s[i]) for s in singles])
                     for i in boots[:300]])
    lines.append(f"| ensemble vs the mean single seed | | | {gain.mean():+.4f} [{np.percentile(gain, 5):+.4f}, "
                 f"{np.percentile(gain, 95):+.4f}] |")
    return lines


def em_prior(z: np.ndarray, train_prior: float, iters: int = 500) -> float:
    """Saerens, Latinne & Decaestecker (2002): the positive fraction of unlabelled images whose
    calibrated logits are ``z`` (fitted where the positive fraction was ``train_prior``)."""
    pi = train_prior
    for _ in range(iters):
        new = float(np.mean(sigmoid(z + logit(np.array([pi]))[0] - logit(np.array([train_prior]))[0])))
        if abs(new - pi) < 1e-10:
            break
        pi = new
    return pi


def shift_rows(y: dict, z: dict, n: int) -> list[str]:
    yv, yt = (np.asarray(y[s]).astype(int) for s in ("val", "test"))
    prior = float(yv.mean())
    lines = []
    for i in range(n + 1):
        if i < n:
            zv, zt, name = z[(i, "id", "val")], z[(i, "id", "test")], f"seed #{i + 1}"
        else:
            zv = np.mean([z[(k, "id", "val")] for k in range(n)], axis=0)
            zt = np.mean([z[(k, "id", "test")] for k in range(n)], axis=0)
            a, b = fit_platt(yv, zv)
            zv, zt, name = a * zv + b, a * zt + b, "ensemble"
        ece = lambda w: compute_calibration(yt, sigmoid(w))[1]  # noqa: E731
        em = em_prior(zt, prior)
        shift = lambda p: float(logit(np.array([p]))[0] - logit(np.array([prior]))[0])  # noqa: E731
        a, b = fit_platt(yt, zt)
        lines.append(
            f"| {name} | {np.median(zv[yv == 0]):.2f} / {np.median(zt[yt == 0]):.2f} | "
            f"{np.median(zv[yv == 1]):.2f} / {np.median(zt[yt == 1]):.2f} | "
            f"{(sigmoid(zv[yv == 0]) > 0.9).mean():.3f} / {(sigmoid(zt[yt == 0]) > 0.9).mean():.3f} | "
            f"{compute_calibration(yv, sigmoid(zv))[1]:.4f} / {ece(zt):.4f} | {em:.3f} | {ece(zt + shift(em)):.4f} | "
            f"{ece(zt + shift(float(yt.mean()))):.4f} | {ece(a * zt + b):.4f} (a {a:.2f}, b {b:+.2f}) |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("projects", type=Path, nargs="+", help="trained seed projects (seeds.py's seeds/seed-N)")
    args = parser.parse_args(argv)
    y, z = logits(args.projects)
    n = len(args.projects)
    print("| candidate | val AUC | val ECE | test AUC | test accuracy | sens | spec | test ECE |\n|---|---|---|---|---|---|---|---|")
    for name, f in candidates(y, z, n):
        sd = f" +- {f['test_auc_sd']:.4f}" if "test_auc_sd" in f else ""
        print(f"| {name} | {f['val_auc']:.4f} | {f['val_ece']:.4f} | {f['test_auc']:.4f}{sd} | {f['acc']:.4f} | "
              f"{f['sens']:.3f} | {f['spec']:.3f} | {f['test_ece']:.4f} |")
    print("\n| val only | val log-loss | val Brier | val AUC gain [90 % paired bootstrap] |\n|---|---|---|---|")
    print("\n".join(val_evidence(y, z, n)))
    print("\n| model | median logit, normal: val / test | pneumonia: val / test | normal above 0.9: val / test "
          "| ECE val / test | EM prior from unlabelled test images | test ECE, EM prior shift "
          "| test ECE, true test prior (oracle) | test ECE, Platt on test (oracle) |\n|---|---|---|---|---|---|---|---|---|")
    print("\n".join(shift_rows(y, z, n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
