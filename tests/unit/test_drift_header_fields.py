"""The drift record's header fields come from raw ASCII bytes where they can (fast), and must be
what pydicom's own conversion of the same elements gives, on every file pydicom ships (its test
files and its character-set files: Latin-1, UTF-8, ISO 2022 Japanese and Korean, ...)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest

from medops.drift import header_features

# the files in pydicom's wheel (get_testdata_files would also try to download more)
DATA = Path(pydicom.__file__).parent / "data"
FILES = sorted(p for d in ("test_files", "charset_files") for p in (DATA / d).rglob("*")
               if p.is_file() and p.suffix not in (".py", ".pyc", ".json", ".txt", ".gz", ".bz2"))


def _read(data: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)


def test_raw_header_fields_equal_pydicoms_conversion_on_every_shipped_file() -> None:
    compared = 0
    for path in FILES:
        data = Path(path).read_bytes()
        try:
            raw, converted = _read(data), _read(data)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in converted.iterall():  # every element converted by pydicom
                    pass
        except Exception:  # noqa: BLE001 - not a file pydicom reads
            continue
        assert header_features(raw) == header_features(converted), path
        compared += 1
    assert compared >= 100, compared


@pytest.mark.parametrize("body_part", [b"CHEST ", b"CT\\MR ", b" A  B \\ C\x00", b"", b"LUNG\x00\x00"])
def test_padding_and_values_are_taken_as_pydicom_takes_them(body_part) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "CR"
    ds.PixelSpacing = ["0.139", "0.139"]
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=False, little_endian=True)
    data = out.getvalue().replace(b"CR", b"CR", 1)
    # the Body Part Examined element written by hand, as a device might pad it
    value = body_part + (b" " if len(body_part) % 2 else b"")
    data += b"\x18\x00\x15\x00CS" + len(value).to_bytes(2, "little") + value
    # and the same bytes as Manufacturer (LO: pydicom splits first, then strips each value)
    data += b"\x08\x00\x70\x00LO" + len(value).to_bytes(2, "little") + value
    raw, converted = _read(data), _read(data)
    for _ in converted.iterall():
        pass
    assert header_features(raw) == header_features(converted)
    assert header_features(raw)["spacing"] == "[0.1,0.2)"
