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
