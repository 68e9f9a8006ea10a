"""make quality: the normal medops pipeline with the quality settings, on the DICOM studies made
from PneumoniaMNIST, ending with the model deployed to Triton through the normal gate.

1. the quality settings (params-quality.yaml, plus any ``--set section.key=value``) are written
   into the project's params.yaml, so dvc.lock records what was used;
2. the full demo dataset is generated if it is missing or is a subset (official splits kept in
   the manifest, which the split stage honours: patients never cross splits);
3. the Prefect server and Triton are started (reused when running), and the training-pipeline
   flow runs: DVC reproduces ingest -> quality -> split -> train -> evaluate -> explain -> gate ->
   export, and the deploy task loads the model into Triton if the gate passed;
4. the test-split AUC and accuracy are printed beside the MedMNIST v2 paper's table.

The validation split is for model selection only; the test split is only reported here.

Usage: .venv/bin/python benchmarks/quality/run_quality.py [--params FILE] [--set train.epochs=20]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import yaml

from medops.config import update_params_file
from medops.results import read_decision
from medops.paths import ProjectPaths, read_json

HERE = Path(__file__).resolve().parent
FULL_DATASET_IMAGES = 5856  # 4,708 train + 524 val + 624 test
TARGET = {"auc": 0.97, "accuracy": 0.90, "train_minutes": 15.0}
PAPER = [  # MedMNIST v2 (Yang et al., Scientific Data 2023), PneumoniaMNIST test split
    ("ResNet-18 (28 px)", 0.944, 0.854),
    ("ResNet-50 (224 px)", 0.962, 0.884),
    ("Google AutoML Vision", 0.991, 0.946),
]


def read_overrides(params_file: Path, sets: list[str]) -> dict[str, dict]:
    overrides = {k: dict(v) for k, v in (yaml.safe_load(params_file.read_text()) or {}).items()}
    for item in sets:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    return overrides


def manifest_rows(paths: ProjectPaths, export: Path) -> int:
    try:
        with (export / "labels.csv").open() as fh:
            return sum(1 for _ in csv.DictReader(fh))
    except OSError:
        return 0


def comparison_table(metrics: dict, train: dict) -> str:
    # per seed: a seed ensemble (train.ensemble_seeds) trains its members one after another
    members = max(1, len(train.get("members") or []))
    minutes = float(train.get("duration_s", 0.0)) / 60 / members
    rows = [
        "| model | test AUC | test ACC |",
        "|---|---|---|",
        *[f"| {name} | {auc:.3f} | {acc:.3f} |" for name, auc, acc in PAPER],
        f"| **medops {train.get('model')}**{f' x {members} seeds' if members > 1 else ''} (28 px, "
        f"{minutes:.1f} min per seed on this machine) | "
        f"**{metrics['auc']:.4f}** [{metrics.get('auc_ci_low', float('nan')):.3f}, "
        f"{metrics.get('auc_ci_high', float('nan')):.3f}] | **{metrics['accuracy']:.4f}** |",
    ]
    checks = [
        ("test AUC", metrics["auc"], ">=", TARGET["auc"], metrics["auc"] >= TARGET["auc"]),
        ("test ACC", metrics["accuracy"], ">=", TARGET["accuracy"], metrics["accuracy"] >= TARGET["accuracy"]),
        ("training min/seed", minutes, "<=", TARGET["train_minutes"], minutes <= TARGET["train_minutes"]),
    ]
    rows += ["", *[f"{name:17s} {value:8.4f} {op} {target:<6} {'PASS' if ok else 'FAIL'}"
                   for name, value, op, target, ok in checks]]
    rows.append(f"sensitivity {metrics.get('sensitivity', float('nan')):.4f}, specificity "
                f"{metrics.get('specificity', float('nan')):.4f}, decision threshold "
                f"{train.get('decision_threshold')} chosen on val ({train.get('threshold_strategy')})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="project root (default: this repository)")
    parser.add_argument("--params", type=Path, default=HERE / "params-quality.yaml")
    parser.add_argument("--set", action="append", default=[], help="section.key=value override")
    args = parser.parse_args(argv)

    from medops.ops.demo import ensure_export, run_flow, start_services

    paths = ProjectPaths.discover(args.project)
    params = update_params_file(paths.params, read_overrides(args.params, args.set))
    export = paths.export(params.ingest.source)
    if params.synth.max_images_per_split is None and 0 < manifest_rows(paths, export) < FULL_DATASET_IMAGES:
        print(f"{export} holds a subset ({manifest_rows(paths, export)} images): regenerating the full dataset")
        shutil.rmtree(export)
    ensure_export(paths, params)
    for line in start_services(paths, params):
        print(line, flush=True)
    run_flow(paths, params, "ingest-studies")
    run_flow(paths, params, "training-pipeline")

    metrics = read_json(paths.metrics, "metrics")
    train = read_json(paths.train_result, "train result")
    gate = read_decision(paths.gate)
    print("\nPneumoniaMNIST, official test split (624 images):\n")
    print(comparison_table(metrics, train))
    print(f"\ngate: {'passed' if gate.passed else 'REJECTED'}; "
          + ("deployed to Triton" if gate.passed else "not deployed") + f" ({paths.gate})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
