"""Ingest: a hospital DICOM export -> de-identified DICOM + model-ready arrays + metadata.

Inputs:  ``source_dir``: every file below it, any name, any depth (nothing is skipped silently:
         each file is either used or listed in quarantine.csv with a reason);
         ``manifest`` (optional): CSV or Parquet with ``label`` (0/1, may be empty), optionally
         ``split``, and ``sop_instance_uid`` (the ORIGINAL SOP Instance UID) and/or ``path``
         (relative to source_dir) to match files. With a manifest, a file it does not list is
         quarantined as ``no_label``; without one, labels and splits come from folder names
         (``NORMAL`` / ``PNEUMONIA``, ``train`` / ``val`` / ``test``) where there are any.
Outputs: below ``out_dir``, exactly as :mod:`medops.data` documents: ``dicom/`` (de-identified
         files, PS3.15 Annex E), ``arrays/shard-NNNNN.npy`` (float32 (n, S, S) in [0, 1]),
         ``metadata.parquet`` (METADATA_COLUMNS, one row per used image, pseudonymous UIDs only)
         and ``quarantine.csv`` (``path`` relative to source_dir, ``reason``, ``detail``; written
         even when empty); ``ingest_index.json`` (settings fingerprint and each source file's
         SHA-256, for incremental runs).
Params:  ``ingest`` (image_size, window, workers, shard_size, deid).

Files are read, de-identified and decoded in ``workers`` processes, a chunk of files per task so
that inter-process traffic does not dominate; the parent assigns rows to shards in source-path
order, so the output does not depend on the number of workers. Shards are written as they fill,
so memory stays bounded by a few chunks and one shard. A re-run over a grown export decodes only
the new content (see :func:`run`); the same inputs always give byte-identical outputs.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from pydantic import BaseModel

from medops.config import IngestConfig
from medops.errors import DicomReadError, IngestError, QuarantineReason

# medops.data (and so pandas) is imported inside the functions that need it: the worker
# processes import this module, and pandas would double their start-up time for nothing
log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
QUARANTINE_COLUMNS = ("path", "reason", "detail")
_MAX_CHUNK = 64        # files per task: bounds the memory a task's results hold
_AHEAD_PER_WORKER = 3  # tasks in flight per worker: keeps workers busy without piling up results


class IngestResult(BaseModel):
    """What the ingest stage did; ``quarantined_by_reason`` uses QuarantineReason values."""

    files_seen: int
    used: int
    quarantined: int
    quarantined_by_reason: dict[str, int]
    labelled: int
    shards: int
    decoded: int        # files read and decoded by this run
    reused: int         # files whose earlier outcome was kept (incremental run)
    changed: bool       # False when the run found nothing to change and wrote nothing
    image_size: int
    seconds: float
    out_dir: Path
    dicom_dir: Path
    arrays_dir: Path
    metadata: Path
    quarantine: Path


@dataclass
class FileOutcome:
    """One source file's fate, as a worker reports it."""

    path: str                      # relative to source_dir, POSIX separators
    sha256: str = ""
    original_sop_uid: str = ""
    reason: str | None = None      # a QuarantineReason value, None when used
    detail: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = None


# --- manifest ---------------------------------------------------------------------------------

def _manifest_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Column names and rows (as strings) of a CSV or Parquet manifest."""
    if path.suffix.lower() in (".parquet", ".pq"):
        import pandas as pd

        try:
            df = pd.read_parquet(path)
        except Exception as exc:
            raise IngestError(f"manifest {path} cannot be read as Parquet: {exc}") from exc
        df = df.astype(object).where(df.notna(), "")
        return [str(c) for c in df.columns], [{k: str(v) for k, v in r.items()} for r in df.to_dict("records")]
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            return list(reader.fieldnames or ()), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IngestError(f"manifest {path} cannot be read: {exc}") from exc


def read_manifest(path: Path) -> dict[str, tuple[int | None, str | None]]:
    """Labels from a CSV or Parquet manifest, keyed ``uid:<original SOPInstanceUID>`` and
    ``path:<path relative to source_dir>``; values ``(label or None, split or None)``.

    A row is matched to a file by its original SOP Instance UID when it has one, else by its
    ``path`` (what the ``medops ingest --manifest`` help promises).

    Raises:
        IngestError: the file is missing or unreadable, lacks ``label`` or both key columns, has
            a label that is not 0/1/empty, or gives one UID or path two different labels.
    """
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"manifest {path} does not exist")
    columns, rows = _manifest_rows(path)
    if "label" not in columns or not {"sop_instance_uid", "path"} & set(columns):
        raise IngestError(f"manifest {path} needs a label column and a sop_instance_uid or path "
                          f"column; has {columns}")
    labels: dict[str, tuple[int | None, str | None]] = {}
    for line, row in enumerate(rows, start=2):
        raw = (row.get("label") or "").strip()
        if raw in ("", "nan", "NA", "<NA>", "None"):
            label = None
        elif raw in ("0", "1", "0.0", "1.0"):
            label = int(float(raw))
        else:
            raise IngestError(f"manifest {path} line {line}: label must be 0, 1 or empty, got {raw!r}")
        split = (row.get("split") or "").strip() or None
        uid = (row.get("sop_instance_uid") or "").strip()
        rel = (row.get("path") or "").strip().replace("\\", "/")
        for key in ([f"uid:{uid}"] if uid else []) + ([f"path:{rel}"] if rel and not uid else []):
            if key in labels and labels[key][0] != label:
                raise IngestError(f"manifest {path} line {line}: {key[key.index(':') + 1:]} has "
                                  f"labels {labels[key][0]} and {label}")
            labels[key] = (label, split)
    return labels


# --- the per-file work (runs in worker processes) ---------------------------------------------

_STATE: dict[str, Any] = {}


def _init_worker(cfg: IngestConfig, key: bytes, labels: dict | None, source_dir: str, dicom_dir: str,
                 frame: str) -> None:
    _STATE.update(cfg=cfg, key=key, labels=labels, source_dir=Path(source_dir),
                  dicom_dir=Path(dicom_dir), frame=frame)


def _write_atomically(ds: Any, target: Path) -> None:
    import pydicom

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".dcm")
    os.close(fd)
    try:
        try:
            pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
        except Exception:
            # e.g. a file read without File Meta whose meta cannot be completed: write as read
            pydicom.dcmwrite(tmp, ds, enforce_file_format=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def process_file(rel: str) -> FileOutcome:
    """Read, check, decode and de-identify one file; every per-file failure becomes data."""
    from medops.dicom import deid
    from medops.dicom.io import read_dataset
    from medops.dicom.pixels import prepare_image

    cfg: IngestConfig = _STATE["cfg"]
    key: bytes = _STATE["key"]
    labels: dict | None = _STATE["labels"]
    out = FileOutcome(path=rel)
    try:
        data = (_STATE["source_dir"] / rel).read_bytes()
    except OSError as exc:
        out.reason, out.detail = QuarantineReason.NOT_DICOM.value, f"cannot read: {exc}"
        return out
    out.sha256 = hashlib.sha256(data).hexdigest()
    try:
        ds = read_dataset(data)
        out.original_sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES" \
                and not cfg.deid.allow_burned_in:
            raise DicomReadError("BurnedInAnnotation is YES: the pixels may show identifying text",
                                 QuarantineReason.BURNED_IN_ANNOTATION)
        label: int | None = None
        split: str | None = None
        if labels is not None:
            entry = labels.get(f"uid:{out.original_sop_uid}") or labels.get(f"path:{rel}")
            if entry is None:
                raise DicomReadError("neither its SOPInstanceUID nor its path is in the manifest",
                                     QuarantineReason.NO_LABEL)
            label, split = entry
        image = prepare_image(ds, image_size=cfg.image_size, window=cfg.window,
                              frame=_STATE["frame"])
    except DicomReadError as exc:
        out.reason, out.detail = exc.reason.value, _strip_source(str(exc))
        return out

    # read from the ORIGINAL header, before de-identification removes what they come from
    sex, age = deid.patient_sex(ds), deid.patient_age_years(ds)
    modality = str(ds.get("Modality", "") or "") or None
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    try:
        deid.deidentify(ds, key, retain_longitudinal=cfg.deid.retain_longitudinal)
        if not out.original_sop_uid:
            ds.SOPInstanceUID = deid.pseudonymize_uid("content:" + out.sha256, key)
        sop = str(ds.SOPInstanceUID)
        study = str(ds.get("StudyInstanceUID", "") or "") or "no-study"
        rel_deid = Path("dicom") / study / f"{sop}.dcm"
        _write_atomically(ds, _STATE["dicom_dir"].parent / rel_deid)
    except Exception as exc:  # never keep a half-de-identified file, never stop the stage
        out.reason = QuarantineReason.DEID_FAILED.value
        # the type only: a message could quote a header value, and this lands in quarantine.csv
        out.detail = f"could not de-identify or write the file ({type(exc).__name__})"
        return out
    out.image = image
    out.record = {
        "sop_instance_uid": sop,
        "study_instance_uid": str(ds.get("StudyInstanceUID", "") or "") or None,
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "") or "") or None,
        "patient_id": str(ds.PatientID),
        "patient_sex": sex,
        "patient_age": age,
        "modality": modality,
        "rows": rows,
        "columns": columns,
        "label": label,
        "manifest_split": split,
        "pixel_mean": float(image.mean()),
        "pixel_std": float(image.std()),
        "pixel_min": float(image.min()),
        "pixel_max": float(image.max()),
        "content_sha256": out.sha256,
        "deid_path": rel_deid.as_posix(),
    }
    return out


def _strip_source(message: str) -> str:
    """Drop the '<bytes>: ' prefix read_dataset puts on messages; the path column says which file."""
    return message.split(": ", 1)[1] if message.startswith("<bytes>: ") else message


def process_chunk(rels: list[str]) -> list[FileOutcome]:
    return [process_file(rel) for rel in rels]


# --- orchestration ----------------------------------------------------------------------------

def list_source_files(source_dir: Path) -> list[str]:
    """Every regular file below ``source_dir`` (any name, any depth), as sorted POSIX paths."""
    files = []
    for dirpath, dirnames, filenames in os.walk(source_dir, followlinks=False):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath) / name
            if full.is_file():
                files.append(full.relative_to(source_dir).as_posix())
    return sorted(files)


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _start_pool(workers: int, init_args: tuple) -> ProcessPoolExecutor | None:
    """A started worker pool, or None when worker processes cannot run here at all.

    spawn, not fork: the caller (a Prefect worker, a test runner) may hold threads and locks.
    """
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                               initializer=_init_worker, initargs=init_args)
    try:
        pool.submit(int).result()
    except Exception as exc:  # e.g. a __main__ that cannot be re-imported (python - < script)
        pool.shutdown(wait=False, cancel_futures=True)
        log.warning("ingest worker processes cannot start (%s: %s); decoding in this process",
                    type(exc).__name__, exc)
        return None
    return pool


def _isolate(chunk: list[str], init_args: tuple) -> list[FileOutcome]:
    """Run a chunk whose worker died one file per task, to quarantine only the file that kills it."""
    out: list[FileOutcome] = []
    pool = _start_pool(1, init_args)
    for rel in chunk:
        if pool is None:
            _init_worker(*init_args)
            out.append(process_file(rel))
            continue
        try:
            out.append(pool.submit(process_file, rel).result())
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            out.append(FileOutcome(path=rel, reason=QuarantineReason.DECODE_ERROR.value,
                                   detail="the decoder crashed the worker process reading this file"))
            pool = _start_pool(1, init_args)
    if pool is not None:
        pool.shutdown()
    return out


def _outcomes(files: list[str], workers: int, init_args: tuple) -> Iterator[FileOutcome]:
    """Outcomes in ``files`` order, with a bounded number of chunks in flight.

    ``workers == 1`` decodes in this process. Otherwise a worker that dies (a decoder plugin that
    crashes on a malformed file) costs a pool restart, and the chunk it held is retried one file
    per task, so only the culprit is quarantined and the stage goes on.
    """
    if not files:
        return
    size = max(1, min(_MAX_CHUNK, math.ceil(len(files) / (workers * 4))))
    chunks = _chunks(files, size)
    pool = _start_pool(min(workers, len(chunks)), init_args) if workers > 1 and len(chunks) > 1 else None
    if pool is None:
        _init_worker(*init_args)
        for chunk in chunks:
            yield from process_chunk(chunk)
        return
    pending: dict[int, Future] = {}
    submitted = 0
    try:
        for current in range(len(chunks)):
            while submitted < len(chunks) and len(pending) < workers * _AHEAD_PER_WORKER:
                pending[submitted] = pool.submit(process_chunk, chunks[submitted])
                submitted += 1
            try:
                results = pending.pop(current).result()
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                results = _isolate(chunks[current], init_args)
                restarted = _start_pool(min(workers, len(chunks)), init_args)
                if restarted is None:
                    raise IngestError("ingest worker processes cannot be restarted after a crash")
                pool = restarted
                pending = {i: pool.submit(process_chunk, chunks[i]) for i in sorted(pending)}
            yield from results
    finally:
        pool.shutdown(cancel_futures=True)


class _ShardWriter:
    """Writes images into ``root/arrays/shard-NNNNN.npy`` as each shard fills (bounded memory)."""

    def __init__(self, root: Path, shard_size: int) -> None:
        self.root, self.shard_size = root, shard_size
        self.buffer: list[np.ndarray] = []
        self.shards = 0

    def add(self, image: np.ndarray) -> tuple[int, int]:
        where = (self.shards, len(self.buffer))
        self.buffer.append(np.asarray(image, dtype=np.float32))
        if len(self.buffer) == self.shard_size:
            self.flush()
        return where

    def flush(self) -> None:
        from medops.data import shard_path

        if not self.buffer:
            return
        path = shard_path(self.root, self.shards)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.stack(self.buffer).astype(np.float32))
        self.buffer = []
        self.shards += 1


INDEX_NAME = "ingest_index.json"
_STAGING = ".staging"
# written before anything else, so a run that crashed half-way is still recognised as ours
_OWNER_MARKER = ".medops-ingest"
# reasons that belong to the file itself; no_label and duplicate depend on other inputs, so files
# quarantined for them are looked at again on every run
_INTRINSIC = {r.value for r in QuarantineReason} - {QuarantineReason.NO_LABEL.value,
                                                     QuarantineReason.DUPLICATE.value}
# folder names that carry a label or a split when there is no manifest (e.g. the Kaggle
# chest-xray layout train/NORMAL, train/PNEUMONIA)
FOLDER_LABELS = {"normal": 0, "negative": 0, "pneumonia": 1, "positive": 1, "abnormal": 1}
FOLDER_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


def labels_from_path(rel: str) -> tuple[int | None, str | None]:
    """``(label, split)`` from the folder names of a relative path (nearest folder wins)."""
    label: int | None = None
    split: str | None = None
    for part in reversed(rel.split("/")[:-1]):
        low = part.strip().lower()
        if label is None and low in FOLDER_LABELS:
            label = FOLDER_LABELS[low]
        if split is None and low in FOLDER_SPLITS:
            split = FOLDER_SPLITS[low]
    return label, split


def _fingerprint(cfg: IngestConfig, key: bytes, frame: str) -> str:
    """What makes earlier outputs reusable: every setting that changes a pixel or a pseudonym."""
    import hmac
    import json

    from medops import __version__

    key_id = hmac.new(key, b"medops ingest key id", hashlib.sha256).hexdigest()[:16]
    payload = json.dumps({"ingest": cfg.model_dump(mode="json", exclude={"workers"}), "frame": frame,
                          "key": key_id, "medops": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class _Previous:
    """The outputs of an earlier run with the same fingerprint."""

    files: dict[str, str]                        # rel -> sha256
    used: dict[str, dict[str, Any]]              # sha256 -> metadata row
    quarantined: dict[str, tuple[str, str]]      # rel -> (reason, detail)
    metadata: Any                                # the DataFrame as read
    quarantine_text: str


def _load_previous(out_dir: Path, fingerprint: str) -> _Previous | None:
    import json

    import pandas as pd

    from medops.data import METADATA_COLUMNS

    try:
        index = json.loads((out_dir / INDEX_NAME).read_text())
        if index.get("fingerprint") != fingerprint:
            return None
        md = pd.read_parquet(out_dir / "metadata.parquet")
        quarantine_text = (out_dir / "quarantine.csv").read_text()
    except (OSError, ValueError, KeyError):
        return None
    if list(md.columns) != list(METADATA_COLUMNS):
        return None
    rows = [{k: (None if (v is pd.NA or (isinstance(v, float) and np.isnan(v) and k in ("label", "patient_age")))
                 else v) for k, v in r.items()} for r in md.astype(object).to_dict("records")]
    used = {r["content_sha256"]: r for r in rows}
    quarantined = {r["path"]: (r["reason"], r["detail"])
                   for r in csv.DictReader(quarantine_text.splitlines())}
    return _Previous(files=index.get("files", {}), used=used, quarantined=quarantined, metadata=md,
                     quarantine_text=quarantine_text)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return ""  # unreadable: the worker will say why
    return h.hexdigest()


_OUTPUT_MARKERS = ("metadata.parquet", "quarantine.csv", INDEX_NAME, _STAGING, _OWNER_MARKER)


def _check_folders(source_dir: Path, out_dir: Path) -> None:
    """Refuse folder choices that would ingest our own outputs or delete someone else's files.

    Raises:
        IngestError: one folder is inside the other, or ``out_dir`` holds files but no earlier
            ingest output (``dicom/`` there could be a hospital export that a rebuild would delete).
    """
    src, out = source_dir.resolve(), out_dir.resolve()
    if src == out or src.is_relative_to(out) or out.is_relative_to(src):
        raise IngestError(f"the output folder {out_dir} and the source folder {source_dir} must not "
                          f"contain one another")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in _OUTPUT_MARKERS):
        raise IngestError(f"the output folder {out_dir} is not empty and holds no earlier ingest "
                          f"output; refusing to replace its contents (choose an empty folder)")


def _reset_outputs(out_dir: Path) -> None:
    """Remove this stage's previous outputs (and only those) so no stale shard or file survives."""
    from medops.data import ARRAYS_DIR

    for sub in ("dicom", ARRAYS_DIR, _STAGING):
        if (out_dir / sub).exists():
            shutil.rmtree(out_dir / sub)
    for name in ("metadata.parquet", "quarantine.csv", INDEX_NAME):
        (out_dir / name).unlink(missing_ok=True)


def _progress_callback(progress: bool | Progress | None, total: int) -> tuple[Progress | None, Callable[[], None]]:
    if progress is None or progress is False:
        return None, lambda: None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="file", desc="ingest", dynamic_ncols=True)

        def update(done: int, _total: int) -> None:
            bar.update(done - bar.n)

        return update, bar.close
    return progress, lambda: None


def metadata_frame(records: Iterable[dict[str, Any]]):
    """The metadata table with the documented columns and dtypes (label/age nullable Int64)."""
    from medops.data import METADATA_COLUMNS
    import pandas as pd

    df = pd.DataFrame(list(records), columns=list(METADATA_COLUMNS))
    for col in ("label", "patient_age"):
        df[col] = df[col].astype("Int64")
    for col in ("rows", "columns", "shard", "shard_index"):
        df[col] = df[col].astype("int64")
    for col in ("pixel_mean", "pixel_std", "pixel_min", "pixel_max"):
        df[col] = df[col].astype("float64")
    for col in ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "patient_id",
                "patient_sex", "modality", "manifest_split", "content_sha256", "deid_path"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df


def _quarantine_text(rows: list[tuple[str, str, str]]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(QUARANTINE_COLUMNS)
    w.writerows(sorted(rows))
    return buf.getvalue()


def _prune_dicom(dicom_dir: Path, keep: set[str]) -> None:
    """Delete de-identified files no metadata row points at (removed sources, duplicates, temps)."""
    root = dicom_dir.parent
    for path in sorted(dicom_dir.rglob("*"), reverse=True):
        if path.is_file() and path.relative_to(root).as_posix() not in keep:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def run(cfg: IngestConfig, *, source_dir: Path, out_dir: Path, manifest: Path | None = None,
        key: bytes | None = None, progress: bool | Progress | None = None,
        frame: str = "middle", incremental: bool = True) -> IngestResult:
    """Ingest every file below ``source_dir`` into ``out_dir``; see the module docstring.

    Incremental: when ``out_dir`` holds the outputs of an earlier run with the same settings and
    key, a file whose content (SHA-256) was seen before is not read again: its row, its pixels and
    its de-identified file are kept, and labels are re-applied from the current manifest. Only new
    content is decoded; files that went away lose their rows. A run that would change nothing
    writes nothing. (With DVC, the stage's outputs must be ``persist: true`` for this to apply.)

    Args:
        cfg: the ``ingest`` section.
        source_dir: the export to read.
        out_dir: where the processed dataset goes.
        manifest: labels keyed by original SOPInstanceUID or by path; None = labels from folder
            names (``NORMAL`` / ``PNEUMONIA`` ..., ``train`` / ``val`` / ``test``), else none.
        key: de-identification key; None = :func:`medops.dicom.deid.resolve_deid_key`.
        progress: True for a tqdm bar, a ``callback(done, total)``, or None.
        frame: multi-frame policy (``first`` | ``middle`` | ``max``).
        incremental: reuse an earlier run's outputs; False rebuilds everything.

    Raises:
        IngestError: the source folder is missing or the manifest is unusable. A bad file never
            raises: it is quarantined.
    """
    from medops.data import ARRAYS_DIR, METADATA_COLUMNS, shard_path
    import json

    from medops.dicom.deid import pseudonymize_uid, resolve_deid_key

    started = time.monotonic()
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if not source_dir.is_dir():
        raise IngestError(f"source folder {source_dir} does not exist or is not a folder")
    labels = read_manifest(manifest) if manifest is not None else None
    if key is None:
        key = resolve_deid_key(cfg.deid)
    files = list_source_files(source_dir)
    fingerprint = _fingerprint(cfg, key, frame)

    _check_folders(source_dir, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / _OWNER_MARKER
    if not marker.exists():  # written once: a rerun that changes nothing writes nothing
        marker.write_text("medops ingest output: a rerun may replace this folder's files\n")
    previous = _load_previous(out_dir, fingerprint) if incremental else None
    if previous is None:
        _reset_outputs(out_dir)
    dicom_dir = out_dir / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / _STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()  # also marks out_dir as an ingest output should this run be cut short

    # which files need decoding: content never seen, or a reason that depends on other inputs
    index: dict[str, str] = {}  # rel -> sha256; content only, so the output is reproducible
    reuse: dict[str, dict[str, Any] | tuple[str, str]] = {}
    for rel in files:
        # a full run lets the workers hash the bytes they read anyway
        sha = _sha256_file(source_dir / rel) if previous is not None else ""
        index[rel] = sha
        if previous is None:
            continue
        if sha in previous.used:
            reuse[rel] = previous.used[sha]
        elif rel in previous.quarantined and previous.quarantined[rel][0] in _INTRINSIC \
                and previous.files.get(rel) == sha:
            reuse[rel] = previous.quarantined[rel]
    to_process = [rel for rel in files if rel not in reuse]

    by_pseudo_uid = {pseudonymize_uid(k[4:], key): v for k, v in (labels or {}).items() if k.startswith("uid:")}

    def label_for(rel: str, pseudo_sop: str) -> tuple[int | None, str | None] | None:
        if labels is None:
            return labels_from_path(rel)
        return by_pseudo_uid.get(pseudo_sop) or labels.get(f"path:{rel}")

    writer = _ShardWriter(staging, cfg.shard_size)
    init_args = (cfg, key, labels, str(source_dir), str(dicom_dir), frame)
    records: list[dict[str, Any]] = []
    quarantine: list[tuple[str, str, str]] = []
    seen_content: dict[str, str] = {}
    seen_sop: dict[str, tuple[str, str]] = {}  # pseudonymous SOP UID -> (path, deid_path)
    rewrite: list[str] = []
    old_shards: dict[int, np.ndarray] = {}
    callback, close = _progress_callback(progress, len(files))
    processed = _outcomes(to_process, cfg.workers, init_args)
    try:
        for done, rel in enumerate(files, start=1):
            image: np.ndarray | None = None
            prior_row = reuse.get(rel)
            if isinstance(prior_row, tuple):
                quarantine.append((rel, *prior_row))
                continue
            if isinstance(prior_row, dict):
                record = {k: prior_row[k] for k in METADATA_COLUMNS if k not in ("shard", "shard_index")}
                entry = label_for(rel, record["sop_instance_uid"])
                reason, detail = (None, "") if entry is not None else (
                    QuarantineReason.NO_LABEL.value, "neither its SOPInstanceUID nor its path is in the manifest")
                record["label"], record["manifest_split"] = entry if entry is not None else (None, None)
                sha = record["content_sha256"]
                shard = int(prior_row["shard"])
                if shard not in old_shards:
                    old_shards[shard] = np.load(shard_path(out_dir, shard), mmap_mode="r")
                image = np.array(old_shards[shard][int(prior_row["shard_index"])])
            else:
                outcome = next(processed)
                assert outcome.path == rel, (outcome.path, rel)
                reason, detail, record, image, sha = (outcome.reason, outcome.detail, outcome.record,
                                                      outcome.image, outcome.sha256)
                index[rel] = sha
                if reason is None and labels is None:
                    record["label"], record["manifest_split"] = labels_from_path(rel)
            if reason is None:
                first = seen_content.get(sha)
                prior = seen_sop.get(record["sop_instance_uid"])
                if first is not None:
                    reason, detail = QuarantineReason.DUPLICATE.value, f"same bytes as {first}"
                elif prior is not None:
                    reason = QuarantineReason.DUPLICATE.value
                    detail = f"same SOPInstanceUID as {prior[0]}, different content"
                    rewrite.append(prior[0])  # a worker may have overwritten the kept file's copy
            if reason is not None:
                quarantine.append((rel, reason, detail))
            else:
                assert image is not None
                seen_content[sha] = rel
                seen_sop[record["sop_instance_uid"]] = (rel, record["deid_path"])
                shard, position = writer.add(image)
                records.append({**record, "shard": shard, "shard_index": position})
            if callback is not None and (done % 64 == 0 or done == len(files)):
                callback(done, len(files))
        writer.flush()
    finally:
        close()
        old_shards.clear()
    if rewrite:
        _init_worker(*init_args)
        for rel in sorted(set(rewrite)):
            process_file(rel)

    metadata = metadata_frame(records)
    quarantine_text = _quarantine_text(quarantine)
    metadata_path, quarantine_path = out_dir / "metadata.parquet", out_dir / "quarantine.csv"
    unchanged = (previous is not None and not to_process and not rewrite
                 and quarantine_text == previous.quarantine_text
                 and metadata.equals(metadata_frame(previous.metadata.to_dict("records"))))
    if unchanged:
        shutil.rmtree(staging, ignore_errors=True)  # a run that changes nothing writes nothing
    else:
        if (out_dir / ARRAYS_DIR).exists():
            shutil.rmtree(out_dir / ARRAYS_DIR)
        if (staging / ARRAYS_DIR).exists():
            (staging / ARRAYS_DIR).rename(out_dir / ARRAYS_DIR)
        shutil.rmtree(staging, ignore_errors=True)
        _prune_dicom(dicom_dir, set(metadata["deid_path"]))
        metadata.to_parquet(metadata_path, index=False)
        quarantine_path.write_text(quarantine_text)
        (out_dir / INDEX_NAME).write_text(json.dumps(
            {"fingerprint": fingerprint, "files": index}, sort_keys=True, indent=0) + "\n")

    by_reason = Counter(reason for _, reason, _ in quarantine)
    return IngestResult(
        files_seen=len(files),
        used=len(records),
        quarantined=len(quarantine),
        quarantined_by_reason=dict(sorted(by_reason.items())),
        labelled=sum(1 for r in records if r["label"] is not None),
        shards=writer.shards,
        decoded=len(to_process),
        reused=len(files) - len(to_process),
        changed=not unchanged,
        image_size=cfg.image_size,
        seconds=round(time.monotonic() - started, 3),
        out_dir=out_dir,
        dicom_dir=dicom_dir,
        arrays_dir=out_dir / ARRAYS_DIR,
        metadata=metadata_path,
        quarantine=quarantine_path,
    )


def format_summary(result: IngestResult) -> str:
    """A few lines for the CLI: counts, quarantine reasons, where things went."""
    lines = [
        f"ingested {result.used} of {result.files_seen} files in {result.seconds:.1f} s "
        f"({result.labelled} labelled) into {result.shards} shard(s) of "
        f"{result.image_size}x{result.image_size}",
    ]
    if result.reused:
        lines.append(f"incremental: {result.decoded} file(s) decoded, {result.reused} reused"
                     + ("" if result.changed else "; nothing changed, nothing written"))
    if result.quarantined:
        reasons = ", ".join(f"{n} {reason}" for reason, n in result.quarantined_by_reason.items())
        lines.append(f"quarantined {result.quarantined}: {reasons} (see {result.quarantine})")
    else:
        lines.append(f"quarantined 0 (empty list at {result.quarantine})")
    lines.append(f"metadata: {result.metadata}")
    lines.append(f"de-identified DICOM: {result.dicom_dir}")
    return "\n".join(lines)
