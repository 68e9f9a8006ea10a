"""train: fit the configured architecture on the train split, validating on val.

The test split is never read here. Everything random is seeded from ``train.seed``
(keras.utils.set_random_seed: Python, NumPy and TensorFlow), so a rerun on the same data and params
gives the same model up to CPU floating-point order.

Inputs:
    ingested_dir: ``data/ingested`` (medops.data format).
    split: ``data/split/split.csv``.
    data_version: the DVC version of the raw data the model is trained on (recorded, not read).
Outputs:
    model_out: the trained Keras model (``models/model.keras``).
    result_out: ``models/train.json``: params used, data_version, per-epoch history, split sizes,
        duration, input size, library versions.
Params (``train`` and ``augment`` sections, TrainConfig and AugmentConfig):
    model, epochs, batch_size, learning_rate, filters, dense_units, dropout, seed; augment.*.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from medops.augment import make_dataset
from medops.config import AugmentConfig, TrainConfig
from medops.errors import MedopsError
from medops.split import load_split_images


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


def compile_model(model: Any, cfg: TrainConfig) -> Any:
    """Adam(learning_rate), binary cross-entropy, AUC and accuracy metrics."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=cfg.learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
    )
    return model


def fit_model(
    train_cfg: TrainConfig,
    augment_cfg: AugmentConfig,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
) -> tuple[Any, dict[str, list[float]]]:
    """Seed, build, compile and fit; returns the model and its per-epoch history."""
    import keras

    from medops.models import build_model

    keras.utils.set_random_seed(train_cfg.seed)
    x_train, y_train = train
    x_val, y_val = val
    model = compile_model(build_model(train_cfg.model, train_cfg, x_train.shape[1:]), train_cfg)
    train_ds = make_dataset(
        x_train, y_train, batch_size=train_cfg.batch_size, training=True,
        augment_cfg=augment_cfg, seed=train_cfg.seed,
    )
    val_ds = make_dataset(x_val, y_val, batch_size=max(train_cfg.batch_size, 256), training=False)
    fit = model.fit(train_ds, validation_data=val_ds, epochs=train_cfg.epochs, shuffle=False, verbose=0)
    history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    return model, history


def run(
    train_cfg: TrainConfig,
    augment_cfg: AugmentConfig,
    *,
    ingested_dir: Path,
    split: Path,
    model_out: Path,
    result_out: Path,
    data_version: str,
) -> TrainResult:
    """Load train/val, fit, save the model and write train.json."""
    import keras
    import tensorflow as tf

    started = time.perf_counter()
    x_train, y_train, _ = load_split_images(ingested_dir, split, "train")
    x_val, y_val, _ = load_split_images(ingested_dir, split, "val")
    check_both_classes(y_train, "train")
    check_both_classes(y_val, "val")
    model, history = fit_model(train_cfg, augment_cfg, (x_train, y_train), (x_val, y_val))
    duration = time.perf_counter() - started

    model_out, result_out = Path(model_out), Path(result_out)
    model_out.parent.mkdir(parents=True, exist_ok=True)
    model.save(model_out)
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
        history=history,
        model_path=str(model_out),
        result_path=str(result_out),
    )
    record = {
        **result.model_dump(mode="json"),
        "params": {"train": train_cfg.model_dump(mode="json"), "augment": augment_cfg.model_dump(mode="json")},
        "train_positive_fraction": float(y_train.mean()),
        "val_positive_fraction": float(y_val.mean()),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    result_out.parent.mkdir(parents=True, exist_ok=True)
    result_out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return result
