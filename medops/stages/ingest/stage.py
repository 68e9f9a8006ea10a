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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import numpy as np
from pydantic import BaseModel

from medops.atomic import crash_point
from medops.config import IngestConfig
from medops.errors import IngestError, QuarantineReason
from medops.data import pack_path, shard_path
from medops.stages.ingest.executors import Executor, decode_in_order, open_executor
from medops.stages.ingest.index import (INDEX_NAME, _close_index, _fingerprint, _load_previous,
                                        _plan, _Previous, _write_index_entry)
from medops.stages.ingest.manifest import labels_from_path, read_manifests
from medops.stages.ingest.pool import _Item
from medops.stages.ingest.seen import SeenFiles
from medops.stages.ingest.source import iter_source_files
from medops.stages.ingest.worker import WorkerSpec
from medops.stages.ingest.writers import (QUARANTINE_COLUMNS, _digest, _merge_shard, _MetadataWriter,
                                          _ShardWriter, _write_metadata)


Progress = Callable[[int, int], None]


class IngestResult(BaseModel):
    """What the ingest stage did; ``quarantined_by_reason`` uses QuarantineReason values."""

    files_seen: int
    used: int
    quarantined: int
    quarantined_by_reason: dict[str, int]
    labelled: int
    shards: int
    shards_written: int  # shards this run wrote (new, topped up or compacted); the others were left alone
    decoded: int        # files read and decoded by this run
    reused: int         # files whose earlier outcome was kept (incremental run)
    changed: bool       # False when the run found nothing to change and wrote nothing
    image_size: int
    seconds: float
    out_dir: Path
    dicom_dir: Path     # the shards' packs of de-identified files
    arrays_dir: Path
    metadata: Path
    quarantine: Path


_STAGING = ".staging"
# written before anything else, so a run that crashed half-way is still recognised as ours
_OWNER_MARKER = ".medops-ingest"
_OUTPUT_MARKERS = ("metadata.parquet", "quarantine.csv", INDEX_NAME, _STAGING, _OWNER_MARKER)


def _inside(files: list[Path], folder: Path) -> frozenset[str]:
    """The paths relative to ``folder`` of those ``files`` that lie below it (POSIX)."""
    root = folder.resolve()
    return frozenset(f.resolve().relative_to(root).as_posix() for f in files
                     if f.resolve().is_relative_to(root))


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


def _open_out_dir(out_dir: Path, fingerprint: str, incremental: bool) -> _Previous | None:
    """Make ``out_dir`` ready for a run: marked as an ingest output, an empty ``.staging`` to write
    into, and either an earlier run's outputs to reuse (returned) or none left (a full rebuild)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / _OWNER_MARKER
    if not marker.exists():  # written once: a rerun that changes nothing writes nothing
        marker.write_text("medops ingest output: a rerun may replace this folder's files\n")
    previous = _load_previous(out_dir, fingerprint) if incremental else None
    if previous is None:
        _reset_outputs(out_dir)
    staging = out_dir / _STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()  # also marks out_dir as an ingest output should this run be cut short
    return previous


Labels = tuple[int | None, str | None]  # (label, split)


def _label_lookup(labels: dict[str, Labels] | None, key: bytes) -> Callable[[str, str], Labels | None]:
    """``lookup(rel, pseudonymous SOP Instance UID)``: the labels of a row an earlier run left
    (the manifest may have changed since), from the manifest (None: it does not list the file)
    or, without one, from folder names."""
    if labels is None:
        return lambda rel, pseudo_sop: labels_from_path(rel)
    by_pseudo_uid: dict[str, Labels] = {}
    if labels:
        from medops.dicom.deid import pseudonymize_uid

        by_pseudo_uid = {pseudonymize_uid(k[4:], key): v for k, v in labels.items() if k.startswith("uid:")}
    return lambda rel, pseudo_sop: by_pseudo_uid.get(pseudo_sop) or labels.get(f"path:{rel}")


class _StagedOutputs:
    """What a run writes into ``.staging`` as the files' outcomes come, in source-path order: the
    new rows' shards, every metadata row, quarantine.csv's rows and the index's entries; and what
    it remembers of each used file to find duplicates (two 32-byte digests and the path), in an
    on-disk table there (:class:`SeenFiles`), so that its memory does not grow with the files.

    Where rows go (so that an incremental run writes only what changed): a row an earlier run left
    keeps its place in its shard; new rows fill the last shard up to ``shard_size``, then new
    shards. A shard that lost rows (a file removed, changed or now a duplicate) is rewritten
    without them; a shard that lost none and gained none is not touched. A full rebuild places
    every row in source-path order, ``shard_size`` per shard.
    """

    def __init__(self, out_dir: Path, shard_size: int, label_for: Callable[[str, str], Labels | None],
                 folder_labels: bool, previous: _Previous | None) -> None:
        self.out_dir, self.label_for, self.folder_labels = out_dir, label_for, folder_labels
        self.old_rows: dict[int, int] = dict(previous.used.shard_rows) if previous is not None else {}
        self.kept_slots = {shard: np.zeros(rows, dtype=bool) for shard, rows in self.old_rows.items()}
        last = max(self.old_rows, default=-1)
        self.top_up = last if last >= 0 and self.old_rows[last] < shard_size else None
        self.shards = _ShardWriter(out_dir / _STAGING / "new", shard_size,
                                   first=last if self.top_up is not None else last + 1,
                                   start=self.old_rows[last] if self.top_up is not None else 0)
        self.metadata = _MetadataWriter(out_dir / _STAGING / "metadata.parts.parquet")
        self.seen = SeenFiles(out_dir / _STAGING / "seen.sqlite")  # content / SOP UID digest -> path
        self.by_reason: Counter[str] = Counter()
        self.files_seen = self.decoded = self.labelled = 0

    def write(self, item: _Item, quarantine: Any, index: TextIO) -> None:
        """One file's outcome: an index entry, then a quarantine row or a metadata row and, for a
        new row, its image and de-identified file (rows come in path order, so each file is sorted
        as it is written)."""
        self.files_seen += 1
        self.decoded += item.prior is None
        reason, detail, record, sha = self._outcome(item)
        _write_index_entry(index, self.files_seen == 1, item.rel, sha)
        if reason is None:
            reason, detail = self._duplicate(item.rel, sha, record) or (None, detail)
        if reason is not None:
            quarantine.writerow((item.rel, reason, detail))
            self.by_reason[reason] += 1
            return
        if isinstance(item.prior, dict):  # an earlier run's row: it stays where it is
            shard, position = int(item.prior["shard"]), int(item.prior["shard_index"])
            self.kept_slots[shard][position] = True
        else:
            assert item.outcome is not None and item.outcome.image is not None and item.outcome.deid is not None
            shard, position = self.shards.add(item.outcome.image, record["deid_path"], item.outcome.deid)
        self.metadata.add({**record, "shard": shard, "shard_index": position})
        self.labelled += record["label"] is not None

    def _outcome(self, item: _Item) -> tuple[str | None, str, dict[str, Any], str]:
        """``(reason, detail, record, sha256)`` of one file: an earlier run's quarantine entry, an
        earlier run's row (labelled again from the current manifest), or what a worker made of it."""
        from medops.data import METADATA_COLUMNS

        prior = item.prior
        if isinstance(prior, tuple):
            return prior[0], prior[1], {}, item.sha
        if isinstance(prior, dict):
            record = {k: prior[k] for k in METADATA_COLUMNS if k not in ("shard", "shard_index")}
            entry = self.label_for(item.rel, record["sop_instance_uid"])
            reason, detail = (None, "") if entry is not None else (
                QuarantineReason.NO_LABEL.value, "neither its SOPInstanceUID nor its path is in the manifest")
            record["label"], record["manifest_split"] = entry if entry is not None else (None, None)
            return reason, detail, record, record["content_sha256"]
        outcome = item.outcome
        assert outcome is not None
        if outcome.reason is None and self.folder_labels:
            outcome.record["label"], outcome.record["manifest_split"] = labels_from_path(item.rel)
        return outcome.reason, outcome.detail, outcome.record, outcome.sha256

    def _duplicate(self, rel: str, sha: str, record: dict[str, Any]) -> tuple[str, str] | None:
        """``(reason, detail)`` when a used file repeats an earlier one (its bytes, or its SOP
        Instance UID with other content); else None, and the file is remembered."""
        content, sop = bytes.fromhex(sha), _digest(record["sop_instance_uid"])
        first = self.seen.first(content, sop)
        if first is not None and first[0] == "content":
            return QuarantineReason.DUPLICATE.value, f"same bytes as {first[1]}"
        if first is not None:
            return QuarantineReason.DUPLICATE.value, f"same SOPInstanceUID as {first[1]}, different content"
        self.seen.remember(content, sop, rel)
        return None

    def finish(self) -> None:
        """Write what is still held: the last shard, the last metadata row group."""
        self.shards.flush()
        self.shards.spills.close()
        self.metadata.close()

    def release(self) -> None:
        """Drop what only the writing needed: the duplicates' table, the spill file open."""
        self.shards.spills.close()
        self.seen.close()

    def settle_shards(self) -> _ShardChanges:
        """Stage the final form of every shard this run changes (below ``.staging``): the new ones
        as written, the topped-up and the compacted ones merged from the earlier shard's kept rows
        and the new rows; returns what changed."""
        staging, new = self.out_dir / _STAGING, self.out_dir / _STAGING / "new"
        changes = _ShardChanges()
        appended = self.shards.rows[0] if self.top_up is not None and self.shards.rows else 0
        for shard, keep in sorted(self.kept_slots.items()):
            extra = appended if shard == self.top_up else 0
            if keep.all() and not extra:
                changes.kept += 1
                continue
            if not keep.any() and not extra:
                changes.removed.append(shard)
                continue
            parts = [(self.out_dir, shard, keep)] if keep.any() else []
            _merge_shard(staging, shard, parts + ([(new, shard, None)] if extra else []))
            if not keep.all():
                changes.remap[shard] = np.cumsum(np.concatenate([keep, np.ones(extra, dtype=bool)])) - 1
            changes.written.append(shard)
        for shard in range(self.shards.first, self.shards.current):
            if shard == self.top_up:
                continue
            for path_of in (shard_path, pack_path):
                (path_of(staging, shard)).parent.mkdir(parents=True, exist_ok=True)
                os.replace(path_of(new, shard), path_of(staging, shard))
            changes.written.append(shard)
        shutil.rmtree(new, ignore_errors=True)
        return changes


@dataclass
class _ShardChanges:
    """The shards a run rewrote or added (staged), removed, or left alone; the new place of the
    rows of compacted shards (``remap[shard][old shard_index]``)."""

    written: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    kept: int = 0
    remap: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def shards(self) -> int:
        return self.kept + len(self.written)


def _replace_outputs(out_dir: Path, changes: _ShardChanges, reused: bool) -> bool:
    """Move the staged outputs into place, the index last, and delete the shards that lost every
    row; or, when an earlier run's outputs were ``reused`` and nothing differs from them, drop
    the staged ones (a run that changes nothing writes nothing). Returns whether anything changed."""
    import filecmp

    from medops.data import ARRAYS_DIR, DICOM_DIR

    staging = out_dir / _STAGING
    outputs = ("metadata.parquet", "quarantine.csv", INDEX_NAME)  # the index last: it commits
    if reused and not changes.written and not changes.removed \
            and all((out_dir / name).is_file()
                    and filecmp.cmp(staging / name, out_dir / name, shallow=False) for name in outputs):
        shutil.rmtree(staging, ignore_errors=True)
        return False
    # the index goes first and comes back last: a run cut short in between leaves outputs
    # that the next run does not trust, so it rebuilds them
    (out_dir / INDEX_NAME).unlink(missing_ok=True)
    for shard in changes.removed:
        shard_path(out_dir, shard).unlink(missing_ok=True)
        pack_path(out_dir, shard).unlink(missing_ok=True)
    for sub in (ARRAYS_DIR, DICOM_DIR):
        (out_dir / sub).mkdir(exist_ok=True)
        if (staging / sub).is_dir():
            for entry in sorted((staging / sub).iterdir()):
                os.replace(entry, out_dir / sub / entry.name)
                crash_point("ingest.replacing")
    for name in outputs:
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    return True


def _ingest(spec: WorkerSpec, out_dir: Path, total: int, executor: Executor,
            progress: bool | Progress | None, started: float, skip: frozenset[str] = frozenset()) -> IngestResult:
    """:func:`run` once its arguments are checked and its executor chosen: every file's outcome,
    in source-path order, written into ``.staging`` as it comes, then the outputs moved into
    place. ``skip``: files of ``source_dir`` not to ingest (its label manifests)."""
    from medops.data import ARRAYS_DIR

    cfg = spec.cfg
    fingerprint = _fingerprint(cfg, spec.key)
    previous = _open_out_dir(out_dir, fingerprint, cfg.incremental)
    staging = out_dir / _STAGING
    staged = _StagedOutputs(out_dir, cfg.shard_size, _label_lookup(spec.labels, spec.key),
                            folder_labels=spec.labels is None, previous=previous)
    callback, close = _progress_callback(progress, total)
    items = decode_in_order(_plan(iter_source_files(spec.source_dir, skip), spec.source_dir, previous),
                            executor, total)
    try:
        # the workers get their first chunks before this process imports what writing
        # metadata.parquet needs (pyarrow; not pandas, see _metadata_schema), which it does while
        # they work, before the files' state grows
        head = next(items, None)
        import pyarrow.parquet  # noqa: F401

        with (staging / "quarantine.csv").open("w", newline="") as qfh, \
                (staging / INDEX_NAME).open("w") as ifh:
            quarantine = csv.writer(qfh, lineterminator="\n")
            quarantine.writerow(QUARANTINE_COLUMNS)
            ifh.write('{\n"files": {')
            for item in itertools.chain([head] if head is not None else [], items):
                staged.write(item, quarantine, ifh)
                if staged.files_seen == 2:
                    crash_point("ingest.decoding")
                if callback is not None and staged.files_seen % 64 == 0 and staged.files_seen < total:
                    callback(staged.files_seen, total)
            _close_index(ifh, staged.files_seen, fingerprint)
        staged.finish()
        if callback is not None and staged.files_seen:
            callback(staged.files_seen, staged.files_seen)
    finally:
        items.close()
        close()
        staged.release()
        if previous is not None:
            previous.close()
    changes = staged.settle_shards()
    _write_metadata(staged.metadata, staging / "metadata.parquet", changes.remap)
    changed = _replace_outputs(out_dir, changes, reused=previous is not None)

    return IngestResult(
        files_seen=staged.files_seen,
        used=staged.metadata.count,
        quarantined=sum(staged.by_reason.values()),
        quarantined_by_reason=dict(sorted(staged.by_reason.items())),
        labelled=staged.labelled,
        shards=changes.shards,
        shards_written=len(changes.written),
        decoded=staged.decoded,
        reused=staged.files_seen - staged.decoded,
        changed=changed,
        image_size=cfg.image_size,
        seconds=round(time.monotonic() - started, 3),
        out_dir=out_dir,
        dicom_dir=out_dir / "dicom",
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
        lines.append(f"incremental: {result.decoded} file(s) decoded, {result.reused} reused, "
                     f"{result.shards_written} shard(s) written"
                     + ("" if result.changed else "; nothing changed, nothing written"))
    if result.quarantined:
        reasons = ", ".join(f"{n} {reason}" for reason, n in result.quarantined_by_reason.items())
        lines.append(f"quarantined {result.quarantined}: {reasons} (see {result.quarantine})")
    else:
        lines.append(f"quarantined 0 (empty list at {result.quarantine})")
    lines.append(f"metadata: {result.metadata}")
    lines.append(f"de-identified DICOM: {result.dicom_dir} (one zip per shard; "
                 f"`medops dataset get UID` extracts one)")
    return "\n".join(lines)


def run(cfg: IngestConfig, *, source_dir: Path, out_dir: Path,
        manifest: Path | Sequence[Path] | None = None, key: bytes | None = None,
        progress: bool | Progress | None = None) -> IngestResult:
    """Ingest every file below ``source_dir`` into ``out_dir``; see :mod:`medops.stages.ingest`.

    Incremental (``cfg.incremental``; False rebuilds everything): when ``out_dir`` holds the
    outputs of an earlier run with the same settings and key, a file whose content (SHA-256) was
    seen before is not read again: its row, its pixels and its de-identified file are kept, and
    labels are re-applied from the current manifest. Only new content is decoded; files that went
    away lose their rows. Only the shards that change are written: new rows top up the last shard
    and fill new ones, a shard that lost rows is rewritten without them, the others are left as
    they are (so their DVC objects are too). A run that would change nothing writes nothing. (With DVC, the stage's
    outputs must be ``persist: true`` for this to apply.)

    Memory does not grow with the number of files in a full run (an incremental one adds 41
    bytes per row of the earlier metadata; see the note above :func:`iter_source_files`): every
    output is written as it is produced, into ``out_dir/.staging``, and moved into place at the
    end, the index last; what duplicate detection remembers is in a table there, on disk.

    Args:
        cfg: the ``ingest`` section (``frame``: the multi-frame policy; ``incremental``: reuse an
            earlier run's outputs).
        source_dir: the export to read.
        out_dir: where the processed dataset goes.
        manifest: labels keyed by original SOPInstanceUID or by path, one file or several
            (merged; see :func:`read_manifests`); None = labels from folder names (``NORMAL`` /
            ``PNEUMONIA`` ..., ``train`` / ``val`` / ``test``), else none. A manifest inside
            ``source_dir`` is read as labels, not ingested as a study.
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
    manifests = [Path(manifest)] if isinstance(manifest, (str, Path)) else list(manifest or ())
    labels = read_manifests(manifests) if manifest is not None else None
    skip = _inside(manifests, source_dir)
    if key is None:
        from medops.dicom.deid import resolve_deid_key

        key = resolve_deid_key(cfg.deid)
    # counted first (a cheap walk) for the progress total and the chunk size; the files are then
    # listed again as they are processed, so the listing is never held
    total = sum(1 for _ in iter_source_files(source_dir, skip))
    _check_folders(source_dir, out_dir)
    spec = WorkerSpec(cfg, key, labels, source_dir)
    # a full rebuild decodes every file: a local pool's workers are launched now and start up
    # while this process imports what it writes with and sets up its outputs
    rebuild = not cfg.incremental or not (out_dir / INDEX_NAME).is_file()
    executor = open_executor(spec, total, rebuild, spill_dir=out_dir / _STAGING / "spill")
    try:
        return _ingest(spec, out_dir, total, executor, progress, started, skip)
    finally:  # closed by the decoding once it started; again is harmless
        executor.close()
