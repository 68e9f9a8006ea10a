"""Ingest on a real Dask cluster (a scheduler and worker processes on the loopback): the same
outputs as the local pool, byte for byte; a worker killed mid-run loses no file; a file that keeps
killing workers is quarantined with the reason; the key is never in a task's name."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import pytest

from medops.config import IngestConfig, SynthConfig
from medops.dicom import synth
from medops.ops.dask_cluster import process_cluster
from medops.paths import BUNDLED_DATASET
from medops.stages import ingest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _small_export import write_small_export  # noqa: E402

pytestmark = [pytest.mark.slow]

KEY = b"dask-ingest-test-key-0123456789ab"


def _digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dask-export")
    synth.run(SynthConfig(max_images_per_split=6), source_npz=BUNDLED_DATASET, out_dir=root / "raw")
    src = root / "raw" / "dicom"
    (src / "junk.txt").write_text("patient called back")
    return {"src": src, "manifest": root / "raw" / "labels.csv", "root": root}


SLOW_DECODER = '''
import time

from medops.stages.ingest import worker

_real = worker.__dict__.setdefault("_real_process_file", worker.process_file)


def process_file(spec, rel):
    time.sleep(0.004)  # a few ms more per file: the run lasts long enough to kill a worker in it
    return _real(spec, rel)


worker.process_file = process_file
'''


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("dask-logs")
    (logs / "slow_decoder.py").write_text(SLOW_DECODER)
    with process_cluster(2, preload=[str(logs / "slow_decoder.py")], log_dir=logs) as c:
        yield c


def test_the_dask_path_gives_the_local_pools_outputs_byte_for_byte(export, cluster, tmp_path):
    local = ingest.run(IngestConfig(workers=2, shard_size=8), source_dir=export["src"], out_dir=tmp_path / "local",
                       manifest=export["manifest"], key=KEY)
    on_dask = ingest.run(IngestConfig(workers=2, shard_size=8, cluster=cluster.address), source_dir=export["src"],
                         out_dir=tmp_path / "dask", manifest=export["manifest"], key=KEY)
    assert (on_dask.used, on_dask.quarantined_by_reason) == (local.used, local.quarantined_by_reason)
    assert on_dask.used == 18 and on_dask.quarantined_by_reason == {"not_dicom": 1}
    # metadata rows, array shards, packs of de-identified files, quarantine list, index: every byte,
    # so DVC gives both the same data version
    assert _digests(tmp_path / "dask") == _digests(tmp_path / "local")
    # the run's plugin is gone from the workers, and the key was never in a task's name
    from distributed import Client

    with Client(cluster.address) as client:
        assert not any(name.startswith("medops-ingest") for plugins in
                       client.run(lambda dask_worker: list(dask_worker.plugins)).values() for name in plugins)
        keys = [str(k) for k in client.run_on_scheduler(
            lambda dask_scheduler: [ts.key for ts in dask_scheduler.tasks.values()])]
        assert all(KEY.decode() not in k for k in keys)


def test_an_incremental_run_on_dask_reuses_what_the_local_pool_wrote(export, cluster, tmp_path):
    from conftest import pydicom_file

    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(export["src"], src)
    first = ingest.run(IngestConfig(workers=2, shard_size=8), source_dir=src, out_dir=out, key=KEY)
    shutil.copy(pydicom_file("CT_small.dcm"), src / "arrived-later.dcm")
    again = ingest.run(IngestConfig(workers=2, shard_size=8, cluster=cluster.address), source_dir=src,
                       out_dir=out, key=KEY)
    # only the new file is decoded (on the cluster); it tops up the last shard, the only one written
    assert (again.decoded, again.used, again.shards_written) == (1, first.used + 1, 1)


def test_a_worker_killed_mid_run_loses_no_file(cluster, tmp_path):
    """SIGKILL to one worker process while its tasks are in flight: its nanny starts a new one and
    the scheduler hands the lost tasks to the workers; every file is used or quarantined, and the
    outputs are those of the local pool."""
    src = write_small_export(tmp_path / "src", 400)
    cfg = IngestConfig(workers=2, image_size=8, shard_size=64)
    ingest.run(cfg, source_dir=src, out_dir=tmp_path / "local", key=KEY)
    from distributed import Client

    [(address, victim)] = sorted(cluster.worker_pids().items())[:1]
    killed = threading.Event()
    held: list[int] = []

    def kill_one_worker(done: int, total: int) -> None:
        if not killed.is_set():
            with Client(cluster.address) as client:  # what the victim holds as it dies
                held.append(client.run_on_scheduler(
                    lambda dask_scheduler, a=address: len(dask_scheduler.workers[a].processing)))
            os.kill(victim, signal.SIGKILL)
            killed.set()

    res = ingest.run(cfg.model_copy(update={"cluster": cluster.address}), source_dir=src, out_dir=tmp_path / "dask",
                     key=KEY, progress=kill_one_worker)
    # killed at the first progress report (64 files written, ~300 more in flight), and replaced
    assert killed.is_set() and held[0] > 0 and victim not in cluster.worker_pids().values()
    assert (res.files_seen, res.used, res.quarantined_by_reason) == (402, 400, {"not_dicom": 1, "truncated": 1})
    assert _digests(tmp_path / "dask") == _digests(tmp_path / "local")


CRASHING_DECODER = '''
import os

from medops.stages.ingest import worker

# (dask may load a preload script more than once in a worker: patch the original, once)
_real = worker.__dict__.setdefault("_real_read_original", worker._read_original)


def _read_original(ds, spec, rel):
    if rel == os.environ["MEDOPS_TEST_CRASH_ON"]:
        os._exit(3)  # what a decoder plugin that crashes on a malformed file does to its process
    return _real(ds, spec, rel)


worker._read_original = _read_original
'''


def test_a_file_that_kills_every_worker_it_meets_is_quarantined_with_the_reason(tmp_path):
    src = write_small_export(tmp_path / "src", 60)
    preload = tmp_path / "crashing_decoder.py"
    preload.write_text(CRASHING_DECODER)
    env = {"MEDOPS_TEST_CRASH_ON": "series000/IM00007.dcm", "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    with process_cluster(2, preload=[str(preload)], env=env, log_dir=tmp_path) as crashing:
        res = ingest.run(IngestConfig(workers=2, image_size=8, cluster=crashing.address), source_dir=src,
                         out_dir=tmp_path / "out", key=KEY)
    assert (res.files_seen, res.used) == (62, 59)
    assert res.quarantined_by_reason == {"decode_error": 1, "not_dicom": 1, "truncated": 1}
    rows = (tmp_path / "out" / "quarantine.csv").read_text().splitlines()
    assert "series000/IM00007.dcm,decode_error,the decoder crashed the worker process reading this file" in rows


@pytest.mark.long  # the time limit itself is tested on the local pool in make test (test_ingest)
def test_a_file_over_the_time_limit_on_a_dask_worker_is_quarantined_as_timeout(tmp_path):
    """``ingest.file_timeout_s`` on a LocalCluster (one thread per worker): the watchdog ends the
    worker, its nanny restarts it, and the file that kept taking too long is a ``timeout`` row
    (tried again by the next run), not a crash."""
    from conftest import pydicom_file

    src = tmp_path / "src"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(pydicom_file(name), src / name)
    # no file is read in 10 ms by a fresh worker process (its imports alone take longer)
    res = ingest.run(IngestConfig(workers=2, cluster="local", file_timeout_s=0.01), source_dir=src,
                     out_dir=tmp_path / "out", key=KEY)
    assert res.used == 0 and res.quarantined_by_reason == {"timeout": 2}


def test_a_local_cluster_started_by_medops_gives_the_same_outputs(export, tmp_path):
    """``cluster: local``: a LocalCluster of worker processes, started and stopped by the run."""
    from medops.cli import main

    local = ingest.run(IngestConfig(workers=2, shard_size=8), source_dir=export["src"], out_dir=tmp_path / "local",
                       manifest=export["manifest"], key=KEY)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", project / "params.yaml")
    os.environ["MEDOPS_DEID_KEY"] = KEY.decode()
    try:
        from medops.config import update_params_file

        update_params_file(project / "params.yaml", {"ingest": {"shard_size": 8}})
        assert main(["--project", str(project), "ingest", str(export["src"]), "--out", str(tmp_path / "dask"),
                     "--manifest", str(export["manifest"]), "--cluster", "local", "--quiet"]) == 0
    finally:
        del os.environ["MEDOPS_DEID_KEY"]
    assert local.used == 18
    assert _digests(tmp_path / "dask") == _digests(tmp_path / "local")


def _profiler_on(dask_worker) -> bool:
    return "profile" in dask_worker.periodic_callbacks and dask_worker.profile_history.maxlen is not None


def test_the_workers_of_a_local_cluster_keep_no_profile_history(tmp_path):
    """distributed's statistical profiler keeps one profile per second of work on each worker (up
    to ``distributed.admin.low-level-log-length``): it grew the workers' memory with the run's
    length (benchmarks/scale, section 3). The LocalCluster medops starts runs without it, and
    this process' own Dask config is left as it was."""
    import dask
    from medops.stages.ingest.cluster import DaskCluster
    from medops.stages.ingest.worker import WorkerSpec

    executor = DaskCluster(WorkerSpec(IngestConfig(workers=1, cluster="local"), KEY, None, tmp_path),
                           "local", 1, expected=10)
    try:
        executor.chunk_size(0)  # connects: starts the LocalCluster
        assert list(executor.client.run(_profiler_on).values()) == [False]
        from distributed import Client, LocalCluster

        # for contrast, distributed's default: profiling on
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as other, Client(other) as client:
            assert list(client.run(_profiler_on).values()) == [True]
    finally:
        executor.close()
    assert dask.config.get("distributed.worker.profile.enabled") is True
