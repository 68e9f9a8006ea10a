"""Crash-safe file writes: an output appears whole under its name, or not at all.

Every file a stage or deploy leaves for another step to read (reports, metrics, plots, models,
ONNX, manifests, configs) is written here: under a hidden temporary name in the same folder, then
renamed over the target (``os.replace``, atomic on POSIX). A process killed half-way (SIGKILL,
the OOM killer, a power cut after the fsync) leaves the previous file, or none, and at worst a
hidden ``.NAME.tmp-*`` file that no reader globs and the next write of that name removes.

``crash_point(name)`` is the test hook at the named points inside that work: with
``MEDOPS_CRASH_AT=name`` (several: comma-separated) in the environment the process kills itself
with SIGKILL there, as a crash would; unset, it does nothing. The named points are listed in
``CRASH_POINTS`` (tests/integration/test_crash_safe.py kills at each).
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["CRASH_ENV", "CRASH_POINTS", "atomic_path", "atomic_write", "crash_point",
           "write_bytes", "write_text"]

CRASH_ENV = "MEDOPS_CRASH_AT"

# Every name crash_point is called with, and where (a test checks each is reachable).
CRASH_POINTS: dict[str, str] = {
    "ingest.decoding": "ingest: some files written into .staging, the rest not yet read",
    "ingest.replacing": "ingest: the index removed, the first staged shard moved into place",
    "ingest.publishing": "publishing the ingest output: some files of data/ingested replaced",
    "train.saved": "train: model.keras saved, train.json not yet written",
    "export.onnx": "export: model.onnx written, golden.npz and export.json not yet",
    "quality.gx_save": "quality: a Great Expectations project file written under its temporary name, not renamed",
    "quality.done": "quality: its outputs written, reports/stages/quality.json not yet",
    "split.done": "split: its outputs written, reports/stages/split.json not yet",
    "train.done": "train: its outputs written, reports/stages/train.json not yet",
    "evaluate.done": "evaluate: its outputs written, reports/stages/evaluate.json not yet",
    "explain.done": "explain: its outputs written, reports/stages/explain.json not yet",
    "gate.done": "gate: its outputs written, reports/stages/gate.json not yet",
    "ood.done": "ood: its outputs written, reports/stages/ood.json not yet",
    "export.done": "export: its outputs written, reports/stages/export.json not yet",
    "quantize.done": "quantize: its outputs written, reports/stages/quantize.json not yet",
    "reference.done": "reference: its outputs written, reports/stages/reference.json not yet",
    "deploy.staging": "deploy: the new version's files half copied into its hidden folder",
    "deploy.written": "deploy: the new version folder in place, not yet checked on Triton",
    "deploy.switching": "deploy: the classifier serves old and new, the ensemble not re-pinned",
    "deploy.served": "deploy: the new version served and checked, deploy.json not yet written",
}


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if ``$MEDOPS_CRASH_AT`` names ``name`` (a test hook)."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would have given the target


def _temp_name(target: Path) -> Path:
    """A fresh hidden name beside ``target`` keeping its suffix (``.model.tmp-x1y2.keras``): some
    writers pick the format from it (Keras, numpy's savez, matplotlib)."""
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}.tmp-", suffix=target.suffix,
                                dir=target.parent)
    os.fchmod(fd, _FILE_MODE)  # mkstemp's 0600 would follow the file to its name
    os.close(fd)
    return Path(name)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """A temporary path beside ``target`` for a library that writes by file name
    (``model.save(tmp)``, ``np.savez(tmp, ...)``, ``frame.to_csv(tmp)``, ``fig.savefig(tmp)``);
    renamed over ``target`` when the block ends without an error, deleted otherwise. The folder
    is created."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    try:
        yield tmp
        if tmp.is_file():
            _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(target: Path | str, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """``open(target, mode)`` that writes a temporary file, renamed over ``target`` on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(target) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh
        fh.flush()


def write_text(target: Path | str, text: str, encoding: str = "utf-8") -> Path:
    """``Path(target).write_text(text)``, atomically; returns ``target`` as a Path."""
    with atomic_write(target, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(target)


def write_bytes(target: Path | str, data: bytes) -> Path:
    """``Path(target).write_bytes(data)``, atomically; returns ``target`` as a Path."""
    with atomic_write(target, "wb") as fh:
        fh.write(data)
    return Path(target)
