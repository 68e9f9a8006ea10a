"""Quality run: train and evaluate with benchmarks/quality/params-quality.yaml on the official split.

Usage (from the repository root, after `medops synth`, `medops stage ingest` and
`medops stage split` in PROJECT):

    .venv/bin/python benchmarks/quality/run_quality.py --project PROJECT \
        [--params benchmarks/quality/params-quality.yaml] [--set train.epochs=20 ...]

Hyper-parameters are tuned on train/val only; the test split is only reported. The script reads
the ``train`` / ``evaluate`` keys that TrainConfig / EvaluateConfig do not declare yet (see the
report) through subclasses, exactly as ``getattr(cfg, key, default)`` sees them in the stages.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml
from pydantic import create_model

from medops.config import AugmentConfig, EvaluateConfig, TrainConfig
from medops.paths import ProjectPaths

HERE = Path(__file__).resolve().parent


def section(model: type, values: dict):
    """Validate ``values`` with ``model``, adding fields for keys it does not declare yet."""
    extra = {k: (type(v) if v is not None else object, v) for k, v in values.items() if k not in model.model_fields}
    cls = create_model(f"Quality{model.__name__}", __base__=model, **extra) if extra else model
    return cls(**values)


def parse_value(text: str):
    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=HERE / "params-quality.yaml")
    parser.add_argument("--set", action="append", default=[], help="section.key=value override")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default PROJECT/quality)")
    args = parser.parse_args(argv)

    raw = yaml.safe_load(args.params.read_text())
    for item in args.set:
        key, value = item.split("=", 1)
        sec, name = key.split(".", 1)
        raw.setdefault(sec, {})[name] = parse_value(value)
    train_cfg = section(TrainConfig, raw.get("train", {}))
    augment_cfg = AugmentConfig(**raw.get("augment", {}))
    evaluate_cfg = section(EvaluateConfig, raw.get("evaluate", {}))

    from medops import evaluate, train

    paths = ProjectPaths(args.project.resolve())
    out = args.out or paths.root / "quality"
    out.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = train.run(
        train_cfg, augment_cfg, ingested_dir=paths.ingested, split=paths.split,
        model_out=out / "model.keras", result_out=out / "train.json", data_version="quality-run",
        log_dir=out / "tensorboard",
    )
    train_s = time.perf_counter() - started
    # CPU seconds of this process: on a shared, oversubscribed machine wall time overstates the
    # cost; cpu / 2 is what 2 idle cores would need at best.
    train_cpu_s = time.process_time() - cpu_started
    metrics = evaluate.run(
        evaluate_cfg, model=out / "model.keras", ingested_dir=paths.ingested, split=paths.split,
        metrics_out=out / "metrics.json", plots_dir=out / "plots", train_result=out / "train.json",
    )
    summary = {
        "train": train_cfg.model_dump(mode="json"),
        "augment": augment_cfg.model_dump(mode="json"),
        "cpu_threads": os.cpu_count(),
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu_s, 1),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "val_auc": round(result.best_val_auc or 0, 4),
        "decision_threshold": round(result.decision_threshold, 4),
        **{k: round(getattr(metrics, k), 4) for k in
           ("auc", "auc_ci_low", "auc_ci_high", "accuracy", "sensitivity", "specificity", "f1", "ece")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
