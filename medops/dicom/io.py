"""Reading DICOM files and decoding their pixel data, with every failure typed.

Everything that can go wrong with a file from a hospital export (not DICOM at all, cut short, no
image, a transfer syntax nobody here can decode, corrupt compressed data) becomes a
:class:`~medops.errors.DicomReadError` whose ``reason`` is a
:class:`~medops.errors.QuarantineReason`. No raw pydicom or numpy exception leaves this module, so
callers can quarantine a file and go on.

numpy and pydicom only (no TensorFlow).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Literal, Union

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset, validate_file_meta
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from medops.errors import PROCESS_EXITS, DicomReadError, QuarantineReason, first_line

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]
FramePolicy = Literal["first", "middle", "max"]

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# What one file may cost to read, checked before the memory is taken (Pillow's MAX_IMAGE_PIXELS
# and DecompressionBombError are the model): a deflate bomb, or a header that declares
# 65535 x 65535 pixels over a few bytes of compressed data, is refused as ``too_large`` instead of
# taking the process' memory. Both are far above any real radiograph, CT slice or multi-frame
# series: a 4,000 x 5,000 mammogram is 40 MB of stored values, 1,000 CT slices 512 MB.
MAX_INFLATED_BYTES = 1 << 29  # a Deflated Explicit VR Little Endian data set (PS3.5 A.5), inflated
MAX_DECODED_BYTES = 1 << 30   # the stored values one decode returns (one frame, or all for "max")
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Attributes that a real DICOM data set (PS3.3 C.12.1 SOP Common, C.7.6.3 Image Pixel) carries;
# a file read with force=True that has none of them is some other file format.
_EVIDENCE = (Tag(0x0008, 0x0016), Tag(0x0008, 0x0018), Tag(0x0008, 0x0060), Tag(0x0028, 0x0010),
             Tag(0x0020, 0x000D), Tag(0x7FE0, 0x0010))


def _describe(source: Source) -> str:
    """The prefix of this source's error messages: its path, or nothing for bytes and streams
    (the caller knows which file it gave; "<bytes>: " would only be noise in its report)."""
    if isinstance(source, (str, os.PathLike)):
        return f"{source}: "
    return ""


def _open(source: Source) -> BinaryIO:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        try:
            return io.BytesIO(Path(source).read_bytes())
        except OSError as exc:
            raise DicomReadError(f"{source}: cannot read file: {exc}", QuarantineReason.NOT_DICOM) from exc
    return source


def _size(fp: BinaryIO) -> int | None:
    if isinstance(fp, io.BytesIO):
        return len(fp.getbuffer())
    try:
        return os.fstat(fp.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def _check_complete(ds: Dataset, prefix: str, total: int | None) -> None:
    """Raise TRUNCATED when an element's value is shorter than its header says, or the file ends
    inside an element header.

    pydicom stops quietly at the end of a cut-short file and keeps the partial last value; the
    declared lengths (PS3.5 7.1) are the only evidence, so compare them with what was read.
    """
    keys = list(ds.keys())
    if total is not None and keys:
        last = ds.get_item(keys[-1])
        tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
        if tell is not None and length is not None and length != _UNDEFINED_LENGTH:
            left = total - (tell + length)
            if 0 < left < 8:  # fewer bytes than one element header (PS3.5 7.1.2): cut mid-header
                raise DicomReadError(f"{prefix}truncated: the file ends {left} byte(s) into an "
                                     f"element header after {Tag(keys[-1])}", QuarantineReason.TRUNCATED)
    # pydicom reads each value whole unless the file ends first, so only the last element read
    # can be short
    for tag in keys[-1:]:
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if length is None or length == _UNDEFINED_LENGTH or not isinstance(value, (bytes, bytearray)):
            continue
        if len(value) < length:
            raise DicomReadError(
                f"{prefix}truncated: element {Tag(tag)} declares {length} bytes but the file holds "
                f"{len(value)}",
                QuarantineReason.TRUNCATED,
            )


def _convert_all(ds: Dataset, prefix: str) -> None:
    """Parse every element now (pydicom parses lazily) so that corrupt headers fail here."""
    try:
        for _ in ds.iterall():
            pass
    except DicomReadError:
        raise
    except (EOFError, OSError) as exc:
        raise DicomReadError(f"{prefix}truncated or corrupt element: {exc}",
                             QuarantineReason.TRUNCATED) from exc
    except Exception as exc:  # pydicom raises many kinds for bad values; all are per-file data
        raise DicomReadError(f"{prefix}corrupt header: {type(exc).__name__}: {exc}",
                             QuarantineReason.DECODE_ERROR) from exc


_META_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                            b"UR", b"UT", b"UV"})


def _deflated_start(fp: BinaryIO) -> int | None:
    """Where the deflated data set starts when the File Meta Information (PS3.10 7.1, explicit VR
    little endian after the preamble and 'DICM') declares Deflated Explicit VR Little Endian;
    None otherwise. Leaves ``fp`` where it was."""
    start = fp.tell()
    try:
        if fp.read(132)[128:] != b"DICM":
            return None
        uid = b""
        while True:
            here = fp.tell()
            head = fp.read(8)
            if len(head) < 8 or struct.unpack_from("<H", head)[0] != 2:
                return here if uid.strip(b"\x00 ") == DeflatedExplicitVRLittleEndian.encode() else None
            if head[4:6] in _META_LONG_VRS:
                raw = fp.read(4)
                if len(raw) < 4:
                    return None
                (length,) = struct.unpack("<L", raw)
            else:
                (length,) = struct.unpack_from("<H", head, 6)
            if length > 1 << 16:  # no File Meta element is that long: not a header to trust
                return None
            value = fp.read(length)
            if head[2:4] == b"\x10\x00":  # (0002,0010) Transfer Syntax UID
                uid = value
    finally:
        fp.seek(start)


def inflated_size_refusal(fp: BinaryIO, limit: int = MAX_INFLATED_BYTES) -> str | None:
    """Why a deflated file (PS3.5 A.5) is refused before pydicom inflates it whole, or None.

    pydicom inflates a deflated data set in one call, however large it becomes; a few MB can
    inflate to GBs (a deflate bomb). This inflates it in 1 MiB pieces, keeping none of them,
    and stops as soon as it passes ``limit`` bytes. A stream that is not valid deflate data is
    left to pydicom to reject. Leaves ``fp`` where it was.
    """
    offset = _deflated_start(fp)
    if offset is None:
        return None
    start = fp.tell()
    inflater, total, piece = zlib.decompressobj(-zlib.MAX_WBITS), 0, 1 << 20
    try:
        fp.seek(offset)
        while not inflater.eof:
            data = fp.read(piece) or inflater.unconsumed_tail
            if not data:
                break
            while data and total <= limit:
                total += len(inflater.decompress(data, piece))
                data = inflater.unconsumed_tail
            if total > limit:
                return (f"the deflated data set inflates to more than {limit} bytes: refused "
                        f"before inflating it")
    except zlib.error:
        return None
    finally:
        fp.seek(start)
    return None


def read_dataset(source: Source, *, require_pixels: bool = True, parse_all: bool = True) -> FileDataset:
    """Read a DICOM file (path, bytes or binary stream) into a pydicom Dataset.

    Files with the PS3.10 preamble and File Meta Information (PS3.10 7.1) are read strictly. Files
    without them (older exports, PS3.10 7.1 makes them non-conformant but they exist) are read with
    ``force=True`` and accepted only if they hold SOP Common or Image Pixel attributes, so that text,
    JSON or gzip files are rejected rather than parsed as nonsense.

    Args:
        source: a path, the file's bytes, or a binary stream positioned at its start.
        require_pixels: raise ``no_pixel_data`` when the data set has no Pixel Data (7FE0,0010)
            (nor Float / Double Float Pixel Data).
        parse_all: parse every element's value now, so that a corrupt value fails here. False
            leaves values as read until they are used (pydicom parses lazily): what ingest does,
            which parses only what it changes and copies the rest through unchanged, and must
            then treat a failure on any later access as this file's failure. The file's
            structure (truncation, the File Meta Information) is checked either way.

    Returns:
        The data set.

    Raises:
        DicomReadError: reason ``not_dicom``, ``truncated``, ``decode_error``, ``no_pixel_data``,
            or ``too_large`` for a deflated data set that inflates to more than
            :data:`MAX_INFLATED_BYTES` (checked before it is inflated).
    """
    prefix = _describe(source)
    fp = _open(source)
    start = fp.tell()
    refused = inflated_size_refusal(fp)
    if refused:
        raise DicomReadError(f"{prefix}{refused}", QuarantineReason.TOO_LARGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd value; failures raise below
        try:
            ds = pydicom.dcmread(fp)
        except InvalidDicomError:
            fp.seek(start)
            try:
                ds = pydicom.dcmread(fp, force=True)
            except Exception as exc:
                raise DicomReadError(f"{prefix}not a DICOM file ({type(exc).__name__}: {exc})",
                                     QuarantineReason.NOT_DICOM) from exc
            if not any(tag in ds for tag in _EVIDENCE):
                raise DicomReadError(
                    f"{prefix}not a DICOM file: no 'DICM' prefix and no DICOM attributes found",
                    QuarantineReason.NOT_DICOM,
                )
        except (EOFError, OSError) as exc:
            raise DicomReadError(f"{prefix}truncated: {exc}", QuarantineReason.TRUNCATED) from exc
        except Exception as exc:
            raise DicomReadError(f"{prefix}unreadable DICOM: {type(exc).__name__}: {exc}",
                                 QuarantineReason.DECODE_ERROR) from exc
        if len(ds) == 0:
            raise DicomReadError(f"{prefix}no data elements after the file meta information",
                                 QuarantineReason.TRUNCATED if len(ds.file_meta) else QuarantineReason.NOT_DICOM)
        try:
            _check_complete(ds, prefix, _size(fp))
        except DicomReadError:
            raise
        except Exception as exc:  # e.g. a stray delimiter as the last element: VR NONE
            raise DicomReadError(f"{prefix}corrupt header: {type(exc).__name__}: {exc}",
                                 QuarantineReason.DECODE_ERROR) from exc
        if parse_all:
            _convert_all(ds, prefix)
    if require_pixels and not any(k in ds for k in _PIXEL_KEYWORDS):
        raise DicomReadError(f"{prefix}no pixel data (7FE0,0010); SOP class {_sop_class(ds)}",
                             QuarantineReason.NO_PIXEL_DATA)
    return ds


def _sop_class(ds: Dataset) -> str:
    """SOP Class UID for a message; its value may be the corrupt one (an unknown VR, a length
    that does not fit its VR), which must not turn the message into another exception."""
    try:
        return str(ds.get("SOPClassUID", "unknown"))
    except Exception:  # noqa: BLE001 - parsed lazily here (parse_all=False)
        return "unreadable"


def elements(ds: Dataset) -> dict:
    """A data set's elements by tag, as pydicom stores them (``RawDataElement`` while as read):
    its own mapping, so that walking every element does not go through ``get_item`` per tag.
    Read values only; an element stored here is not converted, so only put back one that was
    stored before. (pydicom 3 keeps them in ``Dataset._dict``; pyproject pins pydicom < 4 and
    the encode_file tests would catch a change.)"""
    return ds._dict


@contextmanager
def looking_only(ds: Dataset) -> Iterator[Dataset]:
    """Parse ``ds``'s values freely inside the block; on leaving it, every top-level element that
    was left as read before it (``read_dataset(..., parse_all=False)``) is put back as read.

    Looking at a value parses it, and a parsed element is re-encoded when written; what was only
    looked at (the pixel description, the window, the patient's sex) is copied byte for byte
    instead, by :func:`encode_file`. Changes made inside the block to those elements are undone.
    """
    stored = elements(ds)
    as_read = {tag: elem for tag, elem in stored.items() if elem.is_raw}
    try:
        yield ds
    finally:
        for tag, elem in as_read.items():
            now = stored.get(tag)
            if now is not None and not now.is_raw:
                stored[tag] = elem  # as pydicom's __setitem__ stores an element as read


def _parse_foreign(ds: Dataset, implicit_vr: bool, little_endian: bool) -> None:
    """Parse the elements still stored in another encoding than the one ``ds`` is written in
    (a file whose header declares explicit VR but holds implicit VR, say): their bytes cannot be
    copied, so pydicom re-encodes them from their values."""
    for tag, elem in list(elements(ds).items()):
        if elem.is_raw and (elem.is_implicit_VR, elem.is_little_endian) != (implicit_vr, little_endian):
            ds[tag]  # noqa: B018 -- parses the element in place


# explicit VRs with a reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0, little endian


def _header(tag: int, vr: str | None, length: int, implicit_vr: bool) -> bytes:
    """A little-endian element header as pydicom writes it (PS3.5 7.1): tag and length for
    implicit VR; tag, VR and a 2-byte length, or a reserved field and a 4-byte length for the long
    VRs, for explicit VR (an undefined length on a short VR gets a 4-byte length, as in pydicom)."""
    group, element = tag >> 16, tag & 0xFFFF
    if implicit_vr:
        return struct.pack("<HHL", group, element, length)
    assert vr is not None
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", group, element, vr.encode(), 0, length)
    if length == 0xFFFFFFFF:
        return struct.pack("<HH2sL", group, element, vr.encode(), length)
    return struct.pack("<HH2sH", group, element, vr.encode(), length)


def _write_elements(fp: DicomBytesIO, ds: Dataset, implicit_vr: bool) -> None:
    """pydicom's ``write_dataset`` for a little-endian data set stored in the encoding it is
    written in: an element still as read is copied (its header rebuilt from the tag, VR and
    length it was read with, a sequence delimiter after an undefined length, as pydicom writes
    it), a parsed one is encoded by pydicom. Group lengths (gggg,0000) above group 6 are dropped,
    as pydicom drops them (PS3.5 7.2)."""
    charset = ds.get("SpecificCharacterSet", None) or "iso8859"
    for tag, elem in sorted(elements(ds).items()):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue
        if elem.is_raw and elem.value is None:  # no value read (an empty UN): pydicom parses it
            elem = ds[tag]
        if not elem.is_raw:
            write_data_element(fp, elem, charset)
            continue
        value = elem.value or b""
        undefined = elem.length == 0xFFFFFFFF
        fp.write(_header(tag, elem.VR, 0xFFFFFFFF if undefined else len(value), implicit_vr))
        fp.write(value)
        if undefined:
            fp.write(_SEQUENCE_DELIMITER)


def _copyable(ds: Dataset, encoding: tuple[bool, bool]) -> bool:
    """Whether :func:`_write_elements` writes ``ds`` as pydicom's ``write_dataset`` would: ``ds``
    was read in this encoding and its character set is unchanged (otherwise pydicom re-encodes
    every element; pydicom parses Specific Character Set as it reads, so the test is its own).
    Elements stored in another encoding were parsed by :func:`_parse_foreign` before."""
    return tuple(ds.original_encoding) == encoding and ds.original_character_set == ds._character_set


_META_PADDING = {"UI": b"\x00", "SH": b" ", "AE": b" ", "LO": b" ", "CS": b" ", "OB": b"\x00"}


def _encode_meta(meta: Dataset) -> bytes | None:
    """The File Meta Information group as pydicom's ``write_file_meta_info`` writes it (explicit VR
    little endian, the group length first), for a meta already completed by
    ``validate_file_meta``; None when an element is not a plain text, OB or UL value (pydicom
    then writes it)."""
    body: list[bytes] = []
    for tag in sorted(meta.keys()):
        if tag == 0x00020000:
            continue
        elem = meta.get_item(tag)
        vr = elem.VR
        if elem.is_raw:
            if vr is None or elem.length == 0xFFFFFFFF:
                return None
            data = elem.value or b""
        elif vr in _META_PADDING and vr != "OB":
            value = elem.value
            if value is not None and not isinstance(value, str):
                return None  # several values
            if value is not None and not value.isascii():
                return None
            data = (value or "").encode("ascii")
        elif vr == "OB":
            data = bytes(elem.value or b"")
        elif vr == "UL" and isinstance(elem.value, int):
            data = struct.pack("<L", elem.value)
        else:
            return None
        if len(data) % 2:
            data += _META_PADDING.get(vr, b" ")
        if vr not in _LONG_VRS and len(data) > 0xFFFF:
            return None
        body += (_header(tag, vr, len(data), implicit_vr=False), data)
    content = b"".join(body)
    return _header(0x00020000, "UL", 4, implicit_vr=False) + struct.pack("<L", len(content)) + content


# text VRs whose value pydicom decodes alike in every character set when it is ASCII without an
# escape sequence (PS3.5 6.1.2.5.3: ISO 2022 switches repertoires only with ESC)
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "PN", "SH", "TM", "UI"})


def text_value(ds: Dataset, keyword: str) -> str:
    """``str(ds.get(keyword, "") or "")`` without parsing the element when it is still as read.

    An element as read with an explicit text VR whose bytes are one ASCII value (no backslash,
    no escape) is decoded here, as pydicom would decode it, and stays as read (so it is copied
    byte for byte, see :func:`encode_file`); anything else (parsed, implicit VR, several values,
    another VR, other characters) is parsed by pydicom as before.
    """
    elem = ds.get_item(keyword)
    if elem is None:
        return ""
    text = stored_text(elem)
    if text is not None and "\\" not in text:
        return text
    return str(ds.get(keyword, "") or "")


def stored_text(elem: DataElement | RawDataElement) -> str | None:
    """An element's value as pydicom decodes it before splitting it into values (backslashes
    kept, trailing spaces and NULs removed), when it is still as read with an explicit text VR
    (:data:`_TEXT_VRS`) and ASCII without an escape; None otherwise (parse it)."""
    if not elem.is_raw or elem.VR not in _TEXT_VRS:
        return None
    value = elem.value
    if not isinstance(value, bytes) or not value.isascii() or b"\x1b" in value:
        return None
    return value.decode("ascii").rstrip(" \x00")


def number_value(ds: Dataset, keyword: str, *, first: bool = False) -> float:
    """A DS or IS element's value as a float, as ``float`` of pydicom's value gives it (``first``:
    of its first value, for a VM 1-n attribute such as Window Center), read from its bytes when
    it is still as read with an explicit VR, so that it stays as read.

    Raises:
        KeyError: no such element. TypeError, ValueError, IndexError: no value, several values
            (unless ``first``), or not a number.
    """
    elem = ds.get_item(keyword)
    if elem is None:
        raise KeyError(keyword)
    if elem.is_raw and elem.VR in ("DS", "IS") and isinstance(elem.value, bytes) and elem.value.isascii():
        values = elem.value.split(b"\\")
        if len(values) > 1 and not first:
            raise TypeError(f"{keyword} has {len(values)} values")
        return float(values[0].strip(b" \x00").decode("ascii"))
    value = ds[keyword].value
    if first and isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0]
    return float(value)


def encode_file(ds: Dataset) -> bytes:
    """A data set as a DICOM file (PS3.10): a zeroed preamble, 'DICM', the File Meta Information
    (completed: group length, version, implementation), then the data set in its transfer syntax.

    Elements left as read (see :func:`read_dataset`'s ``parse_all``) are copied byte for byte and
    parsed ones are encoded; a kept element costs no parsing. The preamble is never copied: it is
    for application profiles and may hold anything. Deflated and big-endian files, files without
    File Meta Information, and files whose header cannot be completed go through pydicom's
    ``dcmwrite`` (written as read where the meta cannot be completed).

    Raises:
        ValueError and others from pydicom: the data set cannot be encoded.
    """
    meta = getattr(ds, "file_meta", None)
    uid = UID(meta.get("TransferSyntaxUID", "") or "") if meta is not None else UID("")
    fast = (uid.is_transfer_syntax and not uid.is_private and uid.is_little_endian
            and uid != DeflatedExplicitVRLittleEndian
            and not any(tag >> 16 in (0, 2) for tag in ds.keys()))
    if fast:
        assert meta is not None
        encoding = (uid.is_implicit_VR, uid.is_little_endian)
        _parse_foreign(ds, *encoding)
        for meta_keyword, keyword in (("MediaStorageSOPClassUID", "SOPClassUID"),
                                      ("MediaStorageSOPInstanceUID", "SOPInstanceUID")):
            value = text_value(ds, keyword)
            if value and meta.get(meta_keyword) != value:
                setattr(meta, meta_keyword, value)
        pixels = ds.get_item(Tag(0x7FE0, 0x0010)) if "PixelData" in ds else None
        if pixels is not None and (not pixels.is_raw or (pixels.length == 0xFFFFFFFF) != uid.is_compressed):
            # PS3.5 A.4: encapsulated pixel data has an undefined length, native a defined one
            ds["PixelData"].is_undefined_length = uid.is_compressed
        try:
            fp = DicomBytesIO()
            fp.is_implicit_VR, fp.is_little_endian = False, True
            fp.write(b"\x00" * 128 + b"DICM")
            validate_file_meta(meta, enforce_standard=True)  # completes it, or raises
            encoded_meta = _encode_meta(meta)
            if encoded_meta is None:
                write_file_meta_info(fp, meta, enforce_standard=True)
            else:
                fp.write(encoded_meta)
            fp.is_implicit_VR, fp.is_little_endian = encoding
            if _copyable(ds, encoding):
                _write_elements(fp, ds, implicit_vr=encoding[0])
            else:
                write_dataset(fp, ds)
            return fp.getvalue()
        except Exception:  # noqa: BLE001 -- e.g. a File Meta Information that cannot be completed
            pass  # pydicom's own writer below decides
    for elem in ds.iterall():  # parsed, so that pydicom can re-encode whatever it must
        pass
    if getattr(ds, "preamble", None) is not None:
        ds.preamble = None
    out = io.BytesIO()
    try:
        pydicom.dcmwrite(out, ds, enforce_file_format=True)
    except Exception:
        # e.g. a file read without File Meta whose meta cannot be completed: write as read
        out = io.BytesIO()
        pydicom.dcmwrite(out, ds, enforce_file_format=False)
    return out.getvalue()


def transfer_syntax(ds: Dataset) -> UID:
    """The data set's transfer syntax (PS3.5 10): from the file meta, else from how it was read."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid:
        return UID(uid)
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit:
        return pydicom.uid.ImplicitVRLittleEndian
    if little is False:
        return pydicom.uid.ExplicitVRBigEndian
    return pydicom.uid.ExplicitVRLittleEndian


def _ensure_transfer_syntax(ds: Dataset) -> UID:
    uid = transfer_syntax(ds)
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = uid
    return uid


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames (0028,0008), 1 when absent or invalid (PS3.3 C.7.6.6)."""
    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1
    return max(n, 1)


def select_frame(n_frames: int, policy: FramePolicy) -> int | None:
    """The frame index a policy reads: ``first`` 0, ``middle`` n // 2, ``max`` None (all frames)."""
    if policy == "first":
        return 0
    if policy == "middle":
        return n_frames // 2
    if policy == "max":
        return None
    raise ValueError(f"frame policy must be first, middle or max, got {policy!r}")


def _dims(ds: Dataset) -> str:
    return " x ".join(f"{k} {ds.get(k, '-')}" for k in ("Rows", "Columns", "NumberOfFrames",
                                                          "SamplesPerPixel", "BitsAllocated"))


def decoded_bytes(ds: Dataset, *, frames: int) -> int | None:
    """The bytes ``frames`` frames of stored values take once decoded, from the Image Pixel
    description (PS3.3 C.7.6.3: Rows x Columns x Samples per Pixel x whole bytes per Bits
    Allocated); None when the description cannot be read (the decoder then says what is wrong)."""
    try:
        dims = [int(ds.get(k, default) or default)
                for k, default in (("Rows", 0), ("Columns", 0), ("SamplesPerPixel", 1),
                                   ("BitsAllocated", 8))]
    except (TypeError, ValueError):
        return None
    rows, columns, samples, bits = dims
    return max(rows, 0) * max(columns, 0) * max(samples, 1) * max(frames, 1) * max(1, -(-bits // 8))


def decode_pixels(ds: Dataset, *, frame: FramePolicy = "middle",
                  max_decoded_bytes: int = MAX_DECODED_BYTES) -> tuple[np.ndarray, str]:
    """Decode the stored pixel values of one frame (or all frames for ``max``).

    Colour data in YBR is converted to RGB by the decoder (PS3.3 C.7.6.3.1.2), so the returned
    photometric interpretation may differ from the header's.

    Args:
        ds: a data set from :func:`read_dataset`.
        frame: which frame of a multi-frame image: ``first``, ``middle`` or ``max`` (all frames,
            shaped (frames, rows, columns[, samples]), for a maximum intensity projection).
        max_decoded_bytes: refuse (``too_large``), before decoding, a file whose description
            declares more bytes of decoded values than this for what ``frame`` decodes.

    Returns:
        ``(array, photometric_interpretation)``: the stored values (before any LUT) and the
        photometric interpretation that describes them.

    Raises:
        DicomReadError: ``no_pixel_data``, ``unsupported_transfer_syntax``, ``truncated``,
            ``unsupported_pixels``, ``too_large`` or ``decode_error`` (also when a decoding
            plugin raises what is no ``Exception``, such as a Rust panic).
    """
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise DicomReadError("no pixel data (7FE0,0010)", QuarantineReason.NO_PIXEL_DATA)
    uid = _ensure_transfer_syntax(ds)
    try:
        decoder = pydicom.pixels.get_decoder(uid)
    except NotImplementedError as exc:
        raise DicomReadError(f"no decoder exists for transfer syntax {uid} ({uid.name})",
                             QuarantineReason.UNSUPPORTED_TRANSFER_SYNTAX) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise DicomReadError(f"transfer syntax {uid} ({uid.name}) needs a decoding plugin that is not "
                             f"installed ({missing})", QuarantineReason.UNSUPPORTED_TRANSFER_SYNTAX)
    n_frames = number_of_frames(ds)
    index = select_frame(n_frames, frame) if n_frames > 1 else None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    size = decoded_bytes(ds, frames=1 if index is not None else n_frames)
    if size is not None and size > max_decoded_bytes:
        raise DicomReadError(
            f"the pixel description declares {size} bytes of decoded values "
            f"({_dims(ds)}), over the limit of {max_decoded_bytes}: refused before decoding",
            QuarantineReason.TOO_LARGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr, meta = decoder.as_array(ds, index=index)
    except ValueError as exc:
        text = str(exc)
        lowered = text.lower()
        if "expected length" in lowered or "less than expected" in lowered \
                or "insufficient" in lowered or "too short" in lowered:
            raise DicomReadError(f"truncated pixel data: {text}", QuarantineReason.TRUNCATED) from exc
        raise DicomReadError(f"cannot decode pixel data ({uid.name}): {text}",
                             QuarantineReason.DECODE_ERROR) from exc
    except (AttributeError, KeyError, TypeError) as exc:
        # a required Image Pixel attribute (PS3.3 C.7.6.3) is missing or has an invalid value
        raise DicomReadError(f"unsupported pixel description: {type(exc).__name__}: {exc}",
                             QuarantineReason.UNSUPPORTED_PIXELS) from exc
    except Exception as exc:
        raise DicomReadError(f"cannot decode pixel data ({uid.name}): {type(exc).__name__}: {exc}",
                             QuarantineReason.DECODE_ERROR) from exc
    except PROCESS_EXITS:
        raise
    except BaseException as exc:
        # a plugin written in Rust or C that panicked (pyo3's PanicException is a BaseException,
        # so pydicom does not try the next plugin): this file's failure, never the caller's
        plugins = ", ".join(sorted(decoder.available_plugins)) or "none"
        raise DicomReadError(
            f"the {uid.name} ({uid}) decoder crashed on this file (plugins: {plugins}): "
            f"{type(exc).__name__}: {first_line(exc)}", QuarantineReason.DECODE_ERROR) from None
    if isinstance(meta, dict) and meta.get("photometric_interpretation"):
        photometric = str(meta["photometric_interpretation"]).strip().upper()
    if arr.size == 0:
        raise DicomReadError("pixel data decoded to an empty array", QuarantineReason.DECODE_ERROR)
    return np.asarray(arr), photometric
