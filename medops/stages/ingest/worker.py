"""The per-file work of the ingest stage (runs in worker processes): read, check, decode and
de-identify one file; every per-file failure becomes data."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medops.config import IngestConfig
from medops.errors import DicomReadError, IngestError, QuarantineReason
from medops.stages.ingest.source import _not_a_file


@dataclass
class FileOutcome:
    """One source file's fate, as a worker reports it."""

    path: str                      # relative to source_dir, POSIX separators
    sha256: str = ""
    reason: str | None = None      # a QuarantineReason value, None when used
    detail: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = None


@dataclass(frozen=True)
class WorkerSpec:
    """What the per-file work needs besides the file, passed whole: to :func:`process_file` with
    each call, and to each worker process once, as its pool's initializer argument (see
    :mod:`medops.stages.ingest.pool`)."""

    cfg: IngestConfig
    key: bytes                     # the de-identification key
    labels: dict[str, tuple[int | None, str | None]] | None  # read_manifest's; None: no manifest
    source_dir: Path
    out_dir: Path                  # de-identified files go to out_dir/dicom/


def _write_atomically(ds: Any, target: Path) -> None:
    """Encode ``ds`` and write it to ``target`` through a temporary file in the same folder, so
    that ``target`` is either absent or whole (a temporary left by a crash is pruned by the
    next run, see :func:`_prune_dicom`).

    Raises:
        OSError: the file cannot be written (the output folder's problem, not the file's).
        Exception: ``ds`` cannot be encoded (the file's problem).
    """
    from medops.dicom.io import encode_file

    data = encode_file(ds)
    # this process' own name for it: no other process writes it, so no random names to try
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:  # the study's folder, on its first file
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        image = prepare_image(ds, image_size=cfg.image_size, window=cfg.window,
                              frame=cfg.frame, pixel_spacing=cfg.pixel_spacing)
        sex, age = deid.patient_sex(ds), deid.patient_age_years(ds)
        header = {"patient_sex": sex, "patient_age": age, "modality": text_value(ds, "Modality") or None,
                  "rows": int(ds.get("Rows", 0) or 0), "columns": int(ds.get("Columns", 0) or 0),
                  "label": label, "manifest_split": split}
    return original_sop_uid, image, header


def _deidentify_and_write(ds: Any, spec: WorkerSpec, original_sop_uid: str, age: int | None,
                          sha256: str) -> tuple[dict[str, Any], str]:
    """De-identify ``ds`` (PS3.15 Annex E) and write it below ``spec.out_dir``; returns its
    pseudonymous identifiers (the record's first fields) and its path relative to ``out_dir``.

    Raises:
        IngestError: the file cannot be written to the output folder (the stage's failure).
        Exception: ``ds`` cannot be de-identified or encoded (the file's).
    """
    from medops.dicom import deid
    from medops.dicom.io import looking_only, text_value

    deid.deidentify(ds, spec.key, retain_longitudinal=spec.cfg.deid.retain_longitudinal, age=age)
    if not original_sop_uid:
        ds.SOPInstanceUID = deid.pseudonymize_uid("content:" + sha256, spec.key)
    with looking_only(ds):  # de-identification stored its values encoded: keep them so
        ids = {"sop_instance_uid": text_value(ds, "SOPInstanceUID"),
               "study_instance_uid": text_value(ds, "StudyInstanceUID") or None,
               "series_instance_uid": text_value(ds, "SeriesInstanceUID") or None,
               "patient_id": text_value(ds, "PatientID")}
    rel_deid = Path("dicom") / (ids["study_instance_uid"] or "no-study") / f"{ids['sop_instance_uid']}.dcm"
    target = spec.out_dir / rel_deid
    try:
        _write_atomically(ds, target)
    except OSError as exc:  # the output folder, not this file: the stage cannot go on
        # the path holds pseudonymous UIDs only, and the OS's reason names no header value
        raise IngestError(f"cannot write the de-identified file {target}: "
                          f"{exc.strerror or type(exc).__name__}") from exc
    return ids, rel_deid.as_posix()


def process_file(spec: WorkerSpec, rel: str) -> FileOutcome:
    """Read, check, decode and de-identify one file; every per-file failure becomes data.

    Raises:
        IngestError: the de-identified file cannot be written to the output folder (disk full, no
            permission): a failure of the stage, not of the file, so not a quarantine row that
            later runs would keep.
    """
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
        ids, deid_path = _deidentify_and_write(ds, spec, original_sop_uid, header["patient_age"], out.sha256)
    except IngestError:
        raise
    except Exception as exc:  # never keep a half-de-identified file; the stage goes on
        out.reason = QuarantineReason.DEID_FAILED.value
        # the type only: a message could quote a header value, and this lands in quarantine.csv
        out.detail = f"could not de-identify or write the file ({type(exc).__name__})"
        return out
    out.image = image
    out.record = {**ids, **header, **_image_stats(image), "content_sha256": out.sha256,
                  "deid_path": deid_path}
    return out


def process_chunk(spec: WorkerSpec, rels: list[str]) -> list[FileOutcome]:
    return [process_file(spec, rel) for rel in rels]
