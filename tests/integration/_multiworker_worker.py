"""One training process for the distribution tests: plan, (strategy), fit a small simple_cnn on the
bundled PneumoniaMNIST, and (chief only) write the trained weights and probe predictions.

Run in a fresh interpreter per process, because MirroredStrategy over logical CPUs must configure
them before TensorFlow initialises its devices, and MultiWorkerMirroredStrategy must be created
before any other op. TF_CONFIG, when set, comes from the environment as in a real cluster.

    python _multiworker_worker.py --strategy {default,mirrored,multi_worker} --out DIR
        [--n 256] [--batch 32] [--epochs 2] [--lr 0.05] [--seed 7] [--mixed-precision auto|on|off]

Writes DIR/result.npz (weights w0..wK, ``initial`` weights i0..iK, ``probe`` predictions on the
first --probe val images) and DIR/result.json (plan, history, chief, output dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--probe", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--mixed-precision", default="off")
    args = parser.parse_args(argv)

    from medops import distribute

    # No GPU in these tests (and on a GPU machine we still want the CPU code path they check).
    plan = distribute.plan_distribution(
        strategy=args.strategy, mixed_precision=args.mixed_precision, xla="off", gpus=[]
    )
    strategy = distribute.make_strategy(plan)  # first TensorFlow work in this process

    import keras
    import numpy as np
    import tensorflow as tf

    from medops.config import TrainConfig
    from medops.models import build_model
    from medops.paths import BUNDLED_DATASET

    with np.load(BUNDLED_DATASET) as data:
        x = (data["train_images"][: args.n].astype(np.float32) / 255.0)[..., None]
        y = data["train_labels"][: args.n].astype(np.float32).reshape(-1, 1)
        probe = (data["val_images"][: args.probe].astype(np.float32) / 255.0)[..., None]
        probe_y = data["val_labels"][: args.probe].astype(np.float32).reshape(-1, 1)

    cfg = TrainConfig(filters=[8, 16], dense_units=16, dropout=0.0, seed=args.seed)
    initial: list[np.ndarray] = []

    def build() -> keras.Model:
        model = build_model("simple_cnn", cfg, x.shape[1:])
        initial.extend(np.array(w) for w in model.get_weights())
        return model

    def dataset(global_batch: int) -> tf.data.Dataset:
        # fixed order, no augmentation: the single-device and distributed runs see the same batches
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)

    def compile_sgd(model: keras.Model) -> None:
        # plain SGD: the update is linear in the gradient, so summation-order differences stay
        # at float32 rounding instead of being amplified by Adam's 1/sqrt(v) for small gradients
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=args.lr),
                      loss=keras.losses.BinaryCrossentropy())

    def validation(global_batch: int) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((probe, probe_y)).batch(global_batch)

    outcome = distribute.fit_under_plan(
        plan, build, dataset, global_batch_size=args.batch, epochs=args.epochs,
        learning_rate=args.lr, seed=args.seed, compile_fn=compile_sgd, strategy=strategy,
        validation_fn=validation,
    )
    model = outcome.model
    weights = [np.array(w) for w in model.get_weights()]
    # predict on a plain copy outside the strategy: predictions need no cross-worker collectives
    plain = keras.models.clone_model(model)
    plain.set_weights(weights)
    predictions = plain.predict(probe, verbose=0, batch_size=args.probe)

    info = {
        "plan": plan.model_dump(mode="json"),
        "chief": distribute.is_chief(plan),
        "replicas_in_sync": strategy.num_replicas_in_sync,
        "history": outcome.history,
        "output_dtype": str(model.outputs[0].dtype),
        "prediction_dtype": str(predictions.dtype),
        "policy_after": keras.mixed_precision.global_policy().name,
        "pid": os.getpid(),
    }
    if distribute.is_chief(plan):
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(
            args.out / "result.npz",
            probe=predictions.astype(np.float32),
            **{f"w{i}": w for i, w in enumerate(weights)},
            **{f"i{i}": w for i, w in enumerate(initial)},
        )
        (args.out / "result.json").write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
