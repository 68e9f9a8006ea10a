"""Shared fixtures: the repository root, params, free ports, pydicom's own test files."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# TensorFlow's C++ logging is noise in test output
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# the test harness's Prefect server: no telemetry (it also logs "database is locked" noise)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def params():
    from medops.config import load_params

    return load_params(REPO_ROOT / "params.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A callable returning a free TCP port on 127.0.0.1 (never the demo's fixed ports)."""
    return _free_port


@pytest.fixture
def deid_key(monkeypatch) -> bytes:
    """A test key for de-identification, given through the environment as users would."""
    key = "medops-test-key-not-a-secret"
    monkeypatch.setenv("MEDOPS_DEID_KEY", key)
    return key.encode()


def pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available in this pydicom install")
    return Path(path)


@pytest.fixture(scope="session")
def pydicom_ct_bytes() -> bytes:
    """The bytes of pydicom's CT_small.dcm, a real DICOM file."""
    return pydicom_file("CT_small.dcm").read_bytes()


FUZZ_DATA = REPO_ROOT / "tests" / "data" / "fuzz"


def fuzz_file(name: str) -> Path:
    """A file the fuzzer found (tests/data/fuzz/README.md says what each one is)."""
    return FUZZ_DATA / name


def deflate_bomb(inflated: int) -> bytes:
    """A Deflated Explicit VR Little Endian file (PS3.5 A.5) whose data set inflates to about
    ``inflated`` bytes (pydicom's CT_small.dcm's data set, then an OB element of zeros) from
    about ``inflated / 1000`` bytes: one compressed MiB of zeros repeated (a full flush makes
    every repetition the same bytes)."""
    import struct
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom_file_dataset("CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta, body = DicomBytesIO(), DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    body.is_little_endian, body.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    write_dataset(body, ds)
    zeros = max(inflated - len(body.getvalue()), 0)
    mib = 1 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = c.compress(body.getvalue() + struct.pack("<HH2sHL", 0x7FE1, 0x1010, b"OB", 0, zeros))
    stream += c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(b"\x00" * mib) + c.flush(zlib.Z_FULL_FLUSH)
    stream += block * (zeros // mib) + c.compress(b"\x00" * (zeros % mib)) + c.flush()
    return b"\x00" * 128 + b"DICM" + meta.getvalue() + stream


def pydicom_file_dataset(name: str):
    import pydicom

    return pydicom.dcmread(pydicom_file(name))


# pydicom test files, one per transfer syntax (and colour ones for the compressed syntaxes that have
# them): the serving fast paths are checked on each (test_serving_exactness, test_triton_fast_paths)
SYNTAX_FILES = {
    "explicit_le": "CT_small.dcm",
    "implicit_le": "MR_small_implicit.dcm",
    "explicit_be": "MR_small_bigendian.dcm",
    "deflate": "image_dfl.dcm",
    "rle": "MR_small_RLE.dcm",
    "rle_rgb": "SC_rgb_rle.dcm",
    "jpeg_baseline": "SC_rgb_dcmtk_+eb+cy+n1.dcm",
    "jpeg_extended": "JPGExtended.dcm",
    "jpeg_lossless": "SC_rgb_jpeg_gdcm.dcm",
    "jpeg_ls_lossless": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg_ls_near_lossless": "JPEGLSNearLossless_08.dcm",
    "jpeg2000_lossless": "MR_small_jp2klossless.dcm",
    "jpeg2000": "693_J2KI.dcm",
}


def training_image(path, spec) -> "np.ndarray":
    """What ingest prepares from the file (medops.stages.ingest: read_dataset, prepare_image)."""
    from medops.dicom.io import read_dataset
    from medops.dicom.pixels import prepare_image

    return prepare_image(read_dataset(path.read_bytes(), parse_all=False), spec)
