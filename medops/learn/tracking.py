"""tracking: per-epoch training curves where the tools users know look for them.

- **DVCLive** (DVC's own logger): ``dvclive_curves`` writes ``dvclive/metrics.json`` (the last
  epoch's figures, read by ``dvc metrics show`` and ``dvc exp show``) and one TSV per metric under
  ``dvclive/plots/metrics/`` (``train/loss.tsv``, ``eval/auc.tsv``, ..., one row per epoch, read by
  ``dvc plots show`` / ``dvc plots diff``). dvc.yaml declares both as the train stage's metrics and
  plots; DVCLive is told not to edit dvc.yaml (``dvcyaml=False``) nor to save an experiment of its
  own (``save_dvc_exp=False``: ``dvc exp run`` or the flow's ``dvc exp save`` records the run).
- **TensorBoard**: ``run_name`` names one log folder per training run, so runs are kept side by
  side (``tensorboard --logdir models/tensorboard``) rather than written over.

A run resumed from a backup (medops.learn.resume) logs the epochs it restored first, so its
curves are whole; its TensorBoard folder is the interrupted run's.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def run_name(now: datetime | None = None) -> str:
    """A name for one training run: UTC time to the second, then the DVC experiment's name when
    ``dvc exp run`` runs the stage (it sets DVC_EXP_NAME), e.g. ``20261203T124501Z-sappy-bowl``."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    experiment = os.environ.get("DVC_EXP_NAME", "").strip()
    return f"{stamp}-{experiment}" if experiment else stamp


def dvclive_curves(live_dir: Path | str, *, backup: Any = None) -> Any:
    """A Keras callback logging every epoch's metrics with DVCLive into ``live_dir``.

    ``backup``: the run's ``medops.learn.resume.training_backup``; when the run resumes, the epochs
    done before the interruption are logged first (from the backup's history).
    """
    import keras
    from dvclive import Live
    from dvclive.utils import standardize_metric_name

    class DvcLiveCurves(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.live: Any = None

        def log_epoch(self, epoch: int, logs: dict[str, Any]) -> None:
            self.live.step = epoch
            for metric, value in logs.items():
                self.live.log_metric(standardize_metric_name(metric, "dvclive.keras"), float(value))
            self.live.next_step()

        def on_train_begin(self, logs: dict | None = None) -> None:
            self.live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False, report=None)
            done = backup.initial_epoch if backup is not None else 0
            for epoch in range(done):
                self.log_epoch(epoch, {k: v[epoch] for k, v in backup.history.items() if len(v) > epoch})

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.log_epoch(epoch, logs or {})

        def on_train_end(self, logs: dict | None = None) -> None:
            self.live.end()

    return DvcLiveCurves()
