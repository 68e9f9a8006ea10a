"""A training run killed with SIGKILL after an epoch resumes from its last finished epoch.

The real ``medops stage train`` in a subprocess, on a tiny ingested dataset built from the bundled
PneumoniaMNIST: killed as soon as its backup names a finished epoch, then run again. The rerun
starts at the next epoch (its progress lines and train.json say so), keeps the run's one
TensorBoard folder, writes whole DVCLive curves, and ends with the weights of an uninterrupted run
of the same params and data in another project (dropout, augmentation, shuffling and
``restore_best`` included: all of their state is restored or replayed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _ingested import build_ingested  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.long]

EPOCHS = 5


def _project(root: Path, repo_root: Path) -> Path:
    from medops.config import SplitConfig, update_params_file
    from medops.stages import split as split_stage

    root.mkdir(parents=True)
    (root / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    update_params_file(root / "params.yaml", {"train": {
        "epochs": EPOCHS, "batch_size": 32, "filters": [8, 16], "dense_units": 16, "dropout": 0.3,
        "restore_best": True, "lr_schedule": "cosine"}})
    ingested = build_ingested(root / "data" / "ingested", n_per_split={"train": 600, "val": 90, "test": 30})
    split_stage.run(SplitConfig(), metadata=ingested / "metadata.parquet", out=root / "data" / "split" / "split.csv")
    # the data version the stage records (what `dvc add data/ingested` writes)
    (root / "data" / "ingested.dvc").write_text(yaml.safe_dump(
        {"outs": [{"path": "ingested", "md5": "0123456789abcdef0123456789abcdef.dir"}]}))
    return root


def _train(root: Path, repo_root: Path) -> subprocess.Popen:
    env = {**os.environ, "MEDOPS_ROOT": str(root), "PYTHONPATH": str(repo_root), "PYTHONUNBUFFERED": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1"}
    env.pop("DVC_EXP_NAME", None)
    return subprocess.Popen([sys.executable, "-m", "medops", "stage", "train"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finished_epochs(root: Path) -> int:
    from medops.learn.resume import read_checkpoint

    found = [read_checkpoint(d) for d in (root / ".medops" / "train-backup").glob("*/worker-0")]
    return max((c.epoch for c in found if c is not None), default=0)


def _weights(path: Path) -> list[np.ndarray]:
    import keras

    return [np.asarray(w) for w in keras.saving.load_model(path, compile=False).get_weights()]


def test_a_killed_training_resumes_from_its_last_epoch_and_ends_as_an_uninterrupted_run(tmp_path, repo_root):
    killed = _project(tmp_path / "killed", repo_root)
    whole = _project(tmp_path / "whole", repo_root)

    proc = _train(killed, repo_root)
    try:
        deadline = time.monotonic() + 300
        while _finished_epochs(killed) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = _finished_epochs(killed)
    assert 2 <= done < EPOCHS, done
    assert not (killed / "models" / "model.keras").exists()
    [first_run] = list((killed / "models" / "tensorboard").iterdir())

    rerun = _train(killed, repo_root)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-3000:]
    epochs_printed = [int(line.split("train ")[1].split("/")[0]) for line in output.splitlines()
                      if line.startswith("medops progress: train ") and "(" in line]
    assert epochs_printed == list(range(done + 1, EPOCHS + 1)), output[-2000:]  # only the epochs left
    record = json.loads((killed / "models" / "train.json").read_text())
    assert record["resumed_from_epoch"] == done and record["epochs_run"] == EPOCHS
    assert all(len(values) == EPOCHS for values in record["history"].values())
    assert list((killed / "models" / "tensorboard").iterdir()) == [first_run]  # the same run's folder
    assert record["tensorboard_dir"] == str(first_run)
    assert not list((killed / ".medops" / "train-backup").rglob("*.h5"))  # deleted once finished

    uninterrupted = _train(whole, repo_root)
    output, _ = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, output[-3000:]
    reference = json.loads((whole / "models" / "train.json").read_text())
    assert reference["resumed_from_epoch"] == 0
    for key, values in reference["history"].items():
        np.testing.assert_allclose(record["history"][key], values, rtol=1e-5, err_msg=key)
    assert record["best_epoch"] == reference["best_epoch"]
    for ours, theirs in zip(_weights(killed / "models" / "model.keras"), _weights(whole / "models" / "model.keras")):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    # DVCLive's curves are whole: every epoch, the restored ones too
    for project in (killed, whole):
        rows = (project / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
        assert rows[0].split("\t") == ["step", "loss"] and len(rows) == 1 + EPOCHS
    assert ((killed / "dvclive" / "plots" / "metrics" / "eval" / "auc.tsv").read_text()
            == (whole / "dvclive" / "plots" / "metrics" / "eval" / "auc.tsv").read_text())
