"""What drift monitoring records per served image, and the append-only log it is kept in.

One record per image the DICOM ensemble answers: header categories a drift test can compare
(Modality, Body Part Examined, Manufacturer, Photometric Interpretation, a pixel-spacing bucket,
Rows/Columns, the transfer syntax by name), statistics of the preprocessed image (the classifier's
input, in [0, 1]) and the answer (``probability``; ``ood_score`` where the served model has one,
else null). Nothing identifying: no names, IDs, dates, times or UIDs are read into a record (the
transfer syntax is kept by its standard name, not its UID), and free text is cut short.

The same :func:`image_features` / :func:`header_features` compute the training reference
(``medops.stages.reference``) from the training split's de-identified files, so served and
reference features come from one implementation.

:class:`RequestLog` is the store: JSON lines appended under a lock (several Triton instances may
write), rotated at a size bound (``requests.jsonl`` -> ``requests.1.jsonl`` ... ``requests.K``),
read back newest last. numpy and pydicom only: the Triton Python-backend stub imports it.
"""

from __future__ import annotations

import functools
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

# The record's fields, by kind (the monitor tests each kind its own way).
CATEGORY_FIELDS = ("modality", "body_part", "manufacturer", "photometric", "spacing", "matrix",
                   "transfer_syntax")
# intensity statistics, then spatial ones (a histogram does not change when a film is rotated):
# sharpness (mean absolute gradient over the standard deviation: blur lowers it, noise raises it,
# whatever the film's contrast), top-minus-bottom and
# left-minus-right half means (a chest film's layout), centre-minus-border mean (a crop moves it)
STAT_FIELDS = ("mean", "std", "p05", "p25", "p50", "p75", "p95", "sharpness", "tb", "lr", "cb")
OUTPUT_FIELDS = ("probability", "ood_score")
PERCENTILES = (5, 25, 50, 75, 95)

LOG_NAME = "requests.jsonl"
_TEXT_MAX = 32  # free text (Manufacturer) is cut to this many characters

# Pixel spacing (mm) buckets: a chest film is ~0.1-0.2 mm, a CT slice ~0.5-1, an MR 1-2; a
# spacing far outside them says the image came from another kind of device.
_SPACING_EDGES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_MATRIX_EDGES = (64, 256, 512, 1024, 2048, 4096)


def _bucket(value: float, edges: Sequence[float]) -> str:
    for lo, hi in zip((0.0, *edges), edges):
        if value < hi:
            return f"[{lo:g},{hi:g})"
    return f">={edges[-1]:g}"


# How pydicom splits and strips a text value, by VR: the whole value right-stripped of spaces
# and NULs, then split at backslashes (pydicom.values.convert_string, and DS/IS); or split,
# then each value right-stripped (convert_text)
_STRIPPED_THEN_SPLIT = frozenset({"AE", "AS", "CS", "DS", "IS"})
_SPLIT_THEN_STRIPPED = frozenset({"SH", "LO", "UC"})


def _value(ds: Any, keyword: str) -> Any:
    """``ds.get(keyword)``, taken from the element's raw bytes when they are plain ASCII text
    (every DICOM character set reads those alike), split and stripped as pydicom does for its
    VR: pydicom's conversion of each value was most of a drift record's cost. Anything else,
    pydicom converts."""
    try:
        tag, dictionary_vr = _tag(keyword)
        elem = ds.get_item(tag)
    except Exception:  # noqa: BLE001 - not a pydicom data set, or an unreadable element
        return ds.get(keyword, None)
    if elem is None:
        return None
    value, vr = elem.value, elem.VR or dictionary_vr
    if isinstance(value, bytes) and value.isascii() and b"\x1b" not in value:
        text = value.decode("ascii")
        if vr in _STRIPPED_THEN_SPLIT:
            parts = text.rstrip(" \0").split("\\")
        elif vr in _SPLIT_THEN_STRIPPED:
            parts = [p.rstrip("\0 ") for p in text.split("\\")]
        else:
            return ds.get(keyword, None)
        return parts if len(parts) > 1 else parts[0]
    return ds.get(keyword, None)


@functools.lru_cache(maxsize=None)
def _tag(keyword: str) -> tuple[Any, str]:
    from pydicom.datadict import dictionary_VR
    from pydicom.tag import Tag

    tag = Tag(keyword)
    return tag, dictionary_VR(tag)


def _text(ds: Any, keyword: str) -> str | None:
    value = _value(ds, keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = " ".join(str(value).split()).upper()
    return text[:_TEXT_MAX] or None


def spacing_bucket(ds: Any) -> str:
    """The bucket of the row spacing in mm (Pixel Spacing, else Imager Pixel Spacing), or "none"."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _value(ds, keyword)
        try:
            mm = float(value[0])
        except (TypeError, ValueError, IndexError):
            continue
        if mm > 0:
            return _bucket(mm, _SPACING_EDGES)
    return "none"


def header_features(ds: Any) -> dict[str, Any]:
    """The non-identifying header fields of a dataset (pydicom ``Dataset``; None: all null)."""
    if ds is None:
        return {k: None for k in CATEGORY_FIELDS} | {"rows": None, "columns": None}
    rows, cols = (_int(ds.get(k, None)) for k in ("Rows", "Columns"))
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    syntax_name = getattr(syntax, "name", None) if syntax is not None else None
    # an unknown (private) transfer syntax has its UID as its name: keep no UID
    if syntax_name and syntax_name == str(syntax):
        syntax_name = "private"
    return {
        "modality": _text(ds, "Modality"),
        "body_part": _text(ds, "BodyPartExamined"),
        "manufacturer": _text(ds, "Manufacturer"),
        "photometric": _text(ds, "PhotometricInterpretation"),
        "spacing": spacing_bucket(ds),
        "matrix": None if not rows or not cols else _bucket(max(rows, cols), _MATRIX_EDGES),
        "transfer_syntax": syntax_name,
        "rows": rows,
        "columns": cols,
    }


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def read_header(data: bytes) -> Any:
    """The header of DICOM ``data`` (no pixels), or None when it cannot be read."""
    import pydicom

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - an unreadable header is recorded as unknown
        return None


def image_features(image: np.ndarray) -> dict[str, float]:
    """STAT_FIELDS of one preprocessed image (values in [0, 1]): mean, standard deviation,
    percentiles, sharpness and the half/centre contrasts."""
    img = np.asarray(image, dtype=np.float32)
    img = img.reshape(img.shape[0], img.shape[1])
    x = img.reshape(-1)
    ranked = np.sort(x)  # percentiles as numpy's default (linear) method, from one sort
    pos = np.asarray(PERCENTILES, float) / 100 * (x.size - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, x.size - 1)
    pct = ranked[lo] + (ranked[hi] - ranked[lo]) * (pos - lo)
    out = {"mean": float(x.mean()), "std": float(x.std())}
    out |= {f"p{p:02d}": float(v) for p, v in zip(PERCENTILES, pct)}
    h, w = img.shape
    grad = (np.abs(np.diff(img, axis=0)).mean() + np.abs(np.diff(img, axis=1)).mean()) / 2
    centre = img[h // 4: h - h // 4, w // 4: w - w // 4]
    border = (x.sum() - centre.sum()) / max(1, x.size - centre.size)
    out |= {"sharpness": float(grad / max(float(x.std()), 1e-3)), "tb": float(img[: h // 2].mean() - img[h - h // 2:].mean()),
            "lr": float(img[:, : w // 2].mean() - img[:, w - w // 2:].mean()),
            "cb": float(centre.mean() - border)}
    return {k: round(v, 6) for k, v in out.items()}


def item_features(data: bytes, image: np.ndarray, error: str, *, header: Any = None,
                  fields: dict[str, Any] | None = None,
                  stats: dict[str, float] | None = None) -> dict[str, Any]:
    """The drift features of one served item: header fields (``fields``, already taken; else
    from ``header``, else read from ``data``), image statistics (null for an item preprocessing
    could not use; ``stats``: its ``image_features`` already computed, e.g. by
    :func:`image_features_batch`) and ``error``, its quarantine reason only (null when
    answered)."""
    reason = error.split(":", 1)[0].strip() if error else ""
    refused = reason == "too_large"  # its header is not read again: it may be a deflate bomb
    if fields is not None:
        record = dict(fields)
    else:
        if header is None and not refused:
            header = read_header(data)
        record = header_features(header)
    record |= ({k: None for k in STAT_FIELDS} if error
               else stats if stats is not None else image_features(image))
    record["error"] = reason or None
    return record


def image_features_batch(images: np.ndarray) -> list[dict[str, float]]:
    """:func:`image_features` of each of ``images`` (``(n, H, W)`` or ``(n, H, W, 1)``), the same
    numbers (every reduction runs over the same values in the same order), with a few numpy
    calls per batch instead of per image: what the serving path records."""
    imgs = np.ascontiguousarray(images, dtype=np.float32)
    n = len(imgs)
    if n == 0:
        return []
    imgs = imgs.reshape(n, imgs.shape[1], imgs.shape[2])
    h, w = imgs.shape[1:]
    x = imgs.reshape(n, -1)
    ranked = np.sort(x, axis=1)
    pos = np.asarray(PERCENTILES, float) / 100 * (h * w - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, h * w - 1)
    pct = ranked[:, lo] + (ranked[:, hi] - ranked[:, lo]) * (pos - lo)
    mean, std = x.mean(axis=1), x.std(axis=1)
    down = np.abs(np.diff(imgs, axis=1)).reshape(n, -1).mean(axis=1)
    across = np.abs(np.diff(imgs, axis=2)).reshape(n, -1).mean(axis=1)
    total = x.sum(axis=1)
    top = imgs[:, : h // 2].reshape(n, -1).mean(axis=1)
    bottom = imgs[:, h - h // 2:].reshape(n, -1).mean(axis=1)
    out = []
    for i in range(n):  # the halves and the centre are strided views: as image_features takes them
        img = imgs[i]
        centre = img[h // 4: h - h // 4, w // 4: w - w // 4]
        border = (total[i] - centre.sum()) / max(1, h * w - centre.size)
        grad = (down[i] + across[i]) / 2
        row = {"mean": float(mean[i]), "std": float(std[i])}
        row |= {f"p{p:02d}": float(v) for p, v in zip(PERCENTILES, pct[i])}
        row |= {"sharpness": float(grad / max(float(std[i]), 1e-3)), "tb": float(top[i] - bottom[i]),
                "lr": float(img[:, : w // 2].mean() - img[:, w - w // 2:].mean()),
                "cb": float(centre.mean() - border)}
        out.append({k: round(v, 6) for k, v in row.items()})
    return out


def answer_record(features: dict[str, Any] | str | bytes, probability: float | None,
                  ood_score: float | None = None) -> dict[str, Any]:
    """One log record: ``features`` (a dict or its JSON) with the answer; an errored item's
    probability (that of a blank image) is recorded as null."""
    record = dict(json.loads(features) if isinstance(features, (str, bytes)) else features)
    answered = not record.get("error")
    record["probability"] = _finite(probability) if answered else None
    record["ood_score"] = _finite(ood_score) if answered else None
    return record


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, 6) if np.isfinite(value) else None


class RequestLog:
    """Append-only JSON-lines log in ``directory``, rotated at ``max_bytes``, ``keep`` old files.

    ``append`` takes an exclusive ``flock`` (other Triton instances or processes may write too),
    writes whole lines in one ``write``, and rotates when the current file has reached
    ``max_bytes``; the oldest rotated file is dropped, so the log never holds more than about
    ``(keep + 1) * max_bytes``. The files survive a server restart.
    """

    def __init__(self, directory: Path | str, *, max_bytes: int = 64 * 1024 * 1024,
                 keep: int = 3) -> None:
        self.directory = Path(directory)
        self.max_bytes, self.keep = int(max_bytes), int(keep)

    @property
    def path(self) -> Path:
        return self.directory / LOG_NAME

    def rotated(self, i: int) -> Path:
        return self.directory / f"requests.{i}.jsonl"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _rotate(self) -> None:
        self.rotated(self.keep).unlink(missing_ok=True)
        for i in range(self.keep - 1, 0, -1):
            if self.rotated(i).exists():
                self.rotated(i).replace(self.rotated(i + 1))
        if self.keep > 0:
            self.path.replace(self.rotated(1))
        else:
            self.path.unlink(missing_ok=True)

    def append(self, records: Sequence[dict[str, Any]]) -> int:
        """Append ``records`` (one JSON line each); returns how many were written."""
        if not records:
            return 0
        data = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n"
                       for r in records).encode()
        with self._locked():
            try:
                if self.path.stat().st_size >= self.max_bytes:
                    self._rotate()
            except FileNotFoundError:
                pass
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return len(records)

    def files(self) -> list[Path]:
        """The log's files, oldest first."""
        old = [self.rotated(i) for i in range(self.keep, 0, -1)]
        return [p for p in (*old, self.path) if p.is_file()]

    def read_last(self, n: int | None = None) -> list[dict[str, Any]]:
        """The last ``n`` records (all with None), oldest first; lines that do not parse (a write
        cut short by a crash) are skipped."""
        out: list[dict[str, Any]] = []
        for path in reversed(self.files()):
            lines = path.read_bytes().splitlines()
            batch = []
            for line in reversed(lines):
                if n is not None and len(out) + len(batch) >= n:
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    batch.append(record)
            out.extend(batch)
            if n is not None and len(out) >= n:
                break
        return out[::-1]
