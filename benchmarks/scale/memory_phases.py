"""Where the ingest's main process' memory goes: VmHWM / VmRSS every N files and around each
phase after the main loop, in one local-pool ingest (2 workers) of an export ``run.py`` wrote.

    .venv/bin/python benchmarks/scale/memory_phases.py $TMPDIR/medops-scale-bench/export-200000 20000
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (benchmarks/scale/run.py: the export, the ingest settings)

from medops.stages.ingest import stage  # noqa: E402

marks: list[tuple[str, dict[str, float]]] = []


def status() -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmHWM", "VmRSS")}


def mark(name: str) -> None:
    marks.append((name, status()))


def wrap(owner, attr: str) -> None:
    real = getattr(owner, attr)

    def wrapped(*args, **kwargs):
        mark(f"before {attr}")
        try:
            return real(*args, **kwargs)
        finally:
            mark(f"after {attr}")

    setattr(owner, attr, wrapped)


def main() -> None:
    export, every = Path(sys.argv[1]), int(sys.argv[2])
    for owner, attr in ((stage._StagedOutputs, "finish"), (stage._StagedOutputs, "settle_shards"),
                        (stage, "_write_metadata"), (stage, "_replace_outputs")):
        wrap(owner, attr)
    real_write = stage._StagedOutputs.write

    def write(self, *args):
        real_write(self, *args)
        if self.files_seen % every == 0:
            mark(f"files {self.files_seen}")

    stage._StagedOutputs.write = write
    out = Path(tempfile.gettempdir()) / "medops-memory-phases"
    mark("start")
    _, seconds = run._ingest(export, out, None)
    mark("end")
    shutil.rmtree(out, ignore_errors=True)
    for name, values in marks:
        print(f"{name:28s} {values}")
    print(f"{seconds:.1f} s")


if __name__ == "__main__":
    main()
