"""One training process for the distribution tests: plan, (strategy), fit a small simple_cnn on the
bundled PneumoniaMNIST, and (chief only) write the trained weights and probe predictions.

Run in a fresh interpreter per process, because MirroredStrategy over logical CPUs must configure
them before TensorFlow initialises its devices, and MultiWorkerMirroredStrategy must be created
before any other op. TF_CONFIG, when set, comes from the environment as in a real cluster.

    python _multiworker_worker.py --strategy {default,mirrored,multi_worker} --out DIR
        [--n 256] [--batch 32] [--epochs 3] [--lr 0.3] [--seed 7] [--mixed-precision auto|on|off]
        [--pipeline plain|medops] [--dtype float32|float64] [--backup DIR [--die-at-epoch K]]

Writes DIR/result.npz (weights w0..wK, ``initial`` weights i0..iK, ``probe`` predictions on the
first --probe val images) and DIR/result.json (plan, history, chief, output dtype).

The tests import this file for ``run_workers`` (start processes, bounded in time, none left
behind) and ``assert_matches_single_device``; importing it imports neither TensorFlow nor medops.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKER = Path(__file__).resolve()
REPO = WORKER.parents[2]

# Tolerance for distributed vs single-device training, and why the parity runs compute in float64.
# Both runs compute the same SGD steps on the same batches (the same seeded shuffles and
# augmentation draws: see fit_under_plan); only the summation order differs (each replica sums its
# part of the global batch, then the replicas' gradients are summed). In float32 that is a few ulp
# (~1e-8) per step, but 24 steps at learning rate 0.3 amplify it chaotically (a ReLU that flips):
# measured on one 2-core machine with an AVX-512/AMX CPU, single vs mirrored differed by 2e-8
# after 2 steps and by 9.5e-3 after 24 with oneDNN on, 1e-7 with oneDNN off, and 1.8e-2 with oneDNN
# off but its kernels capped at AVX2 (ONEDNN_MAX_CPU_ISA) -- the Eigen contraction kernel still
# calls oneDNN's sgemm, which picks its blocking by the CPU. No float32 tolerance separates that
# noise from a real bug (a wrong loss scale or an unsplit batch: ~7e-2) on every CPU.
# So the parity runs build the model in float64 (--dtype float64: Keras policy "float64", which
# oneDNN does not implement, so Eigen runs it on any CPU): the same 24 steps differ by ~1e-13 and
# amplification cannot bring rounding near ATOL, while the bugs above still miss it by 100x.
# The product's float32 path is the same code (fit_under_plan builds under whatever policy is set).
ATOL = 1e-6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--probe", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--mixed-precision", default="off")
    parser.add_argument(
        "--pipeline", choices=("plain", "medops"), default="plain",
        help="plain: the subset in order; medops: medops.learn.input_pipeline.build_input_pipeline "
        "with seeded shuffling and the default augmentation, as training uses it",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32",
        help="the Keras dtype policy the model is built under (float64: parity runs, see ATOL)",
    )
    parser.add_argument("--backup", type=Path, default=None,
                        help="back up every epoch into DIR/worker-N and resume from it (medops.learn.resume)")
    parser.add_argument("--die-at-epoch", type=int, default=None,
                        help="SIGKILL this process when epoch K (0-based) begins, epochs < K backed up")
    args = parser.parse_args(argv)

    from medops.learn import distribute
    # No GPU in these tests (and on a GPU machine we still want the CPU code path they check).
    plan = distribute.plan_distribution(
        strategy=args.strategy, mixed_precision=args.mixed_precision, xla="off", gpus=[]
    )
    strategy = distribute.make_strategy(plan)  # first TensorFlow work in this process

    import keras
    import numpy as np
    import tensorflow as tf

    from medops.learn.input_pipeline import build_input_pipeline
    from medops.config import AugmentConfig, TrainConfig
    from medops.models import build_model
    from medops.paths import BUNDLED_DATASET

    with np.load(BUNDLED_DATASET) as data:
        # the bundled train split starts with hundreds of pneumonia images in a row: take the first
        # n/2 of each class, alternating, so every batch holds both
        labels = data["train_labels"].ravel()
        half = args.n // 2
        pick = np.stack([np.flatnonzero(labels == 0)[:half], np.flatnonzero(labels == 1)[:half]], 1).ravel()
        x = (data["train_images"][pick].astype(np.float32) / 255.0)[..., None]
        y = labels[pick].astype(np.float32).reshape(-1, 1)
        probe = (data["val_images"][: args.probe].astype(np.float32) / 255.0)[..., None]
        probe_y = data["val_labels"][: args.probe].astype(np.float32).reshape(-1, 1)

    cfg = TrainConfig(filters=[8, 16], dense_units=16, dropout=0.0, seed=args.seed)
    initial: list[np.ndarray] = []

    def build() -> keras.Model:
        if args.dtype == "float64":  # fit_under_plan set the plan's float32 policy just before
            keras.mixed_precision.set_global_policy("float64")
        model = build_model("simple_cnn", cfg, x.shape[1:])
        initial.extend(np.array(w) for w in model.get_weights())
        return model

    def dataset(global_batch: int) -> tf.data.Dataset:
        if args.pipeline == "medops":
            # seeded shuffle + stateless per-image augmentation seeds: every process draws the same
            return build_input_pipeline(x, y, batch_size=global_batch, training=True,
                                augment_cfg=AugmentConfig(), seed=args.seed)
        # fixed order, no augmentation: the single-device and distributed runs see the same batches
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)

    def compile_sgd(model: keras.Model) -> None:
        # plain SGD: the update is linear in the gradient, so summation-order differences stay
        # at float32 rounding instead of being amplified by Adam's 1/sqrt(v) for small gradients
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=args.lr),
                      loss=keras.losses.BinaryCrossentropy())

    def validation(global_batch: int) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((probe, probe_y)).batch(global_batch)

    backup = None
    if args.backup is not None:
        from medops.learn.resume import training_backup

        backup = training_backup(args.backup / f"worker-{plan.worker_index}")
    die_at = args.die_at_epoch

    class Die(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            if epoch == die_at:
                os.kill(os.getpid(), 9)  # as a lost node: no clean-up, no Python exit handlers

    outcome = distribute.fit_under_plan(
        plan, build, dataset, global_batch_size=args.batch, epochs=args.epochs,
        seed=args.seed, compile_fn=compile_sgd, strategy=strategy,
        validation_fn=validation, callbacks=[Die()] if die_at is not None else [], backup=backup,
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
        "resumed_from_epoch": backup.initial_epoch if backup is not None else 0,
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


def run_workers(runs: dict[str, tuple[list[str], dict[str, str]]], out: Path, *, timeout: float,
                expected_rc: int = 0) -> None:
    """Start one worker process per run at once, wait for all (killing every one on a timeout or a
    failure, so no process outlives the test), and fail with the failing run's log tail unless
    each exits ``expected_rc`` (-9: killed by SIGKILL)."""
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    try:
        for name, (args, extra_env) in runs.items():
            logs[name] = out / f"{name}.log"
            # a TF_CONFIG of the caller's never leaks into a run that does not set its own
            env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
            env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1", **extra_env})
            with open(logs[name], "w") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, str(WORKER), *args], stdout=log, stderr=subprocess.STDOUT,
                    env=env, cwd=REPO,
                )
        for name, proc in procs.items():
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"worker {name} did not finish in {timeout} s:\n{logs[name].read_text()[-3000:]}"
                ) from None
            assert rc == expected_rc, f"worker {name} exited {rc}:\n{logs[name].read_text()[-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def load_result(folder: Path) -> tuple[dict[str, Any], dict]:
    import numpy as np

    with np.load(folder / "result.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads((folder / "result.json").read_text())


def assert_matches_single_device(reference: Path, distributed: Path, *, atol: float = ATOL) -> dict:
    """Same initial weights, trained weights and probe predictions within ``atol``; the model moved
    far more than ``atol`` from its initial weights (a model that did not train would match too).
    Returns the distributed run's result.json."""
    import numpy as np

    ref, ref_info = load_result(reference)
    dist, info = load_result(distributed)
    weights = sorted(k for k in ref if k.startswith("w"))
    assert weights and weights == sorted(k for k in dist if k.startswith("w"))
    for k in weights:
        i = "i" + k[1:]
        np.testing.assert_array_equal(dist[i], ref[i], err_msg=f"initial {k} differs: not the same seed")
        np.testing.assert_allclose(dist[k], ref[k], rtol=0, atol=atol, err_msg=f"trained {k}")
    moved = max(float(np.abs(ref[k] - ref["i" + k[1:]]).max()) for k in weights)
    assert moved > 100 * atol, f"training moved the weights by only {moved}"
    np.testing.assert_allclose(dist["probe"], ref["probe"], rtol=0, atol=atol)
    assert float(ref["probe"].std()) > 100 * atol  # predictions are not all the same number
    for key, values in ref_info["history"].items():
        np.testing.assert_allclose(info["history"][key], values, rtol=1e-4, err_msg=key)
    return info


if __name__ == "__main__":
    sys.exit(main())
