"""One training process for tests/integration/test_determinism.py (and the measurements in
benchmarks/quality/README.md): train a small medops model on PneumoniaMNIST with or without
``medops.learn.determinism`` and save its test probabilities.

The caller controls the process's environment (ONEDNN_MAX_CPU_ISA, OMP_NUM_THREADS,
TF_NUM_INTRAOP_THREADS ...) as a user's machine would; ``--deterministic on`` applies the pinned
settings first, before TensorFlow is imported, exactly as ``medops.stages.train.run`` does.

Usage: python tests/integration/_determinism_worker.py --out probs.npy [--deterministic on|off]
        [--threads N] [--model simple_cnn] [--n 512] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO.parent / "shared" / "datasets" / "pneumoniamnist.npz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deterministic", choices=("on", "off"), default="on")
    parser.add_argument("--threads", type=int, default=2, help="the pinned count (deterministic on)")
    parser.add_argument("--onednn", choices=("on", "off"), default="on", help="deterministic on only")
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--filters", default="16,32")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dataset", type=Path, default=DATASET)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from medops.learn.determinism import DeterminismSettings, apply_determinism

    record = apply_determinism(args.deterministic == "on",
                               DeterminismSettings(threads=args.threads, onednn=args.onednn == "on"))

    import numpy as np

    from medops.config import AugmentConfig, TrainConfig
    from medops.learn.inference import predict_probabilities
    from medops.stages.train import fit_model

    data = np.load(args.dataset)
    x = (data["train_images"][: args.n].astype("float32") / 255.0)[..., None]
    y = data["train_labels"][: args.n, 0].astype("float32")
    xv = (data["val_images"][:128].astype("float32") / 255.0)[..., None]
    yv = data["val_labels"][:128, 0].astype("float32")
    xt = (data["test_images"][:256].astype("float32") / 255.0)[..., None]
    cfg = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch,
                      filters=[int(f) for f in args.filters.split(",")], dense_units=32,
                      learning_rate=args.lr, class_weight="balanced", lr_schedule="cosine", restore_best=False)
    started = time.perf_counter()
    cpu_started = time.process_time()
    model, _, _ = fit_model(cfg, AugmentConfig(), (x, y), (xv, yv))
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    probs = predict_probabilities(model, xt)
    np.save(args.out, np.asarray(probs, dtype=np.float64))
    args.out.with_suffix(".json").write_text(json.dumps({
        "seconds": seconds, "cpu_seconds": cpu_seconds, "record": record.model_dump(mode="json"),
        "env": {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS",
                                               "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
