"""The whole ``medops ingest`` command as a user runs it, against the plain loop (issue 11, item 6,
first bullet): each contender a fresh process, timed from its start to its exit (interpreter
start, imports, worker start-up, every output written), on the same uncompressed 512 x 512 CT
slices, in one run, the contenders interleaved (the order alternates every repeat).

    .venv/bin/python benchmarks/scale/command.py [--files 2000] [--size 512] [--repeats 3] \
        [--workers 2] [--json figures.json]

Contenders:

- ``medops``: ``python -m medops --project P ingest SRC --out OUT --workers 2 --full --quiet`` (a
  project folder with the repository's params.yaml; the key from $MEDOPS_DEID_KEY): reads and
  hashes every file, de-identifies and writes it into its shard's pack, decodes and prepares it,
  writes the array shards, metadata.parquet, quarantine.csv and the index.
- ``plain``: one process, ``dcmread`` -> ``pixel_array`` -> modality LUT -> VOI window ->
  min-max -> PIL bilinear resize to 28 x 28, one ``.npy`` per file (``--plain-save per-file``,
  the loop the issue describes) or the images stacked into one ``.npy`` at the end
  (``one``: cheaper, the contender of benchmarks/ingest). No de-identification.

The files are generated once by ``benchmarks/ingest/run.py``'s generator (a seeded phantom, HU +
1024, rescale intercept -1024, a 40/400 window) and read once before timing (page cache). Outputs
are moved aside after each run and deleted at the end (see benchmarks/ingest/README.md, "What is
measured": deleting thousands of files slows the next run's file creation on this VM).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEY = "command-benchmark-key-0123456789abcdef"  # $MEDOPS_DEID_KEY for the medops runs


def _ingest_bench():
    spec = importlib.util.spec_from_file_location("ingest_bench", ROOT / "benchmarks" / "ingest" / "run.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def plain(src: Path, out: Path, save: str) -> int:
    """The plain loop (run in a fresh process by ``--plain-child``)."""
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out.mkdir(parents=True, exist_ok=True)
    images = []
    for i, f in enumerate(sorted(src.rglob("*.dcm"))):
        ds = pydicom.dcmread(f)
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-9)
        img = np.asarray(Image.fromarray(arr.astype(np.float32)).resize((28, 28), Image.Resampling.BILINEAR))
        if save == "per-file":
            np.save(out / f"{i:06d}.npy", img)
        else:
            images.append(img)
    if save != "per-file":
        np.save(out / "images.npy", np.stack(images))
    return i + 1


def _timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall-clock seconds of the command, and the CPU seconds of it and all its processes."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers too: their parent waited for them
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--plain-save", default="per-file,one", help="per-file, one, or both (comma)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medops-command-bench")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--baseline", type=Path, help="another medops checkout (e.g. a worktree of the "
                        "commit before a change): its `medops ingest` runs as one more contender")
    parser.add_argument("--plain-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_child:
        plain(Path(args.plain_child[0]), Path(args.plain_child[1]), args.plain_child[2])
        return
    bench = _ingest_bench()
    args.work.mkdir(parents=True, exist_ok=True)
    src = bench.generate(args.work / f"raw-{args.files}-{args.size}", args.files, args.size, "raw", 2)
    bench.warm_cache(bench.list_files(src))
    project = args.work / "project"
    project.mkdir(exist_ok=True)
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEDOPS_DEID_KEY=KEY)
    contenders = {"medops": lambda out: [sys.executable, "-m", "medops", "--project", str(project), "ingest",
                                         str(src), "--out", str(out), "--workers", str(args.workers),
                                         "--full", "--quiet"]}
    if args.baseline:
        base_env = dict(env, PYTHONPATH=str(args.baseline.resolve()))
        contenders["medops-baseline"] = lambda out: contenders["medops"](out)
    for save in args.plain_save.split(","):
        contenders[f"plain-{save}"] = (lambda out, save=save: [sys.executable, __file__, "--plain-child",
                                                               str(src), str(out), save])
    trash = args.work / f".trash-{os.getpid()}"
    trash.mkdir()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    loads = []
    try:
        for repeat in range(args.repeats):
            order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
            for name in order:
                out = args.work / f"out-{name}"
                loads.append(os.getloadavg()[0])
                run_env = base_env if name == "medops-baseline" else env
                wall, cpu_s = _timed(contenders[name](out), run_env, args.work)
                seconds[name].append(round(wall, 2))
                cpu[name].append(round(cpu_s, 2))
                out.rename(trash / f"{name}-{repeat}")
                print(f"repeat {repeat + 1} {name:16s} {seconds[name][-1]:7.2f} s, CPU {cpu[name][-1]:6.2f} s "
                      f"(load {loads[-1]:.2f})",
                      flush=True)
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    figures: dict = {"files": args.files, "size": args.size, "workers": args.workers, "cpus": os.cpu_count(),
                     "seconds": seconds, "cpu_seconds": cpu, "load_1min_before_each_run": loads}
    for name in contenders:
        if name == "medops":
            continue
        ratios = [round(p / m, 3) for p, m in zip(seconds[name], seconds["medops"])]
        figures[f"medops_over_{name}"] = {"per_repeat": ratios, "median": statistics.median(ratios),
                                          "of_medians": round(statistics.median(seconds[name])
                                                              / statistics.median(seconds["medops"]), 3)}
        print(f"medops / {name}: per repeat {ratios}, median {statistics.median(ratios)} (target >= 1.2)")
    print(f"load average (1 min) before each run: {loads}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
