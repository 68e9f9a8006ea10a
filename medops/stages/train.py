"""train: fit the configured architecture on the train split, validating on val.

The test split is never read here. Everything random is seeded from ``train.seed``
(keras.utils.set_random_seed: Python, NumPy and TensorFlow), and with ``train.deterministic``
(``medops.learn.determinism``, pinned by ``medops stage train`` before TensorFlow starts) the CPU
kernels and thread counts are too, so a rerun on the same data and params gives the same model on
any machine of a kind (benchmarks/quality/README.md: tolerance and cost).

Inputs:
    ingested_dir: ``data/ingested`` (medops.data format).
    split: ``data/split/split.csv``.
    data_version: the DVC version of the raw data the model is trained on (recorded, not read).
Outputs:
    model_out: the trained Keras model (``models/model.keras``).
    result_out: ``models/train.json``: params used, data_version, per-epoch history, split sizes,
        duration, input size, library versions.
Params (``train`` and ``augment`` sections, TrainConfig and AugmentConfig):
    model, epochs, batch_size, learning_rate, filters, dense_units, dropout, seed;
    class_weight ("none" | "balanced"), early_stopping_patience (0 = train every epoch),
    restore_best (keep the weights of the best val AUC epoch), lr_schedule ("constant" |
    "cosine"); calibration ("none" | "platt": fitted on val and folded into the output layer);
    threshold_strategy ("fixed" | "youden" | "youden_bootstrap" | "sensitivity" | "balanced") and
    target_sensitivity: how the decision threshold is chosen on val and recorded in train.json
    (``decision_threshold``, with its bootstrap ``threshold_interval``) for evaluate, export,
    gate and serving; deterministic, threads (medops.learn.determinism); strategy,
    mixed_precision, xla (medops.learn.distribute); augment.*.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel

from medops.atomic import atomic_path, crash_point, write_text
from medops.learn.input_pipeline import build_input_pipeline
from medops.config import AugmentConfig, TrainConfig
from medops.errors import MedopsError
from medops.metrics import compute_auc, select_threshold
from medops.learn.inference import predict_probabilities
from medops.learn.preview import save_augmentation_preview
from medops.data import load_split_images


class TrainResult(BaseModel):
    model: str
    data_version: str
    epochs_run: int
    n_train: int
    n_val: int
    input_size: int
    duration_s: float
    val_auc: float | None           # last epoch
    val_loss: float | None
    best_epoch: int | None = None   # 1-based epoch whose weights were kept
    best_val_auc: float | None = None
    resumed_from_epoch: int = 0     # epochs restored from a backup of an interrupted run
    tensorboard_dir: str | None = None  # this run's own TensorBoard folder
    decision_threshold: float       # chosen on val; evaluate and serving call >= it positive
    threshold_strategy: str
    # 90 % stratified-bootstrap interval of the threshold on val, as a probability of the saved model
    threshold_interval: list[float] | None = None
    calibration: dict[str, Any] | None = None  # Platt a (inverse temperature), b, folded in
    val_ece: float | None = None    # of the saved model's val probabilities
    # train.ensemble_seeds: per member its seed, best epoch, val AUC, calibration and val ECE
    members: list[dict[str, Any]] | None = None
    history: dict[str, list[float]]
    model_path: str
    result_path: str


def check_both_classes(labels: np.ndarray, split: str) -> None:
    """Raise MedopsError unless ``labels`` holds both 0 and 1 (a one-class split cannot train or
    validate a classifier, and its AUC is undefined)."""
    present = sorted({int(v) for v in np.unique(labels)})
    if present != [0, 1]:
        raise MedopsError(
            f"the {split} split has only label(s) {present} in {len(labels)} images; "
            "training needs both classes in train and val"
        )


def compute_class_weights(labels: np.ndarray, mode: str) -> dict[int, float] | None:
    """``balanced``: weight each class by n / (2 * n_class), so both contribute equally to the
    loss (PneumoniaMNIST's train split is 74 % pneumonia); ``none``: no weights."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise MedopsError(f"train.class_weight must be 'none' or 'balanced', got {mode!r}")
    labels = np.asarray(labels).astype(int)
    n = len(labels)
    return {c: float(n / (2 * max(int((labels == c).sum()), 1))) for c in (0, 1)}


def compile_model(model: Any, cfg: TrainConfig, *, steps_per_epoch: int = 1) -> Any:
    """Adam(learning_rate, optionally cosine-decayed over the run), binary cross-entropy, AUC and
    accuracy metrics."""
    import keras

    lr: Any = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            cfg.learning_rate, decay_steps=max(1, cfg.epochs * steps_per_epoch), alpha=0.01
        )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
    )
    return model


def pin_numerics(train_cfg: TrainConfig) -> Any:
    """``medops.learn.determinism.apply_determinism`` for ``train.deterministic`` and
    ``train.threads``; call before anything imports TensorFlow (``medops stage train`` does)."""
    from medops.learn.determinism import DeterminismSettings, apply_determinism

    return apply_determinism(train_cfg.deterministic, DeterminismSettings(threads=train_cfg.threads))


def numerics_record(train_cfg: TrainConfig) -> Any:
    """What this process pinned for ``train.deterministic`` (``pin_numerics``, called by
    ``medops stage train`` before TensorFlow starts); when nothing was, a record saying so. Training
    in a process that did not pin (a test or notebook calling ``run``) keeps TensorFlow's
    defaults: pinning there would reach every later user of the process."""
    from medops.learn.determinism import DeterminismRecord, applied, apply_determinism

    if not train_cfg.deterministic:
        return apply_determinism(False)
    if applied() is not None:
        return applied()
    return DeterminismRecord(
        enabled=True, complete=False,
        notes=["not pinned in this process (train in its own process, `medops stage train`, for a "
               "reproducible model)"])


def plan_for(train_cfg: TrainConfig) -> Any:
    """The distribution plan (strategy, mixed precision, XLA) for this machine and TF_CONFIG."""
    from medops.learn.distribute import plan_distribution

    return plan_distribution(strategy=train_cfg.strategy, mixed_precision=train_cfg.mixed_precision,
                             xla=train_cfg.xla)


def fit_model(
    train_cfg: TrainConfig,
    augment_cfg: AugmentConfig,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    log_dir: Path | None = None,
    plan: Any = None,
    strategy: Any = None,
    extra_callbacks: Sequence[Any] = (),
    backup_dir: Path | None = None,
    live_dir: Path | None = None,
    run_label: str | None = None,
) -> tuple[Any, dict[str, list[float]], int | None]:
    """Seed, build, compile and fit, under the distribution plan (one CPU, GPUs, or a cluster).

    ``train_cfg.batch_size`` is the global batch: results do not depend on the hardware.
    Returns the model (with the best val-AUC epoch's weights when ``restore_best``), its
    per-epoch history and the 1-based epoch whose weights it holds (None: the last).
    ``backup_dir``: back up every epoch there and resume from it (medops.learn.resume), recording
    ``run_label``; ``log_dir``: TensorBoard logs; ``live_dir``: DVCLive curves (medops.learn.tracking).
    """
    import keras

    from medops.learn.distribute import fit_under_plan
    from medops.learn.resume import training_backup
    from medops.learn.tracking import dvclive_curves
    from medops.models import build_model

    plan = plan if plan is not None else plan_for(train_cfg)
    x_train, y_train = train
    x_val, y_val = val
    steps = int(np.ceil(len(x_train) / train_cfg.batch_size))
    callbacks: list[Any] = list(extra_callbacks)  # e.g. the flow's progress lines (medops.pipeline)
    patience = train_cfg.early_stopping_patience
    stopper = None
    if patience > 0 or train_cfg.restore_best:
        # Keras restores the best weights at the end of training whether or not it stopped early.
        stopper = keras.callbacks.EarlyStopping(
            monitor="val_auc", mode="max", patience=patience if patience > 0 else train_cfg.epochs + 1,
            restore_best_weights=train_cfg.restore_best,
        )
        callbacks.append(stopper)
    backup = training_backup(backup_dir, stopper=stopper, run_name=run_label) if backup_dir else None
    if log_dir is not None:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(log_dir), histogram_freq=0))
    if live_dir is not None:
        callbacks.append(dvclive_curves(live_dir, backup=backup))
    outcome = fit_under_plan(
        plan,
        lambda: build_model(train_cfg.model, train_cfg, x_train.shape[1:]),
        lambda batch: build_input_pipeline(x_train, y_train, batch_size=batch, training=True,
                                           augment_cfg=augment_cfg, seed=train_cfg.seed),
        validation_fn=lambda batch: build_input_pipeline(x_val, y_val, batch_size=max(batch, 256),
                                                         training=False),
        compile_fn=lambda model: compile_model(model, train_cfg, steps_per_epoch=steps),
        global_batch_size=train_cfg.batch_size, epochs=train_cfg.epochs,
        seed=train_cfg.seed, callbacks=callbacks,
        class_weight=compute_class_weights(y_train, train_cfg.class_weight),
        strategy=strategy, backup=backup,
    )
    best = None
    if stopper is not None and train_cfg.restore_best and stopper.best_weights is not None:
        best = int(stopper.best_epoch) + 1
    return outcome.model, outcome.history, best


def fit_recipe(
    train_cfg: TrainConfig, augment_cfg: AugmentConfig, train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray], *, log_dir: Path | None = None, backup_dir: Path | None = None,
    **fit_kwargs: Any,
) -> tuple[Any, dict[str, list[float]], int | None, list[dict[str, Any]] | None]:
    """``fit_model``, or with ``train.ensemble_seeds`` one member per seed (``fit_member``: the same
    params otherwise, TensorBoard and backups in a ``seed-N`` folder of their own), combined into
    one model (``medops.learn.ensemble``). Returns the model, the history (of the last member for
    an ensemble: DVCLive keeps that member's curves), the best epoch (None for an ensemble) and
    the members' records (None for one model). The members kept for a resumed run are removed
    once the ensemble is built."""
    if not train_cfg.ensemble_seeds:
        return (*fit_model(train_cfg, augment_cfg, train, val, log_dir=log_dir, backup_dir=backup_dir,
                           **fit_kwargs), None)
    import shutil

    from medops.learn.ensemble import combine_members

    models, records, history = [], [], {}
    for seed in train_cfg.ensemble_seeds:
        sub = lambda root: Path(root) / f"seed-{seed}" if root is not None else None  # noqa: E731
        model, history, record = fit_member(train_cfg.model_copy(update={"seed": seed, "ensemble_seeds": []}),
                                            augment_cfg, train, val, log_dir=sub(log_dir),
                                            backup_dir=sub(backup_dir), **fit_kwargs)
        models.append(model)
        records.append(record)
    ensemble = combine_members(models)
    if backup_dir is not None:
        shutil.rmtree(backup_dir, ignore_errors=True)
    return ensemble, history, None, records


def fit_member(member_cfg: TrainConfig, augment_cfg: AugmentConfig, train: tuple[np.ndarray, np.ndarray],
               val: tuple[np.ndarray, np.ndarray], *, backup_dir: Path | None = None,
               **fit_kwargs: Any) -> tuple[Any, dict[str, list[float]], dict[str, Any]]:
    """One ensemble member: trained and calibrated on val (``choose_decision``); its model, history
    and record. With ``backup_dir`` the finished member is kept there (``member.keras``,
    ``member.json``), and a run resumed after an interruption loads it instead of training it
    again (an unfinished member resumes from its epoch backup, as one model does)."""
    from medops.learn.inference import load_model

    kept = Path(backup_dir) / "member.json" if backup_dir is not None else None
    if kept is not None and kept.is_file():
        record = json.loads(kept.read_text())
        return load_model(kept.with_name("member.keras")), record.pop("history"), record
    model, history, best = fit_model(member_cfg, augment_cfg, train, val, backup_dir=backup_dir, **fit_kwargs)
    record = member_record(member_cfg.seed, val[1], choose_decision(model, member_cfg, *val), best_epoch=best)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(kept.with_name("member.keras")) as tmp:
            model.save(tmp)
        write_text(kept, json.dumps({**record, "history": {k: [float(v) for v in vs] for k, vs in history.items()}}))
    return model, history, record


def member_record(seed: int, y_val: np.ndarray, decision: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What train.json says about one ensemble member: its seed, val AUC, calibration, val ECE."""
    return {"seed": seed, "val_auc": compute_auc(y_val, decision["val_scores"]),
            "calibration": decision["calibration"], "val_ece": decision["val_ece"], **extra}


def training_record(result: TrainResult, train_cfg: TrainConfig, augment_cfg: AugmentConfig, *,
                    y_train: np.ndarray, y_val: np.ndarray, plan: Any) -> dict[str, Any]:
    """What ``train.json`` holds: the result, the params used, each split's positive fraction, the
    library versions, the distribution plan, the code commit and the time it was written."""
    import keras
    import tensorflow as tf

    return {
        **result.model_dump(mode="json"),
        "params": {
            "train": train_cfg.model_dump(mode="json"),
            "augment": augment_cfg.model_dump(mode="json"),
        },
        "train_positive_fraction": float(y_train.mean()),
        "val_positive_fraction": float(y_val.mean()),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "distribution": plan.model_dump(mode="json"),
        "code_commit": code_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run(
    train_cfg: TrainConfig,
    augment_cfg: AugmentConfig,
    *,
    ingested_dir: Path,
    split: Path,
    model_out: Path,
    result_out: Path,
    data_version: str,
    log_dir: Path | None = None,
    extra_callbacks: Sequence[Any] = (),
    backup_root: Path | None = None,
    live_dir: Path | None = None,
) -> TrainResult:
    """Load train/val, fit, choose the decision threshold on val, save the model, write train.json.

    ``log_dir``: TensorBoard logs, in a folder of this run's own below it (off when None).
    ``extra_callbacks``: more Keras callbacks for ``fit`` (they must not change what is learnt).
    ``backup_root``: back up each epoch there; an interrupted run resumes (``resume_point``).
    ``live_dir``: DVCLive's folder (chief only).
    """
    from medops.learn.distribute import is_chief, make_strategy

    determinism = numerics_record(train_cfg)  # what `medops stage train` pinned (pin_numerics)
    plan = plan_for(train_cfg)
    strategy = make_strategy(plan)  # first: a multi-worker strategy must precede any other TF op

    started = time.perf_counter()
    x_train, y_train, train_rows = load_split_images(ingested_dir, split, "train")
    x_train, y_train = canonical_order(x_train, y_train, train_rows)
    x_val, y_val, val_rows = load_split_images(ingested_dir, split, "val")
    x_val, y_val = canonical_order(x_val, y_val, val_rows)  # the threshold's bootstrap too
    check_both_classes(y_train, "train")
    check_both_classes(y_val, "val")
    backup_dir, label, resumed = resume_point(train_cfg, augment_cfg, split=split, data_version=data_version,
                                              backup_root=backup_root, worker_index=plan.worker_index)
    run_log_dir = Path(log_dir) / label if log_dir is not None and is_chief(plan) else None
    model, history, best_epoch, members = fit_recipe(
        train_cfg, augment_cfg, (x_train, y_train), (x_val, y_val),
        log_dir=run_log_dir, plan=plan, strategy=strategy, extra_callbacks=extra_callbacks,
        backup_dir=backup_dir, run_label=label, live_dir=live_dir if is_chief(plan) else None,
    )
    decision = choose_decision(model, train_cfg, x_val, y_val)
    val_scores, threshold = decision.pop("val_scores"), decision.pop("threshold")
    duration = time.perf_counter() - started

    model_out, result_out = Path(model_out), Path(result_out)
    if is_chief(plan):  # in a cluster every worker trains; only the chief writes
        with atomic_path(model_out) as tmp:
            model.save(tmp)
        # what the model saw: originals beside their augmented versions, through the same pipeline
        save_augmentation_preview(x_train[:16], augment_cfg, preview_path(model_out), seed=train_cfg.seed)
    last = lambda key: history[key][-1] if history.get(key) else None  # noqa: E731
    result = TrainResult(
        model=train_cfg.model,
        data_version=data_version,
        epochs_run=len(history.get("loss", [])),
        n_train=len(x_train),
        n_val=len(x_val),
        input_size=int(x_train.shape[1]),
        duration_s=round(duration, 3),
        val_auc=last("val_auc"),
        val_loss=last("val_loss"),
        best_epoch=best_epoch,
        best_val_auc=compute_auc(y_val, val_scores),
        resumed_from_epoch=resumed,
        tensorboard_dir=str(run_log_dir) if run_log_dir is not None else None,
        decision_threshold=threshold,
        threshold_strategy=train_cfg.threshold_strategy,
        **decision, members=members,
        history=history,
        model_path=str(model_out),
        result_path=str(result_out),
    )
    if is_chief(plan):
        record = training_record(result, train_cfg, augment_cfg, y_train=y_train, y_val=y_val, plan=plan)
        record["determinism"] = determinism.model_dump(mode="json")
        crash_point("train.saved")
        write_text(result_out, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return result


def resume_point(train_cfg: TrainConfig, augment_cfg: AugmentConfig, *, split: Path, data_version: str,
                 backup_root: Path | None, worker_index: int) -> tuple[Path | None, str, int]:
    """Where this run backs up (None without ``backup_root``), its name, and the epochs it resumes
    after (0: a fresh run).

    The backup folder is keyed by the train and augment params, the data version and the split
    file's bytes (medops.learn.resume.fingerprint), so only an interrupted run of the same
    training resumes; a resumed run keeps the interrupted run's name (its TensorBoard folder).
    """
    from medops.learn.resume import backup_dir_for, file_digest, fingerprint, read_checkpoint
    from medops.learn.tracking import run_name

    if backup_root is None:
        return None, run_name(), 0
    key = fingerprint(train_cfg.model_dump(mode="json"), augment_cfg.model_dump(mode="json"),
                      data_version, file_digest(split))
    backup_dir = backup_dir_for(backup_root, key, worker_index)
    checkpoint = read_checkpoint(backup_dir)
    if checkpoint is None:
        return backup_dir, run_name(), 0
    return backup_dir, checkpoint.run_name or run_name(), checkpoint.epoch


def choose_decision(model: Any, train_cfg: TrainConfig, x_val: np.ndarray,
                    y_val: np.ndarray) -> dict[str, Any]:
    """Calibrate (``train.calibration``: Platt scaling fitted on val and folded into ``model``, in
    place) and choose the decision threshold on val (``train.threshold_strategy``), with the
    threshold's bootstrap interval and the val ECE. Returns val_scores (the saved model's),
    threshold, threshold_interval, calibration and val_ece."""
    from medops.learn.calibration import fold_calibration, model_logits
    from medops.metrics import balanced_cutpoint, compute_calibration, fit_platt, logit, threshold_interval

    a, b, calibration = 1.0, 0.0, None
    if train_cfg.calibration == "platt":
        z = model_logits(model, x_val)
        a, b = fit_platt(y_val, z)
        fold_calibration(model, a, b)
        calibration = {"method": "platt", "a": a, "b": b, "temperature": 1 / a}
    val_scores = predict_probabilities(model, x_val)
    if train_cfg.calibration != "platt":
        z = logit(val_scores)
    if train_cfg.threshold_strategy == "balanced":
        threshold = float(1 / (1 + np.exp(-(a * balanced_cutpoint(y_val, z)[2] + b))))  # = val prior
    else:
        threshold = select_threshold(y_val, val_scores, train_cfg.threshold_strategy,
                                     target_sensitivity=train_cfg.target_sensitivity, seed=train_cfg.seed)
    lo, hi = threshold_interval(y_val, z, train_cfg.threshold_strategy, a=a, b=b, seed=train_cfg.seed)
    return {"val_scores": val_scores, "threshold": threshold, "threshold_interval": [lo, hi],
            "calibration": calibration, "val_ece": compute_calibration(y_val, val_scores)[1]}


def combine_saved(
    train_cfg: TrainConfig, augment_cfg: AugmentConfig, *, members: Sequence[Path], ingested_dir: Path,
    split: Path, model_out: Path, result_out: Path, data_version: str,
) -> TrainResult:
    """The ``train.ensemble_seeds`` model from members trained already (each ``model.keras`` beside
    its ``train.json``, calibrated on val as ``fit_recipe`` calibrates a member): combined, then
    calibrated and thresholded on val (``choose_decision``) and saved as ``run`` saves a model.
    What ``benchmarks/quality/seeds.py`` serves from its seed projects without training again."""
    from medops.learn.ensemble import combine_members
    from medops.learn.inference import load_model
    from medops.paths import read_json

    started = time.perf_counter()
    _, y_train, _ = load_split_images(ingested_dir, split, "train")
    x_val, y_val, val_rows = load_split_images(ingested_dir, split, "val")
    x_val, y_val = canonical_order(x_val, y_val, val_rows)
    records = []
    for path in members:
        rec = read_json(Path(path).with_name("train.json"), "ensemble member's train result")
        records.append({"seed": rec["params"]["train"]["seed"], "val_auc": rec.get("best_val_auc"),
                        "calibration": rec.get("calibration"), "val_ece": rec.get("val_ece"),
                        "best_epoch": rec.get("best_epoch"), "duration_s": rec.get("duration_s"),
                        "data_version": rec.get("data_version"), "code_commit": rec.get("code_commit")})
    model = combine_members([load_model(p) for p in members])
    decision = choose_decision(model, train_cfg, x_val, y_val)
    val_scores, threshold = decision.pop("val_scores"), decision.pop("threshold")
    with atomic_path(Path(model_out)) as tmp:
        model.save(tmp)
    result = TrainResult(
        model=train_cfg.model, data_version=data_version, epochs_run=0, n_train=len(y_train),
        n_val=len(y_val), input_size=int(x_val.shape[1]), duration_s=round(time.perf_counter() - started, 3),
        val_auc=None, val_loss=None, best_val_auc=compute_auc(y_val, val_scores),
        decision_threshold=threshold, threshold_strategy=train_cfg.threshold_strategy, **decision,
        members=records, history={}, model_path=str(model_out), result_path=str(result_out),
    )
    record = training_record(result, train_cfg, augment_cfg, y_train=y_train, y_val=y_val,
                             plan=plan_for(train_cfg))
    write_text(Path(result_out), json.dumps(record, indent=2, sort_keys=True) + "\n")
    return result


def canonical_order(x: np.ndarray, y: np.ndarray, rows: Any) -> tuple[np.ndarray, np.ndarray]:
    """Examples (train, and val for the threshold's bootstrap) in the order of their source
    files' content hashes.

    split.csv lists images by pseudonymous patient and SOP Instance UID, which depend on the
    de-identification key; the seeded shuffle then permutes that order, so the same data, params
    and seed would train a different model under another key (each clone makes its own). Ordered
    by ``content_sha256`` (the original file's bytes, key-free) first, a run is reproducible from
    the data, params.yaml and the seed alone.
    """
    if "content_sha256" not in getattr(rows, "columns", ()):
        return x, y
    order = np.argsort(rows["content_sha256"].to_numpy(dtype=str), kind="stable")
    return x[order], y[order]


def preview_path(model_out: Path) -> Path:
    """Where a training run saves its augmentation preview grid (beside the model)."""
    return Path(model_out).with_name("augmentation_preview.png")


def code_commit() -> str | None:
    """The git commit of the medops code that trained (with "+dirty" for uncommitted changes)."""
    import subprocess

    here = Path(__file__).resolve().parents[1]  # the medops package
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")
