"""Ingest benchmark: medops ingest vs a plain single-process loop vs the parallel decode limit.

Generates N CT-like 512 x 512 16-bit slices (signed, rescale intercept -1024, a soft-tissue
window; a seeded phantom with body, lungs, bone and noise) in each encoding: uncompressed
(explicit VR little endian), JPEG 2000 lossless and JPEG-LS lossless (JPEG-LS needs an encoder:
``pip install pyjpegls``; without one it is skipped with a note). Then, per encoding, times:

- ``plain``: what one would write first: one process, ``dcmread`` + ``pixel_array`` + modality
  LUT + VOI + resize per file (no de-identification, no output files);
- ``medops``: ``medops.ingest.run`` with ``--workers`` processes (reads, de-identifies, writes
  de-identified DICOM, decodes, preprocesses, writes shards + metadata);
- ``decode-limit``: ``--workers`` processes that only read and decode (``pixel_array``), in
  chunks: the most any parallel ingest could reach on this machine;

and prints files/s side by side with the ratios medops/plain and medops/decode-limit.

Usage::

    python benchmarks/ingest/run.py --files 2000 --workers 2
    python benchmarks/ingest/run.py --files 200 --encodings raw j2k   # a quick look

Generated files are cached under ``--work-dir`` (default ``.medops/bench/ingest``) per
(files, size, encoding), so repeated runs time only the ingest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
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
KEY = b"benchmark-key-not-a-secret-0123456789"


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


def generate(folder: Path, n: int, size: int, encoding: str, workers: int) -> Path:
    """Write the files once; a marker file makes later runs reuse them."""
    marker = folder.parent / f"{folder.name}.complete.json"  # outside: ingest reads every file
    spec = {"files": n, "size": size, "encoding": encoding}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    marker.unlink(missing_ok=True)
    step = max(1, math.ceil(n / (workers * 8)))
    batches = [(list(range(i, min(i + step, n))), size, encoding, str(folder)) for i in range(0, n, step)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        written = sum(pool.map(_write_batch, batches))
    assert written == n
    marker.write_text(json.dumps(spec))
    return folder


# --- the three contenders ---------------------------------------------------------------------

def plain_loop(files: list[Path], image_size: int) -> int:
    """The obvious single-process loop: read, decode, modality LUT, VOI, resize."""
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    done = 0
    for f in files:
        ds = pydicom.dcmread(f)
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-9)
        Image.fromarray(arr.astype(np.float32)).resize((image_size, image_size), Image.Resampling.BILINEAR)
        done += 1
    return done


def _decode_chunk(paths: list[str]) -> int:
    import pydicom

    for p in paths:
        pydicom.dcmread(p).pixel_array
    return len(paths)


def decode_limit(files: list[Path], workers: int) -> int:
    size = max(1, min(64, math.ceil(len(files) / (workers * 4))))
    chunks = [[str(f) for f in files[i:i + size]] for i in range(0, len(files), size)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return sum(pool.map(_decode_chunk, chunks))


def medops_ingest(folder: Path, out: Path, workers: int, image_size: int) -> int:
    from medops import ingest
    from medops.config import IngestConfig

    if out.exists():
        shutil.rmtree(out)
    cfg = IngestConfig(workers=workers, image_size=image_size)
    result = ingest.run(cfg, source_dir=folder, out_dir=out, key=KEY, incremental=False)
    if result.used != result.files_seen:
        raise SystemExit(f"medops quarantined {result.quarantined} files: {result.quarantined_by_reason}")
    return result.used


def timed(fn, *args) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - start, n


# --- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--image-size", type=int, default=28, help="ingest output size")
    p.add_argument("--encodings", nargs="+", choices=sorted(ENCODINGS), default=["raw", "j2k", "jls"])
    p.add_argument("--work-dir", type=Path, default=Path(".medops/bench/ingest"))
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    print(f"{args.files} files of {args.size}x{args.size} int16, {args.workers} worker(s), "
          f"{os.cpu_count()} CPU(s), python {sys.version.split()[0]}")
    rows = []
    for encoding in args.encodings:
        ok, missing = encoder_available(encoding)
        if not ok:
            print(f"{encoding}: skipped, no encoder installed ({missing})")
            continue
        t0 = time.perf_counter()
        folder = generate(args.work_dir / f"{encoding}-{args.files}-{args.size}", args.files, args.size,
                          encoding, args.workers)
        files = sorted(folder.rglob("*.dcm"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{encoding}: {len(files)} files, {mb:.0f} MB (ready in {time.perf_counter() - t0:.1f} s)")
        t_plain, _ = timed(plain_loop, files, args.image_size)
        t_limit, _ = timed(decode_limit, files, args.workers)
        t_medops, _ = timed(medops_ingest, folder, args.work_dir / f"out-{encoding}", args.workers,
                            args.image_size)
        rows.append({"encoding": encoding, "files": len(files), "megabytes": round(mb, 1),
                     "plain_s": round(t_plain, 2), "medops_s": round(t_medops, 2),
                     "decode_limit_s": round(t_limit, 2)})

    if not rows:
        return 1
    header = (f"{'encoding':8s} {'plain f/s':>10s} {'medops f/s':>11s} {'decode-limit f/s':>17s} "
              f"{'medops/plain':>13s} {'medops/limit':>13s}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        n = r["files"]
        plain, med, lim = n / r["plain_s"], n / r["medops_s"], n / r["decode_limit_s"]
        r.update(plain_fps=round(plain, 1), medops_fps=round(med, 1), decode_limit_fps=round(lim, 1),
                 medops_over_plain=round(med / plain, 2), medops_over_limit=round(med / lim, 2))
        print(f"{r['encoding']:8s} {plain:10.1f} {med:11.1f} {lim:17.1f} {med / plain:12.2f}x "
              f"{med / lim:12.2f}x")
    print("\nmedops does more per file than either contender (de-identification, writing the "
          "de-identified file, metadata, shards); decode-limit is decoding alone on all workers.")
    if args.json:
        args.json.write_text(json.dumps({"workers": args.workers, "size": args.size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
