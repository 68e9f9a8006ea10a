"""inference: a saved Keras model's probabilities, and the decision threshold it answers with.

Shared by the stages that run a trained model (train on val, evaluate, explain, export's parity
check); TensorFlow is imported only inside the functions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medops.config import EvaluateConfig
from medops.paths import read_json


def predict_probabilities(model, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """The model's sigmoid outputs for ``images``, shape (n,)."""
    from medops.learn.input_pipeline import build_input_pipeline

    ds = build_input_pipeline(images, None, batch_size=batch_size, training=False)
    return np.asarray(model.predict(ds, verbose=0), dtype=np.float64).reshape(-1)


def load_model(path: Path):
    """The Keras model saved at ``path``, uncompiled (for inference only)."""
    import keras

    return keras.saving.load_model(Path(path), compile=False)


def resolve_threshold(cfg: EvaluateConfig, train_result: Path | None) -> tuple[float, str]:
    """The decision threshold and where it came from: train.json's (chosen on val) or the config's."""
    if cfg.use_train_threshold and train_result is not None:
        record = read_json(train_result, "train result")
        if record.get("decision_threshold") is not None:
            return float(record["decision_threshold"]), "train"
    return float(cfg.threshold), "config"
