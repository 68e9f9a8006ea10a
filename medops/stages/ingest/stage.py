"""The ingest stage's entry point, :func:`run`: the outputs folder checked and set up, every
file through the pool in source order, each outcome written as it comes, the outputs moved
into place at the end. Inputs, outputs and params: see :mod:`medops.stages.ingest`."""

from __future__ import annotations

import csv
import itertools
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import BaseModel

from medops.config import IngestConfig
from medops.errors import IngestError, QuarantineReason
from medops.stages.ingest.index import (INDEX_NAME, _close_index, _fingerprint, _load_previous,
                                        _plan, _write_index_entry)
from medops.stages.ingest.manifest import labels_from_path, read_manifest
from medops.stages.ingest.pool import _decode, _launch_pool, _pool_size, _Starting
from medops.stages.ingest.source import iter_source_files
from medops.stages.ingest.worker import WorkerSpec, process_file
from medops.stages.ingest.writers import (QUARANTINE_COLUMNS, _digest, _MetadataWriter,
                                          _prune_dicom, _ShardWriter, _write_metadata)


Progress = Callable[[int, int], None]


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


_STAGING = ".staging"
# written before anything else, so a run that crashed half-way is still recognised as ours
_OWNER_MARKER = ".medops-ingest"


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


def run(cfg: IngestConfig, *, source_dir: Path, out_dir: Path, manifest: Path | None = None,
        key: bytes | None = None, progress: bool | Progress | None = None) -> IngestResult:
    """Ingest every file below ``source_dir`` into ``out_dir``; see the module docstring.

    Incremental (``cfg.incremental``; False rebuilds everything): when ``out_dir`` holds the
    outputs of an earlier run with the same settings and key, a file whose content (SHA-256) was
    seen before is not read again: its row, its pixels and its de-identified file are kept, and
    labels are re-applied from the current manifest. Only new content is decoded; files that went
    away lose their rows. A run that would change nothing writes nothing. (With DVC, the stage's
    outputs must be ``persist: true`` for this to apply.)

    Memory does not grow with the number of files beyond a few hundred bytes per used file (see
    the note above :func:`iter_source_files`): every output is written as it is produced, into
    ``out_dir/.staging``, and moved into place at the end, the index last.

    Args:
        cfg: the ``ingest`` section (``frame``: the multi-frame policy; ``incremental``: reuse an
            earlier run's outputs).
        source_dir: the export to read.
        out_dir: where the processed dataset goes.
        manifest: labels keyed by original SOPInstanceUID or by path; None = labels from folder
            names (``NORMAL`` / ``PNEUMONIA`` ..., ``train`` / ``val`` / ``test``), else none.
        key: de-identification key; None = :func:`medops.dicom.deid.resolve_deid_key`.
        progress: True for a tqdm bar, a ``callback(done, total)``, or None.

    Raises:
        IngestError: the source folder is missing, the manifest is unusable, or an output cannot
            be written (disk full, no permission). A bad file never raises: it is quarantined.
    """
    started = time.monotonic()
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if not source_dir.is_dir():
        raise IngestError(f"source folder {source_dir} does not exist or is not a folder")
    labels = read_manifest(manifest) if manifest is not None else None
    if key is None:
        from medops.dicom.deid import resolve_deid_key

        key = resolve_deid_key(cfg.deid)
    # counted first (a cheap walk) for the progress total and the chunk size; the files are then
    # listed again as they are processed, so the listing is never held
    total = sum(1 for _ in iter_source_files(source_dir))
    _check_folders(source_dir, out_dir)
    spec = WorkerSpec(cfg, key, labels, source_dir, out_dir)
    # a full rebuild decodes every file: its workers are launched now and start up while this
    # process imports what it writes with and sets up its outputs
    n_workers = _pool_size(total, cfg.workers)
    rebuild = not cfg.incremental or not (out_dir / INDEX_NAME).is_file()
    starting = _launch_pool(n_workers, spec) if rebuild and n_workers > 1 else None
    try:
        return _ingest(cfg, source_dir, out_dir, labels, key, total, spec, starting, progress,
                       started)
    finally:
        if starting is not None:  # shut down by the decoding once it started; again is harmless
            starting.pool.shutdown(cancel_futures=True)


def _ingest(cfg: IngestConfig, source_dir: Path, out_dir: Path, labels: dict | None, key: bytes,
            total: int, spec: WorkerSpec, starting: _Starting | None,
            progress: bool | Progress | None, started: float) -> IngestResult:
    """:func:`run` once its arguments are checked and, for a full rebuild, its workers launched."""
    import filecmp

    fingerprint = _fingerprint(cfg, key)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / _OWNER_MARKER
    if not marker.exists():  # written once: a rerun that changes nothing writes nothing
        marker.write_text("medops ingest output: a rerun may replace this folder's files\n")
    previous = _load_previous(out_dir, fingerprint) if cfg.incremental else None
    if previous is None:
        _reset_outputs(out_dir)
    dicom_dir = out_dir / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / _STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()  # also marks out_dir as an ingest output should this run be cut short

    by_pseudo_uid: dict[str, tuple[int | None, str | None]] = {}
    if labels:
        from medops.dicom.deid import pseudonymize_uid

        by_pseudo_uid = {pseudonymize_uid(k[4:], key): v for k, v in labels.items() if k.startswith("uid:")}

    def label_for(rel: str, pseudo_sop: str) -> tuple[int | None, str | None] | None:
        if labels is None:
            return labels_from_path(rel)
        return by_pseudo_uid.get(pseudo_sop) or labels.get(f"path:{rel}")

    outputs = ("metadata.parquet", "quarantine.csv", INDEX_NAME)  # the index last: it commits
    writer = _ShardWriter(staging, cfg.shard_size)
    metadata = _MetadataWriter(staging / "metadata.parts.parquet")
    # what duplicate detection and pruning remember of each used file (see the note above
    # iter_source_files): 32-byte digests and the path, nothing else
    seen_content: dict[bytes, str] = {}   # content sha256 -> path
    seen_sop: dict[bytes, str] = {}       # digest of the pseudonymous SOP UID -> path
    kept: set[bytes] = set()              # digests of the deid_path of used rows
    rewrite: list[str] = []
    by_reason: Counter[str] = Counter()
    files_seen = decoded = labelled = 0
    old_shards: dict[int, np.ndarray] = {}
    callback, close = _progress_callback(progress, total)
    items = _decode(_plan(iter_source_files(source_dir), source_dir, previous), cfg.workers, spec,
                    total, starting if previous is None else None)
    try:
        # the workers get their first chunks before this process imports what writing
        # metadata.parquet needs (pyarrow; not pandas, see _metadata_schema), which it does while
        # they work, before the files' state grows
        head = next(items, None)
        import pyarrow.parquet  # noqa: F401

        from medops.data import METADATA_COLUMNS, shard_path

        with (staging / "quarantine.csv").open("w", newline="") as qfh, \
                (staging / INDEX_NAME).open("w") as ifh:
            quarantine = csv.writer(qfh, lineterminator="\n")
            quarantine.writerow(QUARANTINE_COLUMNS)
            ifh.write('{\n"files": {')
            for item in itertools.chain([head] if head is not None else [], items):
                rel, prior = item.rel, item.prior
                files_seen += 1
                image: np.ndarray | None = None
                if isinstance(prior, tuple):
                    reason, detail = prior
                    sha = item.sha
                elif isinstance(prior, dict):
                    record = {k: prior[k] for k in METADATA_COLUMNS if k not in ("shard", "shard_index")}
                    entry = label_for(rel, record["sop_instance_uid"])
                    reason, detail = (None, "") if entry is not None else (
                        QuarantineReason.NO_LABEL.value, "neither its SOPInstanceUID nor its path is in the manifest")
                    record["label"], record["manifest_split"] = entry if entry is not None else (None, None)
                    sha = record["content_sha256"]
                    shard = int(prior["shard"])
                    if shard not in old_shards:
                        if len(old_shards) >= 2:  # rows come in shard order, mostly: keep few mapped
                            old_shards.pop(next(iter(old_shards)))
                        old_shards[shard] = np.load(shard_path(out_dir, shard), mmap_mode="r")
                    image = np.array(old_shards[shard][int(prior["shard_index"])])
                else:
                    outcome = item.outcome
                    assert outcome is not None
                    decoded += 1
                    reason, detail, record, image, sha = (outcome.reason, outcome.detail, outcome.record,
                                                          outcome.image, outcome.sha256)
                    if reason is None and labels is None:
                        record["label"], record["manifest_split"] = labels_from_path(rel)
                _write_index_entry(ifh, files_seen == 1, rel, sha)
                if reason is None:
                    content, sop = bytes.fromhex(sha), _digest(record["sop_instance_uid"])
                    first = seen_content.get(content)
                    prior_rel = seen_sop.get(sop)
                    if first is not None:
                        reason, detail = QuarantineReason.DUPLICATE.value, f"same bytes as {first}"
                    elif prior_rel is not None:
                        reason = QuarantineReason.DUPLICATE.value
                        detail = f"same SOPInstanceUID as {prior_rel}, different content"
                        rewrite.append(prior_rel)  # a worker may have overwritten the kept file's copy
                if reason is not None:
                    # rows come in path order, so the file is sorted as it is written
                    quarantine.writerow((rel, reason, detail))
                    by_reason[reason] += 1
                else:
                    assert image is not None
                    seen_content[content] = seen_sop[sop] = rel
                    kept.add(_digest(record["deid_path"]))
                    shard, position = writer.add(image)
                    metadata.add({**record, "shard": shard, "shard_index": position})
                    labelled += record["label"] is not None
                if callback is not None and files_seen % 64 == 0 and files_seen < total:
                    callback(files_seen, total)
            _close_index(ifh, files_seen, fingerprint)
        writer.flush()
        metadata.close()
        if callback is not None and files_seen:
            callback(files_seen, files_seen)
    finally:
        items.close()
        close()
        old_shards.clear()
        if previous is not None:
            previous.close()
    seen_content.clear()
    seen_sop.clear()
    from medops.data import ARRAYS_DIR

    if rewrite:  # restore the kept files' de-identified copies a duplicate may have overwritten
        for rel in sorted(set(rewrite)):
            restored = process_file(spec, rel)
            if restored.reason is not None:  # it was used a moment ago: the file changed meanwhile?
                raise IngestError(f"cannot restore the de-identified copy of {rel}, which shares its "
                                  f"SOP Instance UID with a duplicate: {restored.reason} "
                                  f"({restored.detail})")

    _write_metadata(metadata, staging / "metadata.parquet")
    # a file decoded again (no_label and duplicate are looked at on every run) either ends
    # quarantined before its de-identified copy is written, or adds a metadata row, or shares a
    # kept file's SOP Instance UID (then it is in rewrite): comparing the staged outputs is enough
    unchanged = (previous is not None and not rewrite
                 and all((out_dir / name).is_file()
                         and filecmp.cmp(staging / name, out_dir / name, shallow=False) for name in outputs))
    if unchanged:
        shutil.rmtree(staging, ignore_errors=True)  # a run that changes nothing writes nothing
    else:
        # the index goes first and comes back last: a run cut short in between leaves outputs
        # that the next run does not trust, so it rebuilds them
        (out_dir / INDEX_NAME).unlink(missing_ok=True)
        if (out_dir / ARRAYS_DIR).exists():
            shutil.rmtree(out_dir / ARRAYS_DIR)
        if (staging / ARRAYS_DIR).exists():
            (staging / ARRAYS_DIR).rename(out_dir / ARRAYS_DIR)
        _prune_dicom(dicom_dir, kept)
        for name in outputs:
            os.replace(staging / name, out_dir / name)
        shutil.rmtree(staging, ignore_errors=True)

    return IngestResult(
        files_seen=files_seen,
        used=metadata.count,
        quarantined=sum(by_reason.values()),
        quarantined_by_reason=dict(sorted(by_reason.items())),
        labelled=labelled,
        shards=writer.shards,
        decoded=decoded,
        reused=files_seen - decoded,
        changed=not unchanged,
        image_size=cfg.image_size,
        seconds=round(time.monotonic() - started, 3),
        out_dir=out_dir,
        dicom_dir=dicom_dir,
        arrays_dir=out_dir / ARRAYS_DIR,
        metadata=out_dir / "metadata.parquet",
        quarantine=out_dir / "quarantine.csv",
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
