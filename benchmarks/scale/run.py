"""Past one machine, measured (issue 11): ingest on a Dask cluster vs the local pool, the number of
objects a dataset version puts on an S3 remote (packed shards vs one file per image) with push and
pull times, and peak memory of the main process and the workers at two sizes. One run prints the
side-by-side ratios; see README.md beside this file for the figures and their conditions.

    .venv/bin/python benchmarks/scale/run.py [--speed-files 3000] [--objects-files 20000]
                                             [--memory-files 2000,8000] [--only speed,objects,memory]

Everything runs on this machine: the Dask cluster is a scheduler and 2 single-threaded worker
processes on the loopback (medops.ops.dask_cluster), the S3 remote is moto's server on the loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
KEY = b"scale-benchmark-key-0123456789ab"
SIZE = 64  # pixels a side: small images, as the issue asks


# --- a synthetic export ----------------------------------------------------------------------

def _write(args: tuple[int, int, str]) -> int:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    start, stop, folder = args
    for i in range(start, stop):
        sop = f"2.25.{10**30 + i}"
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"2.25.{7000 + i // 100}", f"2.25.{8000 + i // 100}"
        ds.Modality, ds.PatientID, ds.PatientName, ds.PatientSex = "CT", f"P{i // 100:05d}", "Bench^Mark", "O"
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.random.default_rng(i).integers(0, 4096, (SIZE, SIZE), dtype=np.uint16).tobytes()
        target = Path(folder) / f"series{i // 100:05d}" / f"IM{i:07d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    return stop - start


def export(work: Path, n: int) -> Path:
    """``n`` files of SIZE x SIZE (12-bit CT), 100 per series; written once, reused by later runs."""
    folder = work / f"export-{n}"
    marker = work / f"export-{n}.complete"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    step = 500
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        assert sum(pool.map(_write, [(i, min(i + step, n), str(folder)) for i in range(0, n, step)])) == n
    marker.touch()
    return folder


def _ingest(src: Path, out: Path, cluster: str | None, shard_size: int = 2048):
    from medops.config import IngestConfig
    from medops.stages import ingest

    shutil.rmtree(out, ignore_errors=True)
    cfg = IngestConfig(workers=2, image_size=28, shard_size=shard_size, cluster=cluster)
    started = time.perf_counter()
    res = ingest.run(cfg, source_dir=src, out_dir=out, key=KEY)
    return res, time.perf_counter() - started


def _digests(folder: Path) -> dict[str, int]:
    import hashlib

    return {p.relative_to(folder).as_posix(): hash(hashlib.sha256(p.read_bytes()).digest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. Dask vs the local pool --------------------------------------------------------------

def bench_speed(work: Path, n: int, repeats: int) -> dict:
    from medops.ops.dask_cluster import process_cluster

    src = export(work, n)
    local, dask, main_cpu = [], [], []
    started = time.perf_counter()
    with process_cluster(2) as cluster:
        startup = time.perf_counter() - started
        for _ in range(repeats):  # interleaved: the machine's load drifts
            res_l, t_l = _ingest(src, work / "out-local", None)
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            res_d, t_d = _ingest(src, work / "out-dask", cluster.address)
            after = resource.getrusage(resource.RUSAGE_SELF)
            main_cpu.append(after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime)
            local.append(t_l)
            dask.append(t_d)
    same = _digests(work / "out-local") == _digests(work / "out-dask")
    best_l, best_d = min(local), min(dask)
    return {"files": n, "local_s": local, "dask_s": dask, "cluster_startup_s": round(startup, 2),
            "local_files_per_s": round(n / best_l, 1), "dask_files_per_s": round(n / best_d, 1),
            "dask_over_local": round(best_l / best_d, 3),
            "dask_with_startup_over_local": round(best_l / (best_d + startup), 3),
            # the main process (listing, ordering, writing every output) is the one part that does
            # not scale out: its CPU per file bounds the files/s of any cluster
            "main_cpu_ms_per_file": round(1000 * min(main_cpu) / n, 3), "identical_outputs": same,
            "used": res_d.used}


# --- 2. objects on an S3 remote -------------------------------------------------------------

def _count_objects(client, bucket: str, prefix: str) -> int:
    return sum(len(page.get("Contents", [])) for page in
               client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))


def _push_pull(root: Path, name: str, folder: Path, client, bucket: str, endpoint: str) -> dict:
    from medops.ops import dvc

    project = root / f"project-{name}"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    dvc.init(project)
    dvc.ensure_remote(project, "storage", f"s3://{bucket}/{name}")
    dvc.configure_remote(project, "storage", endpointurl=endpoint)
    target = project / "data" / "dataset"
    shutil.copytree(folder, target)
    files = sum(1 for p in target.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    dvc.add(project, target)
    t1 = time.perf_counter()
    dvc.push(project, [target])
    t2 = time.perf_counter()
    objects = _count_objects(client, bucket, f"{name}/")
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(target)
    t3 = time.perf_counter()
    dvc.pull(project, [target])
    t4 = time.perf_counter()
    assert sum(1 for p in target.rglob("*") if p.is_file()) == files
    shutil.rmtree(project)
    return {"files": files, "objects": objects, "add_s": round(t1 - t0, 1), "push_s": round(t2 - t1, 1),
            "pull_s": round(t4 - t3, 1)}


def bench_objects(work: Path, n: int, subset: int | None = None) -> dict:
    """``subset``: build the one-file-per-image layout from the first shards only (at least
    ``subset`` images), and extrapolate its push and pull times linearly to all the images."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    src = export(work, n)
    res, ingest_s = _ingest(src, work / "out-objects", None)
    # the same dataset with one de-identified file per image (the layout before issue 11)
    loose = work / "loose"
    shutil.rmtree(loose, ignore_errors=True)
    loose.mkdir()
    for name in ("metadata.parquet", "quarantine.csv", "ingest_index.json"):
        shutil.copy(work / "out-objects" / name, loose / name)
    (loose / "arrays").mkdir()
    loose_images = loose_shards = 0
    for pack in sorted((work / "out-objects" / "dicom").glob("*.zip")):
        if subset is not None and loose_images >= subset:
            break
        shutil.copy(work / "out-objects" / "arrays" / (pack.stem + ".npy"), loose / "arrays")
        with zipfile.ZipFile(pack) as z:
            z.extractall(loose)
            loose_images += len(z.namelist())
        loose_shards += 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[k] = v
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        packed = _push_pull(work, "packed", work / "out-objects", client, "bench", endpoint)
        per_image = _push_pull(work, "per-image", loose, client, "bench", endpoint)
    finally:
        server.stop()
    shutil.rmtree(loose, ignore_errors=True)
    scale = res.used / loose_images  # 1 unless a subset
    per_image.update(images=loose_images, extrapolated_to=res.used if scale != 1 else None,
                     **{f"{k}_at_all": round(per_image[k] * scale, 1) for k in ("add_s", "push_s", "pull_s")},
                     objects_at_all=per_image["objects"] + res.used - loose_images + res.shards - loose_shards)
    return {"images": res.used, "shards": res.shards, "ingest_s": round(ingest_s, 1), "packed": packed,
            "per_image": per_image,
            "objects_ratio": round(per_image["objects_at_all"] / packed["objects"], 1),
            "push_ratio": round(per_image["push_s_at_all"] / max(packed["push_s"], 0.1), 1),
            "pull_ratio": round(per_image["pull_s_at_all"] / max(packed["pull_s"], 0.1), 1)}


# --- 3. peak memory at two sizes ------------------------------------------------------------

def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM): per address space, so unlike ru_maxrss it does
    not carry the peak of the process that started this one (which Linux keeps across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


def _children_peaks(stop, peaks: dict[int, float]) -> None:
    """Until ``stop`` is set: every 0.2 s, each child process' VmHWM (MB), its last value kept (a
    local pool's workers exit with the run, so they are sampled while they live)."""
    me = os.getpid()
    while not stop.wait(0.2):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields.get("PPid", "0")) == me and "VmHWM" in fields:
                peaks[int(entry.name)] = round(int(fields["VmHWM"].split()[0]) / 1024, 1)


def _memory_child_local(work: Path, n: int) -> dict:
    """In a fresh process: one ingest on the local pool (2 workers); peak RSS of this process and
    of each worker (sampled)."""
    import threading

    src = export(work, n)
    peaks: dict[int, float] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_children_peaks, args=(stop, peaks), daemon=True)
    sampler.start()
    try:
        res, seconds = _ingest(src, work / f"out-mem-{n}", None)
    finally:
        stop.set()
        sampler.join()
    shutil.rmtree(work / f"out-mem-{n}", ignore_errors=True)
    # the children: the 2 workers and multiprocessing's resource tracker (a few MB), largest first
    return {"files": n, "used": res.used, "seconds": round(seconds, 1), "path": "local pool",
            "main_peak_mb": peak_rss_mb(), "worker_peak_mb": sorted(peaks.values())[-2:]}


def _profiles_kept(dask_worker) -> int:
    return len(dask_worker.profile_history)


def _memory_child(work: Path, n: int) -> dict:
    """In a fresh process: a fresh cluster, one ingest; peak RSS of this process and each worker.
    The workers run without distributed's statistical profiler unless SCALE_BENCH_DASK_PROFILE is
    "on" (it keeps a profile per second of work, up to distributed.admin.low-level-log-length)."""
    from distributed import Client

    from medops.ops.dask_cluster import process_cluster

    if os.environ.get("SCALE_BENCH_MEMORY_PATH") == "local":
        return _memory_child_local(work, n)
    src = export(work, n)
    profile = os.environ.get("SCALE_BENCH_DASK_PROFILE", "off") == "on"
    with process_cluster(2, env={"DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": str(profile)}) as cluster:
        res, seconds = _ingest(src, work / f"out-mem-{n}", cluster.address)
        with Client(cluster.address) as client:
            workers, kept = client.run(peak_rss_mb), client.run(_profiles_kept)
    shutil.rmtree(work / f"out-mem-{n}", ignore_errors=True)
    return {"files": n, "used": res.used, "seconds": round(seconds, 1), "worker_profiler": profile,
            "profiles_kept": sorted(kept.values()),
            "main_peak_mb": peak_rss_mb(), "worker_peak_mb": sorted(workers.values())}


def bench_memory(work: Path, sizes: list[int]) -> dict:
    runs = []
    for n in sizes:
        export(work, n)
        load_before, started = os.getloadavg(), time.strftime("%H:%M:%S", time.gmtime())
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--work", str(work)],
                             capture_output=True, text=True, check=True)
        runs.append({**json.loads(out.stdout.strip().splitlines()[-1]), "started_utc": started,
                     "load_before": load_before, "load_after": os.getloadavg()})
    small, large = runs[0], runs[-1]
    return {"runs": runs,
            "main_ratio": round(large["main_peak_mb"] / small["main_peak_mb"], 2),
            "worker_ratio": round(max(large["worker_peak_mb"]) / max(small["worker_peak_mb"]), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-files", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--objects-files", type=int, default=20000)
    parser.add_argument("--per-image-subset", type=int, help="one-file-per-image layout from the first "
                        "shards only (at least this many images); its times extrapolated linearly")
    parser.add_argument("--memory-files", default="2000,8000")
    parser.add_argument("--only", default="speed,objects,memory")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medops-scale-bench")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--memory-path", choices=["dask", "local"], default="dask",
                        help="memory section: on a Dask cluster (default) or the local pool")
    parser.add_argument("--dask-profile", choices=["off", "on"], default="off",
                        help="memory section, Dask path: distributed's statistical profiler on the workers "
                        "(on: distributed's default; off: as the LocalCluster medops starts)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SCALE_BENCH_MEMORY_PATH", args.memory_path)  # read by the memory child
    os.environ.setdefault("SCALE_BENCH_DASK_PROFILE", args.dask_profile)
    if args.memory_child:
        print(json.dumps(_memory_child(args.work, args.memory_child)))
        return
    only = set(args.only.split(","))
    figures: dict = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}
    if "speed" in only:
        s = figures["speed"] = bench_speed(args.work, args.speed_files, args.repeats)
        print(f"[speed] {s['files']} files of {SIZE}x{SIZE}, 2 workers, best of {args.repeats}: local pool "
              f"{s['local_files_per_s']} files/s, Dask {s['dask_files_per_s']} files/s -> Dask/local "
              f"{s['dask_over_local']}x (target >= 0.9); cluster start-up {s['cluster_startup_s']} s (not "
              f"counted; counted: {s['dask_with_startup_over_local']}x); main process "
              f"{s['main_cpu_ms_per_file']} ms CPU per file on Dask; identical outputs: {s['identical_outputs']}",
              flush=True)
    if "objects" in only:
        o = figures["objects"] = bench_objects(args.work, args.objects_files, args.per_image_subset)
        print(f"[objects] ingest of {o['images']} images (local pool, 2 workers): {o['ingest_s']} s", flush=True)
        for name in ("packed", "per_image"):
            r = o[name]
            print(f"[objects] {r.get('images', o['images'])} images, {name:9s}: {r['files']:6d} files -> "
                  f"{r['objects']:6d} S3 objects; dvc add {r['add_s']} s, push {r['push_s']} s, pull "
                  f"{r['pull_s']} s", flush=True)
        r = o["per_image"]
        if r["extrapolated_to"]:
            print(f"[objects] per_image extrapolated (x{o['images'] / r['images']:.2f}) to {o['images']} images: "
                  f"~{r['objects_at_all']} objects, dvc add ~{r['add_s_at_all']} s, push ~{r['push_s_at_all']} s, "
                  f"pull ~{r['pull_s_at_all']} s", flush=True)
        print(f"[objects] one file per image / packed: {o['objects_ratio']}x the objects, push "
              f"{o['push_ratio']}x, pull {o['pull_ratio']}x the time", flush=True)
    if "memory" in only:
        sizes = [int(x) for x in args.memory_files.split(",")]
        m = figures["memory"] = bench_memory(args.work, sizes)
        for r in m["runs"]:
            profiler = (f" (workers' profiler {'on' if r['worker_profiler'] else 'off'}, profiles kept "
                        f"{r['profiles_kept']})" if "worker_profiler" in r else "")
            print(f"[memory] {r['files']} files on {r.get('path', 'Dask')}{profiler} in {r['seconds']} s "
                  f"(from {r['started_utc']} UTC, load {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}): "
                  f"main peak {r['main_peak_mb']} MB, workers' peaks {r['worker_peak_mb']} MB", flush=True)
        print(f"[memory] {sizes[-1]} / {sizes[0]} files: main {m['main_ratio']}x, workers {m['worker_ratio']}x "
              f"(target <= 1.2x)", flush=True)
    figures["load_after"] = os.getloadavg()
    print(f"load average before {figures['load_before']}, after {figures['load_after']} "
          f"on {figures['cpus']} CPUs", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
