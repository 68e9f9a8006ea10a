"""make quality: the quality recipe trained with several seeds through the normal pipeline stages,
each evaluated on the official test split through its exported (served) ONNX model, reported per
seed and as mean +- sd.

For each seed N, ``<project>/seeds/seed-N`` is a project of its own: the prepared project's
de-identified data (``data/ingested``, hard-linked, with its ``.dvc`` file) and split, and a
params.yaml with the quality settings (params-quality.yaml, any ``--set``) and ``train.seed: N``.
The stages run as ``dvc repro`` runs them, one fresh process each: ``medops stage train``,
``evaluate``, ``export`` (ONNX, parity-checked against Keras), ``gate``. The served model is the
ONNX file that deploy copies into Triton's repository; it is scored here with onnxruntime (Triton's
ONNX backend) on the test split at the threshold train.json records, and those are the figures
reported (``metrics.json`` from evaluate, the Keras model, is kept beside them).

Usage (``make quality``; the project folder is prepared on the first run, about 2 min):
    .venv/bin/python benchmarks/quality/seeds.py [--project DIR] [--seeds 1 2 3 4 5] [--set train.epochs=20]
Writes ``<project>/seeds/summary.json`` and ``summary.md`` (the table in README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {"seed_auc": 0.97, "seed_accuracy": 0.90, "mean_auc": 0.98, "ece": 0.03, "train_minutes": 15.0}
STAGES = ("train", "ood", "evaluate", "export", "gate")
ENSEMBLE_STAGES = ("ood", "evaluate", "export", "gate")  # after combining the trained seeds' models
COLUMNS = ("auc", "accuracy", "sensitivity", "specificity", "ece", "threshold")


def read_overrides(params_file: Path, sets: list[str]) -> dict[str, dict]:
    overrides = {k: dict(v) for k, v in (yaml.safe_load(params_file.read_text()) or {}).items()}
    for item in sets:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    return overrides


def prepare(project: Path, overrides: dict[str, dict]) -> None:
    """The project's data, once (skipped when it is there): the full PneumoniaMNIST DICOM export
    (``medops synth``), ``medops ingest``, the data-quality and split stages (the official split),
    and ``data/ingested`` tracked by DVC (its hash is the data version train.json records). The
    de-identification key does not change the model (train orders images by content hash)."""
    if (project / "data" / "ingested.dvc").is_file() and (project / "data" / "split" / "split.csv").is_file():
        return
    project.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MEDOPS_DEID_KEY": os.environ.get("MEDOPS_DEID_KEY") or secrets.token_hex(16)}
    medops = [sys.executable, "-m", "medops", "--project", str(project)]
    for step in (["synth"], ["ingest"], ["stage", "quality"], ["stage", "split"]):
        print("prepare:", "medops", *step, flush=True)
        subprocess.run([*medops, *step], cwd=REPO, env=env, check=True)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q"], cwd=project, check=True)
    subprocess.run([*dvc, "add", "-q", "data/ingested"], cwd=project, check=True)


def linked_project(source: Path, root: Path, overrides: dict[str, dict], train: dict) -> Path:
    """A fresh project at ``root``: ``source``'s data (hard links) and its params.yaml with the
    overrides and then ``train`` applied."""
    if root.exists():
        shutil.rmtree(root)
    (root / "data").mkdir(parents=True)
    for name in ("ingested", "split"):
        shutil.copytree(source / "data" / name, root / "data" / name, copy_function=os.link)
    shutil.copy2(source / "data" / "ingested.dvc", root / "data" / "ingested.dvc")
    params = yaml.safe_load((source / "params.yaml").read_text())
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    params["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def seed_project(project: Path, seed: int, overrides: dict[str, dict]) -> Path:
    """``project/seeds/seed-N``: the prepared data and the seed's params.yaml (one model: the
    seed is a member of the recipe's ensemble, trained on its own)."""
    return linked_project(project, project / "seeds" / f"seed-{seed}", overrides,
                          {"seed": seed, "ensemble_seeds": []})


class LoadSampler:
    """The 1-minute load average, sampled every ``every`` seconds while a stage runs."""

    def __init__(self, every: float = 10.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(float(Path("/proc/loadavg").read_text().split()[0]))
            self._stop.wait(every)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_stage(root: Path, stage: str) -> dict[str, float]:
    """``medops --project root stage NAME`` in a fresh process; its wall and CPU seconds and the
    load average while it ran."""
    return run_command(root, stage, [sys.executable, "-m", "medops", "--project", str(root), "stage", stage])


def run_command(root: Path, stage: str, command: list[str]) -> dict[str, float]:
    """``command`` in a fresh process for project ``root`` (log ``root/STAGE.log``), timed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with LoadSampler() as load:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (root / f"{stage}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"seed project {root}: stage {stage} failed (exit {proc.returncode}); "
                         f"see {root / f'{stage}.log'}")
    return {"wall_s": time.perf_counter() - started,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "load_mean": float(np.mean(load.samples)) if load.samples else float("nan"),
            "load_max": float(np.max(load.samples)) if load.samples else float("nan")}


def served_metrics(root: Path, evaluate_cfg: object, threshold: float) -> dict[str, float]:
    """The exported ONNX model scored with onnxruntime on the test split, at ``threshold``."""
    from medops.data import load_split_images
    from medops.stages.evaluate import evaluate_scores
    from medops.stages.gate import score_onnx

    images, labels, rows = load_split_images(root / "data" / "ingested", root / "data" / "split" / "split.csv",
                                             "test")
    scores = score_onnx(root / "models" / "model.onnx", images)
    metrics, *_ = evaluate_scores(evaluate_cfg, rows, labels, scores, threshold)  # type: ignore[arg-type]
    return metrics


def one_seed(project: Path, seed: int, overrides: dict[str, dict]) -> dict:
    root = seed_project(project, seed, overrides)
    timing = {stage: run_stage(root, stage) for stage in STAGES}
    return served_row(root, seed, timing)


def one_ensemble(out: Path, members: list[Path], overrides: dict[str, dict]) -> dict:
    """``out/ensemble``: the seed projects' models in ``members`` combined into one model (the mean
    of their calibrated logits, recalibrated and thresholded on val: ``medops.stages.train.
    combine_saved``, what ``train.ensemble_seeds`` trains in one project), then the ood,
    evaluate, export (one ONNX graph) and gate stages; its row as a seed's."""
    seeds = [yaml.safe_load((m / "params.yaml").read_text())["train"]["seed"] for m in members]
    root = linked_project(members[0], out / "ensemble", overrides, {"seed": seeds[0], "ensemble_seeds": seeds})
    timing = {"train": run_command(root, "combine", [sys.executable, str(Path(__file__).resolve()), "--combine",
                                                     str(root), *(str(m / "models" / "model.keras") for m in members)])}
    timing.update({stage: run_stage(root, stage) for stage in ENSEMBLE_STAGES})
    return served_row(root, "ensemble " + "+".join(map(str, seeds)), timing)


def combine(root: Path, members: list[Path]) -> int:
    """``--combine``: build the ensemble's model.keras and train.json in project ``root`` (in a
    fresh process, numerics pinned as ``medops stage train`` pins them)."""
    from medops.config import load_params
    from medops.ops.dvc import data_version
    from medops.paths import ProjectPaths
    from medops.stages.train import combine_saved, pin_numerics

    params, paths = load_params(root / "params.yaml"), ProjectPaths(root)
    pin_numerics(params.train)
    paths.keras_model.parent.mkdir(parents=True, exist_ok=True)
    combine_saved(params.train, params.augment, members=members, ingested_dir=paths.ingested, split=paths.split,
                  model_out=paths.keras_model, result_out=paths.train_result,
                  data_version=data_version(paths.root, paths.ingested))
    return 0


def served_row(root: Path, seed: int | str, timing: dict[str, dict]) -> dict:
    """One table row: the served (ONNX) model's test figures and the project's records."""
    from medops.config import load_params

    train = json.loads((root / "models" / "train.json").read_text())
    keras_metrics = json.loads((root / "reports" / "metrics.json").read_text())
    gate = json.loads((root / "reports" / "gate.json").read_text())
    served = served_metrics(root, load_params(root / "params.yaml").evaluate, train["decision_threshold"])
    row = {
        "seed": seed, **{k: served[k] for k in COLUMNS},
        "auc_ci": [served["auc_ci_low"], served["auc_ci_high"]],
        "threshold_interval": train.get("threshold_interval"), "calibration": train.get("calibration"),
        "val_auc": train.get("best_val_auc"), "val_ece": train.get("val_ece"),
        "train_s": train["duration_s"], "train_stage": timing["train"],
        "stages": timing, "keras_vs_served_auc": abs(keras_metrics["auc"] - served["auc"]),
        "gate_passed": gate["passed"], "gate_reasons": gate["reasons"],
        "determinism": train.get("determinism"), "code_commit": train.get("code_commit"),
    }
    print(f"seed {seed}: test AUC {row['auc']:.4f} [{row['auc_ci'][0]:.3f}, {row['auc_ci'][1]:.3f}], "
          f"acc {row['accuracy']:.4f}, sens {row['sensitivity']:.3f}, spec {row['specificity']:.3f}, "
          f"ECE {row['ece']:.4f}, threshold {row['threshold']:.3f}; train {row['train_s']:.0f} s "
          f"(CPU {timing['train']['cpu_s']:.0f} s, load {timing['train']['load_mean']:.1f})", flush=True)
    return row


def refresh_gate(seeds_dir: Path, row: dict) -> dict:
    """``row`` with the gate decision now in its seed project (the gate stage may have been rerun
    there with other gate params since the row was written)."""
    decision = seeds_dir / f"seed-{row['seed']}" / "reports" / "gate.json"
    if decision.is_file():
        gate = json.loads(decision.read_text())
        row = {**row, "gate_passed": gate["passed"], "gate_reasons": gate["reasons"]}
    return row


def summarise(rows: list[dict], ensemble: dict | None = None) -> dict:
    """Mean and sd (ddof=1) of each column over the seeds, and the targets checked (for the seeds,
    and for the served ensemble when there is one)."""
    stats = {k: {"mean": float(np.mean([r[k] for r in rows])),
                 "sd": float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0}
             for k in (*COLUMNS, "train_s")}
    checks = {
        "every seed AUC >= 0.97": all(r["auc"] >= TARGETS["seed_auc"] for r in rows),
        "every seed accuracy >= 0.90": all(r["accuracy"] >= TARGETS["seed_accuracy"] for r in rows),
        "mean AUC of the seeds >= 0.98": stats["auc"]["mean"] >= TARGETS["mean_auc"],
        "every seed ECE <= 0.03": all(r["ece"] <= TARGETS["ece"] for r in rows),
        "every seed trains in <= 15 min": all(r["train_s"] <= TARGETS["train_minutes"] * 60 for r in rows),
    }
    if ensemble is not None:
        checks.update({
            "served ensemble AUC >= 0.98": ensemble["auc"] >= TARGETS["mean_auc"],
            "served ensemble accuracy >= 0.90": ensemble["accuracy"] >= TARGETS["seed_accuracy"],
            "served ensemble ECE <= 0.03": ensemble["ece"] <= TARGETS["ece"],
        })
    return {"stats": stats, "targets": checks}


def table_row(r: dict) -> str:
    lo, hi = r["threshold_interval"] or (float("nan"), float("nan"))
    t = r["train_stage"]
    return (f"| {r['seed']} | {r['auc']:.4f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] | "
            f"{r['accuracy']:.4f} | {r['sensitivity']:.3f} | {r['specificity']:.3f} | {r['ece']:.4f} | "
            f"{r['threshold']:.3f} [{lo:.3f}, {hi:.3f}] | {r['train_s']:.0f} ({t['cpu_s']:.0f}, "
            f"{t['load_mean']:.1f}) | {'pass' if r['gate_passed'] else 'REFUSED'} |")


def table(rows: list[dict], summary: dict, ensemble: dict | None = None) -> str:
    lines = ["| seed | test AUC [95 % CI] | accuracy | sensitivity | specificity | ECE | threshold [val 90 % interval] "
             "| train s (CPU s, load) | gate |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [table_row(r) for r in rows]
    s = summary["stats"]
    lines.append(f"| mean +- sd | {s['auc']['mean']:.4f} +- {s['auc']['sd']:.4f} | {s['accuracy']['mean']:.4f} +- "
                 f"{s['accuracy']['sd']:.4f} | {s['sensitivity']['mean']:.3f} +- {s['sensitivity']['sd']:.3f} | "
                 f"{s['specificity']['mean']:.3f} +- {s['specificity']['sd']:.3f} | {s['ece']['mean']:.4f} +- "
                 f"{s['ece']['sd']:.4f} | {s['threshold']['mean']:.3f} +- {s['threshold']['sd']:.3f} | "
                 f"{s['train_s']['mean']:.0f} +- {s['train_s']['sd']:.0f} | |")
    if ensemble is not None:  # its "train" is the combination (the members' training is above)
        lines.append(table_row({**ensemble, "seed": f"**served: {ensemble['seed']}**"}))
    lines += ["", *[f"- {name}: {'PASS' if ok else 'FAIL'}" for name, ok in summary["targets"].items()]]
    return "\n".join(lines)


def write_summary(out: Path, rows: list[dict], ensemble: dict | None) -> str:
    summary = summarise(rows, ensemble)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"rows": rows, "ensemble": ensemble, **summary}, indent=2) + "\n")
    (out / "summary.md").write_text(table(rows, summary, ensemble) + "\n")
    return table(rows, summary, ensemble)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=REPO / ".medops" / "quality",
                        help="a folder for the data and the seed projects (prepared when empty)")
    parser.add_argument("--params", type=Path, default=HERE / "params-quality.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--set", action="append", default=[], help="section.key=value override")
    parser.add_argument("--merge", type=Path, nargs="+", default=[],
                        help="only report: the rows of these summary.json files (seeds run apart)")
    parser.add_argument("--members", type=Path, nargs="+", default=[],
                        help="with --merge: seed projects trained already, served as one ensemble (no training)")
    parser.add_argument("--no-ensemble", action="store_true", help="the seeds only, no ensemble")
    parser.add_argument("--combine", type=Path, nargs="+", help=argparse.SUPPRESS)  # ROOT MODEL...: one_ensemble
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine[0], args.combine[1:])
    overrides = read_overrides(args.params, args.set)
    if args.merge:
        rows = sorted((refresh_gate(f.parent, r) for f in args.merge for r in json.loads(f.read_text())["rows"]),
                      key=lambda r: r["seed"])
        out = args.project.resolve()
        recorded = [e for f in args.merge if (e := json.loads(f.read_text()).get("ensemble"))]
        ensemble = one_ensemble(out, [m.resolve() for m in args.members], overrides) if args.members else \
            (recorded[0] if recorded else None)
        print(write_summary(out, rows, ensemble))
        return 0
    project = args.project.resolve()
    prepare(project, overrides)
    out = project / "seeds"
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(project, seed, overrides))
        write_summary(out, rows, None)
    ensemble = None
    if len(rows) > 1 and not args.no_ensemble:
        ensemble = one_ensemble(out, [out / f"seed-{seed}" for seed in args.seeds], overrides)
    print("\n" + write_summary(out, rows, ensemble))
    return 0


if __name__ == "__main__":
    sys.exit(main())
