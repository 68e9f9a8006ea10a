"""A real two-process MultiWorkerMirroredStrategy cluster on localhost (gRPC on free ports, CPU)
trains the same small simple_cnn on the same bundled PneumoniaMNIST subset as one process on one
device, and ends with the same weights and predictions; only the chief writes its result.

Each process is tests/integration/_multiworker_worker.py with its own TF_CONFIG, as on a real
cluster. All processes are bounded in time and killed if still running when the test ends.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

WORKER_PATH = Path(__file__).resolve().parent / "_multiworker_worker.py"


def load_worker_module():
    spec = importlib.util.spec_from_file_location("_multiworker_worker", WORKER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


workers = load_worker_module()


# the parity this cluster test repeats across two processes is in make test as
# tests/unit/test_distribute.py (MirroredStrategy over two logical CPUs, the same pinned numerics)
@pytest.mark.slow
@pytest.mark.long
def test_two_worker_cluster_matches_single_device_training_and_only_the_chief_writes(tmp_path, free_port):
    ports = {free_port()}
    while len(ports) < 2:
        ports.add(free_port())
    cluster = {"worker": [f"127.0.0.1:{port}" for port in sorted(ports)]}
    # medops' own input pipeline (seeded shuffle, default augmentation), as training uses it
    common = ["--n", "256", "--batch", "32", "--epochs", "3", "--lr", "0.3", "--seed", "7",
              "--pipeline", "medops", "--dtype", "float64"]

    def member(index: int) -> tuple[list[str], dict[str, str]]:
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        args = ["--strategy", "auto", "--out", str(tmp_path / f"worker{index}"), *common]
        return args, {"TF_CONFIG": json.dumps(tf_config)}

    workers.run_workers(
        {
            "single": (["--strategy", "default", "--out", str(tmp_path / "single"), *common], {}),
            "worker0": member(0),
            "worker1": member(1),
        },
        tmp_path, timeout=400,
    )
    assert not (tmp_path / "worker1").exists(), "a non-chief worker wrote results"
    info = workers.assert_matches_single_device(tmp_path / "single", tmp_path / "worker0")
    # "auto" chose multi_worker from TF_CONFIG alone
    assert info["plan"]["strategy"] == "multi_worker" and info["chief"]
    assert info["plan"]["worker_count"] == 2 and info["replicas_in_sync"] == 2
    assert "val_loss" in info["history"]  # validation runs under the cluster too


@pytest.mark.slow
@pytest.mark.long
def test_a_killed_two_worker_cluster_resumes_from_its_backups_and_ends_as_one_uninterrupted_device(tmp_path, free_port):
    # every worker SIGKILLed when epoch 2 of 3 begins (as when the cluster's nodes are lost), then
    # the cluster started again: each worker restores its own backup and trains the last epoch only
    ports = {free_port()}
    while len(ports) < 2:
        ports.add(free_port())
    cluster = {"worker": [f"127.0.0.1:{port}" for port in sorted(ports)]}
    common = ["--n", "256", "--batch", "32", "--epochs", "3", "--lr", "0.3", "--seed", "7",
              "--pipeline", "medops", "--dtype", "float64"]
    backup = tmp_path / "backup"

    def member(index: int, *extra: str) -> tuple[list[str], dict[str, str]]:
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        args = ["--strategy", "auto", "--out", str(tmp_path / f"worker{index}"), "--backup", str(backup),
                *common, *extra]
        return args, {"TF_CONFIG": json.dumps(tf_config)}

    workers.run_workers({"worker0": member(0, "--die-at-epoch", "2"), "worker1": member(1, "--die-at-epoch", "2")},
                        tmp_path, timeout=400, expected_rc=-9)
    assert sorted(p.name for p in backup.iterdir()) == ["worker-0", "worker-1"]
    assert not (tmp_path / "worker0").exists()
    workers.run_workers(
        {"single": (["--strategy", "default", "--out", str(tmp_path / "single"), *common], {}),
         "worker0": member(0), "worker1": member(1)},
        tmp_path, timeout=400,
    )
    info = workers.assert_matches_single_device(tmp_path / "single", tmp_path / "worker0")
    assert info["resumed_from_epoch"] == 2 and info["plan"]["worker_count"] == 2
    assert len(info["history"]["loss"]) == 3  # the restored epochs' history, then the last one
    assert not list(backup.rglob("*.h5"))  # deleted once the run finished
