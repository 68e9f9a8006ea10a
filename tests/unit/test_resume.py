"""medops.learn.resume's bookkeeping: which backup a run resumes from, and which it must not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medops.config import AugmentConfig, TrainConfig
from medops.learn.resume import LATEST, backup_dir_for, read_checkpoint
from medops.paths import find_project_root
from medops.stages.train import resume_point


def _fake_backup(folder: Path, epoch: int, run_name: str = "20261203T120000Z") -> None:
    """What TrainingBackup leaves after ``epoch`` epochs (the weights file is not read here)."""
    done = folder / f"epoch-{epoch:04d}"
    done.mkdir(parents=True)
    (done / "training_metadata.json").write_text(json.dumps({"epoch": epoch, "batch": 0}))
    (done / "medops_state.json").write_text(json.dumps({"run_name": run_name, "history": {"loss": [0.7] * epoch},
                                                        "stopper": None}))
    (folder / LATEST).write_text(done.name + "\n")


def test_only_the_same_training_resumes(tmp_path):
    split = tmp_path / "split.csv"
    split.write_text("patient_id,sop_instance_uid,split\nP1,1.2,train\n")
    cfg, aug = TrainConfig(epochs=5), AugmentConfig()
    where, name, resumed = resume_point(cfg, aug, split=split, data_version="v1", backup_root=tmp_path / "b",
                                        worker_index=0)
    assert resumed == 0 and where.name == "worker-0"
    _fake_backup(where, 3, run_name="20261203T120000Z-interrupted")
    assert resume_point(cfg, aug, split=split, data_version="v1", backup_root=tmp_path / "b",
                        worker_index=0) == (where, "20261203T120000Z-interrupted", 3)
    # another epoch count, data version, augmentation or split: a fresh run, elsewhere
    for other in (dict(train_cfg=TrainConfig(epochs=6)), dict(data_version="v2"),
                  dict(augment_cfg=AugmentConfig(flip="none"))):
        kwargs = dict(train_cfg=cfg, augment_cfg=aug, data_version="v1") | other
        folder, _, resumed = resume_point(kwargs["train_cfg"], kwargs["augment_cfg"], split=split,
                                          data_version=kwargs["data_version"], backup_root=tmp_path / "b",
                                          worker_index=0)
        assert folder != where and resumed == 0
    split.write_text("patient_id,sop_instance_uid,split\nP1,1.2,val\n")
    assert resume_point(cfg, aug, split=split, data_version="v1", backup_root=tmp_path / "b",
                        worker_index=0)[2] == 0
    # each worker of a cluster has its own folder
    assert backup_dir_for(tmp_path, "k", 1) == tmp_path / "k" / "worker-1"


def test_a_backup_killed_while_being_written_is_not_read(tmp_path):
    folder = tmp_path / "worker-0"
    _fake_backup(folder, 2)
    (folder / ".staging").mkdir()  # killed while writing epoch 3: the staging folder is ignored
    (folder / ".staging" / "training_metadata.json").write_text(json.dumps({"epoch": 3}))
    assert read_checkpoint(folder).epoch == 2
    assert read_checkpoint(tmp_path / "nothing-here") is None
    (folder / LATEST).write_text("epoch-0009\n")  # names a folder that is not there
    assert read_checkpoint(folder) is None


def test_a_stage_dvc_runs_works_where_dvc_runs_it_not_in_medops_root(tmp_path, monkeypatch):
    for name in ("workspace", "queued-copy"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "params.yaml").write_text("{}\n")
    monkeypatch.setenv("MEDOPS_ROOT", str(tmp_path / "workspace"))
    monkeypatch.chdir(tmp_path / "queued-copy")
    assert find_project_root() == tmp_path / "workspace"
    monkeypatch.setenv("DVC_STAGE", "train")  # set by DVC for every stage command it runs
    assert find_project_root() == tmp_path / "queued-copy"
    assert find_project_root(tmp_path / "workspace") == tmp_path / "workspace"  # explicit wins


@pytest.mark.parametrize("env, expected", [({}, "20261203T124501Z"),
                                           ({"DVC_EXP_NAME": "sappy-bowl"}, "20261203T124501Z-sappy-bowl")])
def test_run_names_sort_by_time_and_carry_the_dvc_experiment(monkeypatch, env, expected):
    from datetime import datetime, timezone

    from medops.learn.tracking import run_name

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert run_name(datetime(2026, 12, 3, 12, 45, 1, tzinfo=timezone.utc)) == expected
