"""resume: a training run that is killed resumes from its last finished epoch.

Keras' ``BackupAndRestore`` saves the model's weights and the optimizer's state (Adam's moments and
step count, so a cosine schedule goes on where it was) at the end of every epoch and, when ``fit``
starts again with a backup present, restores them and starts at the next epoch. ``TrainingBackup``
is that callback with what a medops run needs beside the weights, so that the resumed run ends
where an uninterrupted one would:

- the history of the epochs already run (Keras' own ``History`` of the second ``fit`` holds only
  the epochs it ran; train.json, the progress artifact and the DVCLive curves want them all);
- the early-stopping state (best val AUC, its epoch and weights, epochs waited), without which
  ``restore_best`` would forget a best epoch that came before the interruption;
- the random state the weights file leaves out: the dropout layers' seed generators;
- the number of epochs done, so the caller replays the input pipeline's per-epoch shuffles and
  augmentation draws (``fit_under_plan`` opens ``iterators_to_replay`` iterators, the ones Keras
  opened in the epochs already run: a ``tf.data`` dataset reshuffled on every iteration draws its
  n-th order on its n-th iterator);
- the run's name, so its TensorBoard folder goes on being the same one.

Each backup is written into a staging folder, renamed to ``epoch-NNNN`` and only then named by
the file ``latest`` (written atomically), so a process killed while writing leaves the previous
epoch's backup whole. After a finished ``fit`` the backup is deleted (Keras' ``delete_checkpoint``).

Where backups live: one folder per training configuration (``fingerprint``: params, data version,
split), so a rerun with other params or data never resumes a stale run, and one subfolder per
worker of a multi-worker cluster (``backup_dir_for``): every worker restores its own copy of the
same synchronised state. The stage keeps them under ``.medops/train-backup/`` (never versioned, and
not a DVC output, which ``dvc repro`` would delete before rerunning the stage).

Keras is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Keras 3's epoch iterator (keras/src/trainers/epoch_iterator.py) opens two iterators on a dataset
# of known length per epoch: one when the epoch starts, and one when it has seen every batch (for
# the next epoch, but the next epoch opens its own). Each draws the next of a reshuffled dataset's
# orders, so a run resumed after k epochs opens 2 k before fit (measured with Keras 3.15;
# tests/integration/test_train_resume.py fails if Keras changes this).
KERAS_ITERATORS_PER_EPOCH = 2
LATEST = "latest"
STATE_FILE = "medops_state.json"
BEST_WEIGHTS = "best_weights.npz"
RANDOM_STATE = "random_state.npz"
STOPPER_FIELDS = ("wait", "stopped_epoch", "best", "best_epoch")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of what defines a training run (JSON-serialisable parts)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path | str) -> str:
    """sha256 of a file's bytes (the split a run trains on)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def backup_dir_for(root: Path | str, run_fingerprint: str, worker_index: int = 0) -> Path:
    """``root/<fingerprint>/worker-<i>``: one backup per configuration and cluster worker."""
    return Path(root) / run_fingerprint / f"worker-{worker_index}"


@dataclass
class Checkpoint:
    """The last finished epoch's backup found on disk."""

    folder: Path
    epoch: int                                # epochs finished (the next one to run, 0-based)
    run_name: str | None
    history: dict[str, list[float]] = field(default_factory=dict)
    stopper: dict[str, Any] | None = None


def read_checkpoint(backup_dir: Path | str) -> Checkpoint | None:
    """The backup ``backup_dir`` holds, or None (none yet, or one left unfinished)."""
    backup_dir = Path(backup_dir)
    try:
        folder = backup_dir / (backup_dir / LATEST).read_text().strip()
        meta = json.loads((folder / "training_metadata.json").read_text())
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return Checkpoint(folder=folder, epoch=int(meta["epoch"]), run_name=state.get("run_name"),
                      history=state.get("history") or {}, stopper=state.get("stopper"))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _random_state(model: Any) -> list[Any]:
    """The model's variables that ``save_weights`` leaves out: seed generator states (dropout)."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def training_backup(backup_dir: Path | str, *, stopper: Any = None, run_name: str | None = None) -> Any:
    """A ``keras.callbacks.BackupAndRestore`` for ``backup_dir`` that also keeps the history, the
    early-stopping state of ``stopper`` (a keras EarlyStopping in the same ``fit``), the seed
    generators and ``run_name`` (see the module docstring).

    Put it LAST in ``fit``'s callbacks: its ``on_train_begin`` restores the stopper after the
    stopper resets itself, and its ``on_epoch_end`` saves after every other callback has seen the
    epoch. ``initial_epoch`` (epochs already done), ``run_name`` and ``history`` (every epoch,
    restored ones first) are read before ``fit``.
    """
    import keras

    class TrainingBackup(keras.callbacks.BackupAndRestore):
        def __init__(self) -> None:
            super().__init__(backup_dir=str(backup_dir), save_freq="epoch", delete_checkpoint=True)
            self.root = Path(backup_dir)
            self.checkpoint = read_checkpoint(self.root)
            self.initial_epoch = self.checkpoint.epoch if self.checkpoint else 0
            self.iterators_to_replay = KERAS_ITERATORS_PER_EPOCH * self.initial_epoch
            self.run_name = (self.checkpoint.run_name if self.checkpoint else None) or run_name
            self.history: dict[str, list[float]] = {
                k: [float(v) for v in values[: self.initial_epoch]]
                for k, values in (self.checkpoint.history if self.checkpoint else {}).items()}
            self.stopper = stopper

        def _point_at(self, folder: Path) -> None:
            self._weights_path = str(folder / "latest.weights.h5")
            self._training_metadata_path = str(folder / "training_metadata.json")

        def _load_model(self) -> None:
            if self.checkpoint is None:
                return
            self._point_at(self.checkpoint.folder)
            super()._load_model()
            folder = self.checkpoint.folder
            if (folder / RANDOM_STATE).is_file():
                with np.load(folder / RANDOM_STATE) as saved:
                    for i, variable in enumerate(_random_state(self.model)):
                        variable.assign(saved[f"v{i}"])
            if self.stopper is not None and self.checkpoint.stopper is not None:
                for name in STOPPER_FIELDS:
                    setattr(self.stopper, name, self.checkpoint.stopper[name])
                if (folder / BEST_WEIGHTS).is_file():
                    with np.load(folder / BEST_WEIGHTS) as saved:
                        self.stopper.best_weights = [saved[f"w{i}"] for i in range(len(saved.files))]

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            for key, value in (logs or {}).items():
                self.history.setdefault(key, []).append(float(value))
            super().on_epoch_end(epoch, logs)

        def _save_model(self) -> None:
            staging = self.root / ".staging"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            self._point_at(staging)
            super()._save_model()  # the weights (and optimizer state) and the epoch, into staging
            self._save_extras(staging)
            final = self.root / f"epoch-{self._current_epoch:04d}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            _write_atomically(self.root / LATEST, final.name + "\n")
            for old in self.root.glob("epoch-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)

        def _save_extras(self, folder: Path) -> None:
            state: dict[str, Any] = {"run_name": self.run_name, "history": self.history, "stopper": None}
            np.savez(folder / RANDOM_STATE,
                     **{f"v{i}": np.asarray(v) for i, v in enumerate(_random_state(self.model))})
            if self.stopper is not None:
                state["stopper"] = {name: _plain(getattr(self.stopper, name)) for name in STOPPER_FIELDS}
                if self.stopper.best_weights is not None:
                    np.savez(folder / BEST_WEIGHTS,
                             **{f"w{i}": np.asarray(w) for i, w in enumerate(self.stopper.best_weights)})
            (folder / STATE_FILE).write_text(json.dumps(state))

    return TrainingBackup()


def _plain(value: Any) -> Any:
    """A JSON-serialisable copy of an early-stopping field (numpy scalars become floats/ints)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return float(value)
