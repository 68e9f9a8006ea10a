"""io: every way a file can be bad becomes a DicomReadError with the right reason."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import pydicom_file
from medops.config import PreprocessSpec
from medops.dicom import io as dio
from medops.dicom.pixels import prepare_image
from medops.errors import DicomReadError, QuarantineReason as R


def _reason(source) -> R:
    with pytest.raises(DicomReadError) as err:
        ds = dio.read_dataset(source)
        prepare_image(ds, PreprocessSpec(image_size=8))
    assert str(err.value)  # the message says what was wrong
    return err.value.reason


def _native(rows: int = 4, cols: int = 4, ts=ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(rows * cols))
    return ds


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_garbage_text_json_and_empty_are_not_dicom():
    assert _reason(os.urandom(4096)) == R.NOT_DICOM
    assert _reason(b"patient,label\n1,0\n") == R.NOT_DICOM
    assert _reason(json.dumps({"a": 1}).encode()) == R.NOT_DICOM
    assert _reason(b"") == R.NOT_DICOM


def test_messages_name_a_path_but_not_a_byte_string(tmp_path):
    # the caller of read_dataset(bytes) reports which file it was; a path is named in the message
    text = b"patient,label\n1,0\n"
    with pytest.raises(DicomReadError) as from_bytes:
        dio.read_dataset(text)
    assert str(from_bytes.value).startswith("not a DICOM file")
    (tmp_path / "notes.csv").write_bytes(text)
    with pytest.raises(DicomReadError) as from_path:
        dio.read_dataset(tmp_path / "notes.csv")
    assert str(from_path.value) == f"{tmp_path / 'notes.csv'}: {from_bytes.value}"


def test_missing_file_is_a_typed_error(tmp_path):
    assert _reason(tmp_path / "nope.dcm") == R.NOT_DICOM


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.97])
def test_cut_short_files_are_truncated(keep):
    data = pydicom_file("CT_small.dcm").read_bytes()
    assert _reason(data[: int(len(data) * keep)]) == R.TRUNCATED


def test_pydicoms_own_truncated_file():
    assert _reason(pydicom_file("MR_truncated.dcm")) == R.TRUNCATED


def test_short_native_pixel_data_is_truncated():
    ds = _native()
    ds.PixelData = ds.PixelData[:10]
    assert _reason(_bytes(ds)) == R.TRUNCATED


def test_no_pixel_data():
    assert _reason(pydicom_file("rtplan.dcm")) == R.NO_PIXEL_DATA
    ds = _native()
    del ds.PixelData
    assert _reason(_bytes(ds)) == R.NO_PIXEL_DATA
    # without require_pixels the same file reads
    assert dio.read_dataset(_bytes(ds), require_pixels=False).Rows == 4


def test_a_transfer_syntax_without_a_decoder():
    ds = _native()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 16])
    assert _reason(_bytes(ds)) == R.UNSUPPORTED_TRANSFER_SYNTAX


def test_corrupt_compressed_data_is_a_decode_error():
    ds = pydicom.dcmread(pydicom_file("JPEG2000.dcm"))
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = pydicom.encaps.encapsulate([frame[:40] + b"\xff" * 200])
    assert _reason(_bytes(ds)) == R.DECODE_ERROR


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
                                  "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "image_dfl.dcm"])
def test_real_files_read_and_decode(name):
    path = pydicom_file(name)
    ds = dio.read_dataset(path)
    arr, photometric = dio.decode_pixels(ds)
    assert arr.shape[:2] == (ds.Rows, ds.Columns)
    assert photometric.startswith("MONOCHROME") or photometric in ("RGB", "PALETTE COLOR")
    out = prepare_image(ds, PreprocessSpec(image_size=16))
    assert out.shape == (16, 16) and out.dtype == np.float32
    assert 0.0 <= out.min() <= out.max() <= 1.0 and out.std() > 0


def test_files_without_file_meta_are_read():
    ds = dio.read_dataset(pydicom_file("ExplVR_LitEndNoMeta.dcm"), require_pixels=False)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.8"
    assert dio.transfer_syntax(ds) == ExplicitVRLittleEndian


def test_bytes_path_and_stream_give_the_same_dataset():
    path = pydicom_file("CT_small.dcm")
    a = dio.read_dataset(path)
    b = dio.read_dataset(path.read_bytes())
    c = dio.read_dataset(io.BytesIO(path.read_bytes()))
    assert a.SOPInstanceUID == b.SOPInstanceUID == c.SOPInstanceUID


def test_frame_selection():
    assert dio.select_frame(5, "first") == 0
    assert dio.select_frame(5, "middle") == 2
    assert dio.select_frame(5, "max") is None
    with pytest.raises(ValueError):
        dio.select_frame(5, "last")  # type: ignore[arg-type]


def test_encode_file_writes_what_pydicom_writes_for_every_bundled_file():
    """encode_file copies elements left as read instead of going through pydicom's writer; for
    every file pydicom ships that both can write, the bytes must be the same as pydicom's own
    dcmwrite of the same data set (with the preamble zeroed, which encode_file always does)."""
    from pydicom.data import get_testdata_files

    compared = 0
    for path in get_testdata_files():
        try:
            ours = dio.read_dataset(path, parse_all=False, require_pixels=False)
            theirs = dio.read_dataset(path, parse_all=False, require_pixels=False)
        except DicomReadError:
            continue
        theirs.preamble = None
        expected = io.BytesIO()
        try:
            pydicom.dcmwrite(expected, theirs, enforce_file_format=True)
        except (AttributeError, ValueError, TypeError):  # a header pydicom cannot write as is
            continue
        assert dio.encode_file(ours) == expected.getvalue(), path
        compared += 1
    assert compared > 150


def test_looking_only_puts_back_what_was_looked_at_as_read():
    path = pydicom_file("CT_small.dcm")
    ds = dio.read_dataset(path, parse_all=False)
    as_read = {tag for tag in ds.keys() if ds.get_item(tag).is_raw}
    assert len(as_read) == len(ds) - 1  # pydicom parses Specific Character Set as it reads
    with dio.looking_only(ds):
        prepare_image(ds, PreprocessSpec(image_size=8))  # parses the pixel description, window, rescale ...
        assert ds.Rows == 128 and not ds.get_item(pydicom.tag.Tag("Rows")).is_raw
        ds.PatientName = "CHANGED"  # changes to elements as read are undone too
    assert {tag for tag in ds.keys() if ds.get_item(tag).is_raw} == as_read
    assert ds.PatientName == pydicom.dcmread(path).PatientName and ds.Rows == 128
    ds.PatientName = "KEPT"  # outside the block a change stays
    assert dio.read_dataset(dio.encode_file(ds)).PatientName == "KEPT"


def _bundled_pairs():
    """(path, a, b): every readable bundled pydicom file read twice, values left as read."""
    from pydicom.data import get_testdata_files

    for path in get_testdata_files():
        try:
            yield (path, dio.read_dataset(path, parse_all=False, require_pixels=False),
                   dio.read_dataset(path, parse_all=False, require_pixels=False))
        except DicomReadError:
            continue


def _keyword(tag):
    from pydicom.datadict import keyword_for_tag, tag_for_keyword

    keyword = keyword_for_tag(tag)
    return keyword if keyword and tag_for_keyword(keyword) == tag else None  # not repeating groups


def test_text_value_is_what_pydicom_parses_and_leaves_the_element_as_read():
    """text_value decodes single ASCII text values itself (AE, AS, CS, DA, DT, LO, PN, SH, TM, UI)
    instead of parsing them; over every element of every bundled file it must give exactly
    ``str(ds.get(keyword, "") or "")``, and the values it decodes stay as read."""
    compared = from_bytes = 0
    for path, ds, parsed in _bundled_pairs():
        for tag in list(ds.keys()):
            keyword = _keyword(tag)
            if keyword is None:
                continue
            try:
                expected = str(parsed.get(keyword, "") or "")
            except Exception:  # a value pydicom cannot parse: text_value parses it the same way
                continue
            was_raw = ds.get_item(tag).is_raw
            assert dio.text_value(ds, keyword) == expected, (path, keyword)
            compared += 1
            from_bytes += was_raw and ds.get_item(tag).is_raw
    assert "BurnedInAnnotation" not in ds and dio.text_value(ds, "BurnedInAnnotation") == ""
    assert compared > 3000 and from_bytes > 1500  # most values are decoded from their bytes


def test_number_value_is_float_of_what_pydicom_parses():
    """number_value reads DS and IS values from their bytes; over every DS/IS element of every
    bundled file it gives float() of pydicom's (first) value, or fails where that fails."""
    compared = 0
    for path, ds, parsed in _bundled_pairs():
        for tag in list(ds.keys()):
            keyword = _keyword(tag)
            if keyword is None or ds.get_item(tag).VR not in ("DS", "IS"):
                continue
            for first in (True, False):
                try:
                    value = parsed[keyword].value
                    if first and isinstance(value, pydicom.multival.MultiValue):
                        value = value[0]
                    expected = float(value)
                except (TypeError, ValueError, IndexError):
                    with pytest.raises((TypeError, ValueError, IndexError)):
                        dio.number_value(ds, keyword, first=first)
                    continue
                got = dio.number_value(ds, keyword, first=first)
                assert got == expected or (np.isnan(got) and np.isnan(expected)), (path, keyword)
                compared += 1
    assert compared > 500
    ds = dio.read_dataset(pydicom_file("CT_small.dcm"), parse_all=False)
    assert dio.number_value(ds, "RescaleIntercept") == -1024.0
    assert ds.get_item(pydicom.tag.Tag("RescaleIntercept")).is_raw  # still as read
    with pytest.raises(KeyError):
        dio.number_value(ds, "WindowCenter")  # CT_small has no window


# -- what the fuzzer found (benchmarks/fuzz/, tests/data/fuzz/README.md) ------------------------------

def test_a_decoder_panic_is_this_files_decode_error_naming_the_decoder():
    """pylibjpeg-rle (Rust) panics on one changed RLE byte; pyo3 raises that as PanicException, a
    BaseException that ``except Exception`` lets through. It must come out as a DicomReadError."""
    from conftest import fuzz_file

    ds = dio.read_dataset(fuzz_file("rle_panic.dcm"))
    with pytest.raises(DicomReadError) as err:
        dio.decode_pixels(ds)
    assert err.value.reason is R.DECODE_ERROR
    message = str(err.value)
    assert message.startswith("the RLE Lossless (1.2.840.10008.1.2.5) decoder crashed on this file")
    assert "PanicException: index out of bounds" in message and "pylibjpeg" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no foreign object kept


@pytest.mark.parametrize("exit_type", [KeyboardInterrupt, SystemExit])
def test_asking_the_process_to_stop_is_never_taken_for_a_bad_file(monkeypatch, exit_type):
    ds = dio.read_dataset(pydicom_file("MR_small_RLE.dcm"))
    decoder = pydicom.pixels.get_decoder(ds.file_meta.TransferSyntaxUID)

    def stop(*args, **kwargs):
        raise exit_type()

    monkeypatch.setattr(type(decoder), "as_array", stop)
    with pytest.raises(exit_type):
        dio.decode_pixels(ds)


def test_a_declared_size_over_the_limit_is_refused_before_decoding(monkeypatch):
    ds = dio.read_dataset(pydicom_file("MR_small_RLE.dcm"))  # 64 x 64, 16 bits: 8,192 bytes
    assert dio.decoded_bytes(ds, frames=1) == 64 * 64 * 2
    decoder = pydicom.pixels.get_decoder(ds.file_meta.TransferSyntaxUID)
    monkeypatch.setattr(type(decoder), "as_array", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(DicomReadError) as err:
        dio.decode_pixels(ds, max_decoded_bytes=64 * 64 * 2 - 1)
    assert err.value.reason is R.TOO_LARGE
    assert "declares 8192 bytes of decoded values" in str(err.value)
    # a header that claims 65535 x 65535 over a few kB of compressed data: the default ceiling
    ds.Rows = ds.Columns = 65535
    with pytest.raises(DicomReadError) as err:
        dio.decode_pixels(ds)
    assert err.value.reason is R.TOO_LARGE and "Rows 65535 x Columns 65535" in str(err.value)


def test_a_deflate_bomb_is_refused_before_it_is_inflated():
    import time
    import tracemalloc

    from conftest import deflate_bomb

    bomb = deflate_bomb(dio.MAX_INFLATED_BYTES * 2)  # 1 GiB from ~1 MB
    assert len(bomb) < 2 << 20
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(DicomReadError) as err:
            dio.read_dataset(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.reason is R.TOO_LARGE
    assert f"inflates to more than {dio.MAX_INFLATED_BYTES} bytes" in str(err.value)
    assert peak < 16 << 20, peak  # pieces of 1 MiB, never the whole
    assert time.monotonic() - started < 10
    # a deflated file under the limit still reads (pydicom's own deflated file too)
    small = dio.read_dataset(deflate_bomb(4 << 20))
    assert small.Rows == 128
    assert dio.read_dataset(pydicom_file("image_dfl.dcm")).file_meta.TransferSyntaxUID.is_deflated


@pytest.mark.parametrize("vr", [b"UA", b"SL"])  # an unknown VR; a length that does not fit SL
def test_a_corrupt_sop_class_in_a_file_without_pixels_is_still_no_pixel_data(vr):
    """Found by the fuzzer: the no_pixel_data message parsed SOP Class UID, and its corrupt value
    raised pydicom's own exception out of read_dataset (parse_all=False, as ingest reads)."""
    ds = _native()
    del ds.PixelData
    fp = io.BytesIO()
    ds.save_as(fp, enforce_file_format=True)
    data = fp.getvalue().replace(b"\x08\x00\x16\x00UI", b"\x08\x00\x16\x00" + vr, 1)
    with pytest.raises(DicomReadError) as err:
        dio.read_dataset(data, parse_all=False)
    assert err.value.reason is R.NO_PIXEL_DATA and str(err.value).endswith("SOP class unreadable")


def test_a_stray_sequence_delimiter_at_the_end_is_a_corrupt_header():
    """Found by the fuzzer: pydicom raised NotImplementedError (VR 'NONE') from the truncation
    check when a file's last element was a sequence delimiter outside any sequence."""
    data = pydicom_file("rtplan.dcm").read_bytes() + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    with pytest.raises(DicomReadError) as err:
        dio.read_dataset(data, parse_all=False, require_pixels=False)
    assert err.value.reason is R.DECODE_ERROR
    assert "Unknown Value Representation 'NONE' in tag (FFFE,E0DD)" in str(err.value)
