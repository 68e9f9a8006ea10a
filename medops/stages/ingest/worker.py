"""The per-file work of the ingest stage (runs in worker processes, local or on a Dask cluster):
read, check, decode and de-identify one file; every per-file failure becomes data. A worker writes
nothing: it returns the prepared image and the de-identified file's bytes, and the main process
packs them into shards (so a cluster's workers need to read the source folder, and nothing else).
A local pool's worker, which shares the main process' disk, leaves the de-identified bytes in a
spill file instead (:class:`Spilled`): the main process copies them into the pack inside the kernel,
rather than receiving them through a pipe, unpickling them and checksumming them itself."""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medops.config import IngestConfig
from medops.errors import PROCESS_EXITS, DicomReadError, IngestError, QuarantineReason
from medops.stages.ingest.source import _not_a_file


@dataclass(frozen=True, slots=True)
class Spilled:
    """A de-identified file a worker left in a spill file: ``size`` bytes at ``offset`` of
    ``path``, with their CRC-32 (the pack's checksum, computed by the worker)."""

    path: str
    offset: int
    size: int
    crc: int


@dataclass
class FileOutcome:
    """One source file's fate, as a worker reports it."""

    path: str                      # relative to source_dir, POSIX separators
    sha256: str = ""
    reason: str | None = None      # a QuarantineReason value, None when used
    detail: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = None
    deid: bytes | Spilled | None = None  # the de-identified file (used files only)


@dataclass(frozen=True)
class WorkerSpec:
    """What the per-file work needs besides the file, passed whole: to :func:`process_file` with
    each call, and to each worker process once: as its pool's initializer argument (see
    :mod:`medops.stages.ingest.pool`) or as a Dask worker plugin (:mod:`medops.stages.ingest.cluster`).

    Its repr shows neither the key nor the labels: a spec may end up in a log line or a Dask
    dashboard page, and the key is the secret behind every pseudonym.
    """

    cfg: IngestConfig
    key: bytes = field(repr=False)  # the de-identification key
    labels: dict[str, tuple[int | None, str | None]] | None = field(repr=False)  # read_manifest's; None: no manifest
    source_dir: Path


def _image_stats(image: np.ndarray) -> dict[str, float]:
    """``pixel_mean``, ``pixel_std`` (population), ``pixel_min``, ``pixel_max`` of an image, in
    float64; a few array passes, not numpy's general-purpose ``mean``/``std``."""
    x = image.astype(np.float64).ravel()
    mean = float(np.add.reduce(x)) / x.size
    x -= mean
    return {"pixel_mean": mean, "pixel_std": math.sqrt(float(np.dot(x, x)) / x.size),
            "pixel_min": float(image.min()), "pixel_max": float(image.max())}


def _read_original(ds: Any, spec: WorkerSpec, rel: str) -> tuple[str, np.ndarray, dict[str, Any]]:
    """What comes from the ORIGINAL header, read before de-identification removes it: the original
    SOP Instance UID, the prepared image, and the record's header fields (label and split from
    the manifest, when there is one).

    Raises:
        DicomReadError: a burned-in annotation (unless allowed), a file the manifest does not
            list, pixels that cannot be prepared.
        Exception: a header value pydicom cannot parse (values are parsed as they are used).
    """
    from medops.dicom import deid
    from medops.dicom.io import looking_only, text_value
    from medops.dicom.pixels import prepare_image

    cfg, labels = spec.cfg, spec.labels
    with looking_only(ds):  # what is only looked at is written back as read
        original_sop_uid = text_value(ds, "SOPInstanceUID").strip()
        if text_value(ds, "BurnedInAnnotation").strip().upper() == "YES" \
                and not cfg.deid.allow_burned_in:
            raise DicomReadError("BurnedInAnnotation is YES: the pixels may show identifying text",
                                 QuarantineReason.BURNED_IN_ANNOTATION)
        label: int | None = None
        split: str | None = None
        if labels is not None:
            entry = labels.get(f"uid:{original_sop_uid}") or labels.get(f"path:{rel}")
            if entry is None:
                raise DicomReadError("neither its SOPInstanceUID nor its path is in the manifest",
                                     QuarantineReason.NO_LABEL)
            label, split = entry
        image = prepare_image(ds, cfg.preprocessing)
        sex, age = deid.patient_sex(ds), deid.patient_age_years(ds)
        header = {"patient_sex": sex, "patient_age": age, "modality": text_value(ds, "Modality") or None,
                  "rows": int(ds.get("Rows", 0) or 0), "columns": int(ds.get("Columns", 0) or 0),
                  "label": label, "manifest_split": split}
    return original_sop_uid, image, header


def _deidentify(ds: Any, spec: WorkerSpec, original_sop_uid: str, age: int | None,
                sha256: str) -> tuple[dict[str, Any], str, bytes]:
    """De-identify ``ds`` (PS3.15 Annex E) and encode it; returns its pseudonymous identifiers (the
    record's first fields), its ``deid_path`` and the file's bytes.

    Raises:
        Exception: ``ds`` cannot be de-identified or encoded (the file's problem).
    """
    from medops.dicom import deid
    from medops.dicom.io import encode_file, looking_only, text_value

    deid.deidentify(ds, spec.key, retain_longitudinal=spec.cfg.deid.retain_longitudinal, age=age)
    if not original_sop_uid:
        ds.SOPInstanceUID = deid.pseudonymize_uid("content:" + sha256, spec.key)
    with looking_only(ds):  # de-identification stored its values encoded: keep them so
        ids = {"sop_instance_uid": text_value(ds, "SOPInstanceUID"),
               "study_instance_uid": text_value(ds, "StudyInstanceUID") or None,
               "series_instance_uid": text_value(ds, "SeriesInstanceUID") or None,
               "patient_id": text_value(ds, "PatientID")}
    deid_path = f"dicom/{ids['study_instance_uid'] or 'no-study'}/{ids['sop_instance_uid']}.dcm"
    return ids, deid_path, encode_file(ds)


def process_file(spec: WorkerSpec, rel: str) -> FileOutcome:
    """Read, check, decode and de-identify one file; every per-file failure becomes data (it
    raises nothing for a bad file)."""
    from medops.dicom.io import read_dataset

    out = FileOutcome(path=rel)
    path = spec.source_dir / rel
    unusable = _not_a_file(path)
    if unusable is not None:
        out.reason, out.detail = QuarantineReason.NOT_DICOM.value, unusable
        return out
    try:
        data = path.read_bytes()
    except OSError as exc:
        out.reason, out.detail = QuarantineReason.NOT_DICOM.value, f"cannot read: {exc}"
        return out
    out.sha256 = hashlib.sha256(data).hexdigest()
    try:
        # values are parsed as they are used: de-identification parses what it changes and the
        # rest is written back as read, so any access below may be the first to meet a corrupt one
        ds = read_dataset(data, parse_all=False)
    except DicomReadError as exc:
        out.reason, out.detail = exc.reason.value, str(exc)
        return out
    try:
        original_sop_uid, image, header = _read_original(ds, spec, rel)
    except DicomReadError as exc:
        out.reason, out.detail = exc.reason.value, str(exc)
        return out
    except Exception as exc:  # a value pydicom cannot parse; the type only: a message may quote it
        out.reason = QuarantineReason.DECODE_ERROR.value
        out.detail = f"corrupt header: a value cannot be parsed ({type(exc).__name__})"
        return out

    try:
        ids, deid_path, out.deid = _deidentify(ds, spec, original_sop_uid, header["patient_age"], out.sha256)
    except Exception as exc:  # never keep a half-de-identified file; the stage goes on
        out.reason = QuarantineReason.DEID_FAILED.value
        # the type only: a message could quote a header value, and this lands in quarantine.csv
        out.detail = f"could not de-identify or encode the file ({type(exc).__name__})"
        return out
    out.image = image
    out.record = {**ids, **header, **_image_stats(image), "content_sha256": out.sha256,
                  "deid_path": deid_path}
    return out


def process_guarded(spec: WorkerSpec, rel: str, *, time_limit: float | None = None) -> FileOutcome:
    """:func:`process_file`, with whatever it raises that is not the stage's failure (a native
    library's panic is no ``Exception``) as this file's failure: one file never stops the batch,
    and nothing unpicklable leaves a worker.

    ``time_limit``: seconds after which this process ends (:func:`medops.procs.exit_after`), for
    worker processes only (``ingest.file_timeout_s``, passed by the pool's or the cluster's task),
    whose executor then quarantines the file as ``timeout``; None in the main process, which must
    survive any file.
    """
    from medops.procs import exit_after

    with exit_after(time_limit):
        try:
            return process_file(spec, rel)
        except (IngestError, *PROCESS_EXITS):
            raise
        except BaseException as exc:  # the type only: a message could quote a header value
            return FileOutcome(path=rel, reason=QuarantineReason.DECODE_ERROR.value,
                               detail=f"reading this file failed unexpectedly ({type(exc).__name__})")


def process_chunk(spec: WorkerSpec, rels: list[str], *, time_limit: float | None = None,
                  spill: str | None = None) -> list[FileOutcome]:
    """:func:`process_guarded` for each file of a task (``time_limit``: per file). ``spill``: a
    file (on the main process' disk) to leave the de-identified files in, one after the other,
    each outcome then naming where its file is (:class:`Spilled`); None: the bytes are returned.

    Raises:
        IngestError: the spill file cannot be written (disk full): the stage's failure.
    """
    if spill is None:
        return [process_guarded(spec, rel, time_limit=time_limit) for rel in rels]
    out: list[FileOutcome] = []
    fh = None
    try:
        for rel in rels:
            outcome = process_guarded(spec, rel, time_limit=time_limit)
            if isinstance(outcome.deid, bytes):
                data = outcome.deid
                fh = fh if fh is not None else open(spill, "wb", buffering=0)  # noqa: SIM115
                offset = fh.tell()
                view = memoryview(data)
                while view:  # a raw file's write may be partial
                    view = view[fh.write(view):]
                outcome.deid = Spilled(spill, offset, len(data), zlib.crc32(data))
            out.append(outcome)
    except OSError as exc:  # the path is the run's staging folder's: it names no source file
        raise IngestError(f"cannot write {spill}: {exc.strerror or type(exc).__name__}") from None
    finally:
        if fh is not None:
            fh.close()
    return out


def died_reading(rel: str, elapsed: float, limit: float | None) -> FileOutcome:
    """The outcome of a file whose worker process died reading it alone, ``elapsed`` seconds after
    its task was handed out: ``timeout`` when that is at least the time limit (the watchdog of
    :func:`medops.procs.exit_after` ended it), else a crash (``decode_error``)."""
    if limit and elapsed >= limit:
        return FileOutcome(path=rel, reason=QuarantineReason.TIMEOUT.value,
                           detail=f"reading this file took over ingest.file_timeout_s = {limit:g} s: "
                                  f"its worker process was stopped")
    return FileOutcome(path=rel, reason=QuarantineReason.DECODE_ERROR.value,
                       detail="the decoder crashed the worker process reading this file")
