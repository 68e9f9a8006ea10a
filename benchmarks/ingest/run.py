"""Ingest benchmark (issue 3, item 9): medops ingest vs a plain single-process loop vs the
parallel decode-only limit, and medops ingest's peak memory as the file count grows.

Throughput section. Generates N CT-like slices (default 2,000 of 512 x 512, 16-bit signed,
rescale intercept -1024, a soft-tissue window; a seeded phantom with body, lungs, bone and noise)
in each encoding: uncompressed (``raw``, explicit VR little endian) and JPEG 2000 lossless
(``j2k``); JPEG-LS lossless (``jls``) only when asked for and an encoder is installed
(``pip install pyjpegls``). Then, per encoding, times three contenders on the same files:

- ``plain``: the loop one writes first: one process, ``dcmread`` -> ``pixel_array`` -> modality
  LUT + VOI (the rescale) -> resize, the images saved as one ``.npy`` at the end; no
  de-identification;
- ``medops``: the full ``medops ingest`` (:func:`medops.stages.ingest.run`, what the CLI calls) with
  ``--workers`` processes: reads, hashes, de-identifies, writes every de-identified DICOM file,
  decodes, preprocesses, writes shards, metadata.parquet, quarantine.csv and the index;
- ``decode-limit``: ``--workers`` processes that only read and decode (``pixel_array``), in
  chunks: what no parallel ingest on this machine can beat;

and prints files/s side by side, the ratios medops/plain and medops/decode-limit checked against
the issue's targets (compressed: >= 1.8x plain and >= 90 % of the decode limit; uncompressed:
>= 1.2x plain), and each run's peak memory.

Memory section. Ingests 2,000 and 20,000 small generated files (64 x 64, uncompressed, so that
20,000 take minutes, not an hour) and checks that the peak memory of the ingest, worker
processes included, stays flat (20,000 within 1.25x of 2,000).

Every measured run is a fresh Python process (this script with ``--measure-one``), timed inside
from the call to its return (its own lazy imports and worker start-up included, interpreter start
excluded). Memory: the driver samples the process and all its descendants from /proc every
0.1 s; "tree peak" is the largest sum of their RSS (an upper bound: shared library pages count
once per process), "worker peak" the largest VmHWM of a descendant, "main" the process's own
``ru_maxrss``. Files are read once before timing, so every contender reads from the page cache.

Usage (from the repository root)::

    .venv/bin/python benchmarks/ingest/run.py                    # the issue's run: both sections
    .venv/bin/python benchmarks/ingest/run.py --files 40 --size 128 --memory-files 100 400  # smoke
    .venv/bin/python benchmarks/ingest/run.py --sections throughput --encodings j2k --repeats 3

Generated files are cached under ``--work-dir`` (default ``.medops/bench/ingest``), one folder per
(encoding, files, size, generator version) with a marker written when complete, so later runs
time only the contenders. ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ENCODINGS = {
    "raw": "1.2.840.10008.1.2.1",       # Explicit VR Little Endian
    "j2k": "1.2.840.10008.1.2.4.90",    # JPEG 2000 Image Compression (Lossless Only)
    "jls": "1.2.840.10008.1.2.4.80",    # JPEG-LS Lossless Image Compression
}
COMPRESSED = {"j2k", "jls"}
# the targets: (ratio name, minimum)
TARGETS = {
    "raw": [("medops/plain", 1.2)],
    "j2k": [("medops/plain", 1.8), ("medops/limit", 0.90)],
    "jls": [("medops/plain", 1.8), ("medops/limit", 0.90)],
}
MEMORY_FLAT = 1.25  # largest file count's peak / smallest file count's peak, at most
GENERATOR_VERSION = 2  # bump when phantom() or make_dataset() change: invalidates the cache
KEY = b"benchmark-key-not-a-secret-0123456789"
CONTENDERS = ("plain", "decode-limit", "medops")


# --- generation -------------------------------------------------------------------------------

def phantom(index: int, size: int) -> np.ndarray:
    """A CT-like slice in stored values (HU + 1024), int16: body, two lungs, a spine, noise."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    hu = np.full((size, size), -1000.0)
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    hu[body] = 40
    fat = body & ((x / 0.85) ** 2 + (y / 0.65) ** 2 > 0.85)
    hu[fat] = -100
    z = (index % 50) / 50  # lungs change size along the "scan"
    for cx in (-0.38, 0.38):
        lung = ((x - cx) / (0.28 + 0.05 * z)) ** 2 + ((y + 0.05) / 0.45) ** 2 < 1
        hu[lung] = -820
    spine = (x / 0.09) ** 2 + ((y - 0.45) / 0.09) ** 2 < 1
    hu[spine] = 700
    hu += rng.normal(0, 12, size=hu.shape)
    return np.clip(hu + 1024, -2048, 2047).astype(np.int16)


def make_dataset(index: int, size: int, series_uid: str, study_uid: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop = f"2.25.{(index + 1) * 7919 + 10**30}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = "Bench^Patient", "BENCH0001"
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate = "19700101", "O", "20250101"
    ds.InstitutionName = "Benchmark Hospital"
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.SliceThickness = "1.0"
    ds.PixelData = phantom(index, size).tobytes()
    return ds


def _write_batch(args: tuple[list[int], int, str, str]) -> int:
    import pydicom

    indices, size, encoding, folder = args
    uid = ENCODINGS[encoding]
    for i in indices:
        ds = make_dataset(i, size, "2.25.424242", "2.25.434343")
        if encoding != "raw":
            ds.compress(uid)
        target = Path(folder) / f"series{i // 200:03d}" / f"CT{i:06d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        pydicom.dcmwrite(target, ds, enforce_file_format=True)
    return len(indices)


def encoder_available(encoding: str) -> tuple[bool, str]:
    from pydicom.pixels import get_encoder

    if encoding == "raw":
        return True, ""
    enc = get_encoder(ENCODINGS[encoding])
    return enc.is_available, "; ".join(enc.missing_dependencies)


def work_folder(work_dir: Path, encoding: str, n: int, size: int) -> Path:
    return work_dir / f"{encoding}-{n}-{size}"


def spec_of(n: int, size: int, encoding: str) -> dict:
    return {"files": n, "size": size, "encoding": encoding, "generator": GENERATOR_VERSION}


def is_cached(folder: Path, spec: dict) -> bool:
    marker = folder.parent / f"{folder.name}.complete.json"  # outside: ingest reads every file
    try:
        return json.loads(marker.read_text()) == spec
    except (OSError, ValueError):
        return False


def generate(folder: Path, n: int, size: int, encoding: str, workers: int) -> Path:
    """Write the files once, on all workers; a marker written last makes later runs reuse them."""
    marker = folder.parent / f"{folder.name}.complete.json"
    spec = spec_of(n, size, encoding)
    if is_cached(folder, spec):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    marker.unlink(missing_ok=True)
    step = max(1, min(200, math.ceil(n / (workers * 8))))
    batches = [(list(range(i, min(i + step, n))), size, encoding, str(folder)) for i in range(0, n, step)]
    started = time.perf_counter()
    print(f"{encoding}: generating {n} files of {size}x{size} in {folder} ...", flush=True)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        written = sum(pool.map(_write_batch, batches))
    if written != n:
        raise SystemExit(f"generated {written} of {n} files")
    marker.write_text(json.dumps(spec))
    print(f"{encoding}: generated in {time.perf_counter() - started:.1f} s", flush=True)
    return folder


# --- the three contenders (each runs in a fresh process, see measure_one) -------------------

def list_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def plain_loop(folder: Path, out: Path, image_size: int) -> int:
    """The obvious single-process loop: read, decode, modality LUT, VOI, resize, save."""
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    images = []
    for f in list_files(folder):
        ds = pydicom.dcmread(f)
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-9)
        img = Image.fromarray(arr.astype(np.float32)).resize((image_size, image_size),
                                                             Image.Resampling.BILINEAR)
        images.append(np.asarray(img))
    out.mkdir(parents=True, exist_ok=True)
    # saved once at the end: the cheapest way to save, so the plain loop is not handicapped
    np.save(out / "images.npy", np.stack(images))
    return len(images)


def _decode_chunk(paths: list[str]) -> int:
    import pydicom

    for p in paths:
        pydicom.dcmread(p).pixel_array
    return len(paths)


def _limit_worker_init() -> None:
    # the same allocator setting medops' ingest workers get (medops.procs.reuse_freed_memory):
    # it makes decoding itself faster, so the limit must have it too to stay a limit
    from medops.procs import reuse_freed_memory

    reuse_freed_memory()


def decode_limit(folder: Path, workers: int) -> int:
    """Decoding alone, on ``workers`` processes, chunked the way medops chunks its files."""
    from medops.stages.ingest import chunk_size

    files = list_files(folder)
    chunks: list[list[str]] = []
    handed_out = 0
    while handed_out < len(files):
        size = chunk_size(len(files), workers, handed_out)
        chunks.append([str(f) for f in files[handed_out:handed_out + size]])
        handed_out += len(chunks[-1])
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                             initializer=_limit_worker_init) as pool:
        return sum(pool.map(_decode_chunk, chunks))


def medops_ingest(folder: Path, out: Path, workers: int, image_size: int) -> int:
    """The full stage, as ``medops ingest`` runs it (de-identification on, a full rebuild)."""
    from medops.stages import ingest
    from medops.config import IngestConfig

    cfg = IngestConfig(workers=workers, image_size=image_size, incremental=False)
    result = ingest.run(cfg, source_dir=folder, out_dir=out, key=KEY)
    if result.used != result.files_seen:
        raise SystemExit(f"medops quarantined {result.quarantined} files: {result.quarantined_by_reason}")
    return result.used


_PEAKS_ENV = "MEDOPS_BENCH_WORKER_PEAKS"


def _report_worker_peak() -> None:
    """Write this worker's peak RSS (VmHWM, KiB) where the measured process collects it."""
    folder = os.environ.get(_PEAKS_ENV)
    if folder:
        Path(folder, f"{os.getpid()}.kb").write_text(str(_status_kb(os.getpid())[1]))


def measure_one(spec: dict) -> dict:
    """Run one contender in this (fresh) process: its time, its own peak RSS and its workers'.

    Workers' peaks are not taken from RUSAGE_CHILDREN: a child started by fork + exec keeps the
    high-water mark of the parent's pages it shared before the exec, so every worker would count
    at least the parent's size when the pool started. Each worker reports its VmHWM (which starts
    afresh at exec) as it exits instead; see the ``__mp_main__`` hook at the end of this file.
    """
    folder, out = Path(spec["folder"]), Path(spec["out"])
    peaks_dir = Path(tempfile.mkdtemp(prefix="ingest-bench-peaks-"))
    os.environ[_PEAKS_ENV] = str(peaks_dir)  # inherited by the spawned workers
    start = time.perf_counter()
    if spec["contender"] == "plain":
        n = plain_loop(folder, out, spec["image_size"])
    elif spec["contender"] == "decode-limit":
        n = decode_limit(folder, spec["workers"])
    else:
        n = medops_ingest(folder, out, spec["workers"], spec["image_size"])
    seconds = time.perf_counter() - start
    worker_kb = [int(f.read_text()) for f in peaks_dir.glob("*.kb")]
    shutil.rmtree(peaks_dir, ignore_errors=True)
    return {"seconds": seconds, "files": n,
            "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB
            "worker_peak_mb": max(worker_kb, default=0) / 1024, "workers_reported": len(worker_kb)}


def _status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB; VmHWM is its peak since its last exec."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def sample_tree(root: int) -> tuple[float, dict[int, float]]:
    """Summed RSS (MB) of ``root`` and all its descendants, and each descendant's peak RSS (MB)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            parent[int(name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    total, peaks = 0, {}
    root_cmdline = _cmdline(root)
    for pid in tree:
        try:
            if pid != root and _cmdline(pid) == root_cmdline:
                continue  # forked, not yet exec'd: its RSS is the parent's pages, counted already
            rss, hwm = _status_kb(pid)
        except (OSError, ValueError):
            continue  # exited meanwhile
        total += rss
        if pid != root:
            peaks[pid] = hwm / 1024
    return total / 1024, peaks


_TRASH: list[Path] = []  # the folder outputs are set aside in until the benchmark ends


def set_aside(out: Path) -> None:
    """Move a run's output out of the way (a rename) instead of deleting it now; :func:`main`
    deletes them all when the benchmark ends.

    Deleting thousands of files between runs would slow down the next medops run: on an ext4 file
    system without a journal (this VM's root file system), the inode allocator skips every inode
    freed in the last 60 s, or 6 min while its inode table block is unwritten
    (``recently_deleted`` in fs/ext4/ialloc.c), one by one. Measured here: creating a file took
    0.08 ms of CPU in a fresh folder and 0.6 ms after 6,000 files had been deleted, still 0.6 ms
    70 s later; that is 2 % of a JPEG 2000 file's decoding time, paid only by the contender that
    writes files, for the benchmark's own clean-up.
    """
    if not out.exists():
        return
    trash = out.parent / f".trash-{os.getpid()}"
    trash.mkdir(exist_ok=True)
    if trash not in _TRASH:
        _TRASH.append(trash)
    out.rename(trash / f"{len(list(trash.iterdir()))}-{out.name}")


def measure(contender: str, folder: Path, out: Path, workers: int, image_size: int) -> dict:
    """One contender in a fresh process; its process tree sampled every 0.1 s from /proc.

    Returns the contender's own report plus ``tree_peak_mb`` (the largest summed RSS of the
    tree), ``worker_peak_mb`` (the largest VmHWM of a descendant, as last sampled) and
    ``processes`` (the most processes seen at once).
    """
    if out.exists():
        set_aside(out)  # not timed
    spec = {"contender": contender, "folder": str(folder), "out": str(out), "workers": workers,
            "image_size": image_size}
    with tempfile.TemporaryFile("w+") as result_file:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--measure-one",
                                 json.dumps(spec)], stdout=result_file)
        peak, processes, workers_hwm = 0.0, 0, {}
        while proc.poll() is None:
            rss, peaks = sample_tree(proc.pid)
            peak, processes = max(peak, rss), max(processes, len(peaks) + 1)
            workers_hwm.update(peaks)
            time.sleep(0.1)
        result_file.seek(0)
        output = result_file.read()
    if proc.returncode != 0:
        raise SystemExit(f"{contender} on {folder} failed (exit {proc.returncode}): {output[-2000:]}")
    set_aside(out)  # deleted at the end of the benchmark, see set_aside
    result = json.loads(output.strip().splitlines()[-1])
    # the sampled VmHWM can only be lower than a worker's own report (it misses the end of its
    # life), but it covers a worker that died without reporting
    result.update(tree_peak_mb=peak, processes=processes,
                  worker_peak_mb=max([result["worker_peak_mb"], *workers_hwm.values()]))
    return result


def warm_cache(files: list[Path]) -> None:
    """Read every file once, so no contender pays for the first read from disk."""
    for f in files:
        f.read_bytes()


# --- estimate ---------------------------------------------------------------------------------

def _per_file_costs(size: int, encoding: str) -> tuple[float, float]:
    """Seconds to generate one file and to put it through the plain loop (best of 3)."""
    import io

    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    from PIL import Image

    gen, proc = [], []
    for i in range(3):
        t = time.perf_counter()
        ds = make_dataset(i, size, "2.25.1", "2.25.2")
        if encoding != "raw":
            ds.compress(ENCODINGS[encoding])
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        gen.append(time.perf_counter() - t)
        t = time.perf_counter()
        buf.seek(0)
        ds = pydicom.dcmread(buf)
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
        Image.fromarray(arr).resize((28, 28), Image.Resampling.BILINEAR)
        proc.append(time.perf_counter() - t)
    return min(gen), min(proc)


# medops' cost per file beyond decoding (hash, de-identify, write the file, bookkeeping), seconds
# on one worker: from 64x64 files on the 2-core development machine; only feeds the estimate
MEDOPS_FIXED_S = 0.012


def estimate_seconds(args, encodings: list[str]) -> tuple[float, float]:
    """A rough duration of this run from one file per encoding: (total, of it generating).

    Model: generation on all workers; plain = n x per-file cost; decode-limit ~ that / workers;
    medops ~ (1.5 x the per-file cost + MEDOPS_FIXED_S) / workers; ~3 s start-up per process.
    """
    total = gen_total = 0.0
    workers = max(1, args.workers)
    jobs = []
    if "throughput" in args.sections:
        jobs += [(enc, args.files, args.size, True) for enc in encodings]
    if "memory" in args.sections:
        jobs += [("raw", n, args.memory_size, False) for n in args.memory_files]
    for enc, n, size, all_three in jobs:
        t_gen, t_proc = _per_file_costs(size, enc)
        if not is_cached(work_folder(args.work_dir, enc, n, size), spec_of(n, size, enc)):
            gen_total += n * t_gen / workers
        medops = n * (1.5 * t_proc + MEDOPS_FIXED_S) / workers + 3
        total += (n * t_proc + n * t_proc / workers + medops + 6) * args.repeats if all_three else medops
        total += n * 0.0002  # warming the page cache
    return total + gen_total, gen_total


# --- main -------------------------------------------------------------------------------------

def _median_run(runs: list[dict]) -> dict:
    """The run with the median time; memory figures are the maxima over all runs."""
    best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return {**best, "tree_peak_mb": max(r["tree_peak_mb"] for r in runs),
            "self_maxrss_mb": max(r["self_maxrss_mb"] for r in runs),
            "worker_peak_mb": max(r["worker_peak_mb"] for r in runs),
            "seconds_all": [round(r["seconds"], 3) for r in runs]}


def throughput(args, encodings: list[str]) -> tuple[list[dict], bool]:
    rows = []
    for encoding in encodings:
        t0 = time.perf_counter()
        folder = generate(work_folder(args.work_dir, encoding, args.files, args.size), args.files,
                          args.size, encoding, args.workers)
        files = list_files(folder)
        warm_cache(files)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{encoding}: {len(files)} files, {mb:.0f} MB (ready in {time.perf_counter() - t0:.1f} s)",
              flush=True)
        row: dict = {"encoding": encoding, "files": len(files), "megabytes": round(mb, 1)}
        # repeats interleave the contenders (plain, limit, medops, plain, ...), so that a machine
        # whose speed drifts during the run (a shared VM) slows all of them alike
        runs: dict[str, list[dict]] = {contender: [] for contender in CONTENDERS}
        for _ in range(args.repeats):
            for contender in CONTENDERS:
                run = measure(contender, folder, args.work_dir / f"out-{contender}-{encoding}",
                              args.workers, args.image_size)
                if run["files"] != len(files):
                    raise SystemExit(f"{contender} handled {run['files']} of {len(files)} files")
                runs[contender].append(run)
        for contender in CONTENDERS:
            r = _median_run(runs[contender])
            row[contender] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
            row[contender]["files_per_s"] = round(len(files) / r["seconds"], 2)
            print(f"  {contender:12s} {r['seconds']:8.2f} s {len(files) / r['seconds']:8.1f} files/s   "
                  f"tree peak {r['tree_peak_mb']:6.0f} MB ({r['processes']} processes), peak RSS "
                  f"self {r['self_maxrss_mb']:5.0f} MB, largest worker {r['worker_peak_mb']:5.0f} MB",
                  flush=True)
        plain, med, lim = (row[c]["files_per_s"] for c in ("plain", "medops", "decode-limit"))
        row["ratios"] = {"medops/plain": round(med / plain, 3), "medops/limit": round(med / lim, 3)}
        row["checks"] = [{"ratio": name, "target": target, "value": row["ratios"][name],
                          "pass": row["ratios"][name] >= target} for name, target in TARGETS[encoding]]
        rows.append(row)
        if args.json:  # written as it goes, so a run cut short keeps what it measured
            _write_json(args, rows, None)

    header = (f"{'encoding':8s} {'files':>6s} {'plain f/s':>10s} {'medops f/s':>11s} "
              f"{'limit f/s':>10s} {'medops/plain':>21s} {'medops/limit':>21s}")
    print(f"\nThroughput: {args.files} files of {args.size}x{args.size} int16 CT, "
          f"{args.workers} worker(s), output {args.image_size}x{args.image_size}")
    print(header + "\n" + "-" * len(header))
    ok = True

    def cell(row: dict, name: str) -> str:
        value = row["ratios"][name]
        check = next((c for c in row["checks"] if c["ratio"] == name), None)
        if check is None:
            return f"{value:6.2f}x (no target)"
        return f"{value:5.2f}x >= {check['target']:.2f} {'PASS' if check['pass'] else 'FAIL'}"

    for row in rows:
        ok &= all(c["pass"] for c in row["checks"])
        print(f"{row['encoding']:8s} {row['files']:6d} {row['plain']['files_per_s']:10.1f} "
              f"{row['medops']['files_per_s']:11.1f} {row['decode-limit']['files_per_s']:10.1f} "
              f"{cell(row, 'medops/plain'):>21s} {cell(row, 'medops/limit'):>21s}")
    print("\nPeak memory per run, MB (tree peak = summed RSS of the process and its workers):")
    print(f"{'encoding':8s} " + " ".join(f"{c:>24s}" for c in CONTENDERS))
    for row in rows:
        print(f"{row['encoding']:8s} " + " ".join(
            f"{row[c]['tree_peak_mb']:9.0f} ({row[c]['self_maxrss_mb']:4.0f}+{row[c]['worker_peak_mb']:4.0f})"
            .rjust(24) for c in CONTENDERS))
    print("(in brackets: peak RSS of the main process + of its largest worker)")
    print("medops does more per file than either contender: it hashes, de-identifies and writes "
          "every file, and writes shards and metadata; decode-limit is decoding alone on all workers.")
    return rows, ok


def memory_scaling(args) -> tuple[dict, bool]:
    counts = sorted(args.memory_files)
    print(f"\nMemory: medops ingest of {' vs '.join(f'{n:,}' for n in counts)} files, "
          f"{args.memory_size}x{args.memory_size} uncompressed (small files, so that {counts[-1]:,} "
          f"fit in minutes; the throughput section shows the peaks with full-size files), "
          f"{args.workers} worker(s)", flush=True)
    runs = []
    for n in counts:
        folder = generate(work_folder(args.work_dir, "raw", n, args.memory_size), n, args.memory_size,
                          "raw", args.workers)
        warm_cache(list_files(folder))
        r = measure("medops", folder, args.work_dir / "out-memory", args.workers, args.image_size)
        if r["files"] != n:
            raise SystemExit(f"medops handled {r['files']} of {n} files")
        runs.append({"files": n, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}})
        print(f"  {n:7,d} files {r['seconds']:7.1f} s   tree peak {r['tree_peak_mb']:6.0f} MB "
              f"({r['processes']} processes), peak RSS main {r['self_maxrss_mb']:5.0f} MB, "
              f"largest worker {r['worker_peak_mb']:5.0f} MB", flush=True)
    first, last = runs[0], runs[-1]
    ratios = {k: round(last[k] / first[k], 3) if first[k] else float("nan")
              for k in ("tree_peak_mb", "self_maxrss_mb", "worker_peak_mb")}
    ok = ratios["tree_peak_mb"] <= MEMORY_FLAT
    print(f"  {last['files']:,} / {first['files']:,} files: tree peak x{ratios['tree_peak_mb']:.2f} "
          f"(<= {MEMORY_FLAT} {'PASS' if ok else 'FAIL'}), main process x{ratios['self_maxrss_mb']:.2f}, "
          f"largest worker x{ratios['worker_peak_mb']:.2f}")
    return {"size": args.memory_size, "runs": runs, "ratios": ratios, "limit": MEMORY_FLAT, "pass": ok}, ok


def _write_json(args, rows, memory) -> None:
    args.json.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "loadavg": os.getloadavg()},
        "workers": args.workers, "files": args.files, "size": args.size, "image_size": args.image_size,
        "repeats": args.repeats, "throughput": rows, "memory": memory}, indent=2) + "\n")


def _duration(seconds: float) -> str:
    return f"~{seconds:.0f} s" if seconds < 120 else f"~{seconds / 60:.0f} min"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                   help="processes for medops and decode-limit (default: all cores)")
    p.add_argument("--image-size", type=int, default=28, help="ingest output size")
    p.add_argument("--encodings", nargs="+", choices=sorted(ENCODINGS), default=["raw", "j2k"],
                   help="jls needs pyjpegls")
    p.add_argument("--repeats", type=int, default=1, help="runs per contender; the median is shown")
    p.add_argument("--sections", nargs="+", choices=["throughput", "memory"],
                   default=["throughput", "memory"])
    p.add_argument("--memory-files", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--memory-size", type=int, default=64, help="rows = columns in the memory section")
    p.add_argument("--work-dir", type=Path, default=Path(".medops/bench/ingest"))
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--measure-one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_one:
        print(json.dumps(measure_one(json.loads(args.measure_one))), flush=True)
        return 0
    if len(args.memory_files) < 2 and "memory" in args.sections:
        p.error("--memory-files needs at least two counts")
    args.work_dir = args.work_dir.resolve()

    encodings = []
    for encoding in args.encodings:
        ok, missing = encoder_available(encoding)
        if ok:
            encodings.append(encoding)
        else:
            print(f"{encoding}: skipped, no encoder installed ({missing})")
    if "throughput" in args.sections and not encodings:
        return 1
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPU(s), load average {load:.1f}, python {sys.version.split()[0]}, "
          f"work dir {args.work_dir}")
    if load > 0.5 * (os.cpu_count() or 1):
        print("warning: the machine is busy; throughput figures will be low and noisy")
    total, gen = estimate_seconds(args, encodings)
    print(f"estimated duration: {_duration(total)}"
          + (f", of which {_duration(gen)} generating files (cached for later runs)" if gen else "")
          + " (a rough guess from one file per encoding)", flush=True)
    started = time.perf_counter()

    rows, memory, ok = [], None, True
    try:
        if "throughput" in args.sections:
            rows, passed = throughput(args, encodings)
            ok &= passed
        if "memory" in args.sections:
            memory, passed = memory_scaling(args)
            ok &= passed
    finally:
        for trash in _TRASH:  # see set_aside
            shutil.rmtree(trash, ignore_errors=True)
    print(f"\n{'all targets met' if ok else 'some targets missed'} "
          f"(took {(time.perf_counter() - started) / 60:.1f} min)")
    if args.json:
        _write_json(args, rows, memory)
    return 1 if args.check and not ok else 0


if __name__ == "__mp_main__" and os.environ.get(_PEAKS_ENV):
    # this file imported as the main module of a spawned worker of a measured run: report the
    # worker's peak RSS as it exits (multiprocessing runs these finalizers at a worker's exit)
    from multiprocessing import util

    util.Finalize(None, _report_worker_peak, exitpriority=0)

if __name__ == "__main__":
    raise SystemExit(main())
