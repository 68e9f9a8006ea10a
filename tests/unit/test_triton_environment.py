"""Which environment the embedded Triton runs from (medops.serving.server.triton_env): the folder
beside medops' own named ``<env>-triton`` or ``$MEDOPS_TRITON_ENV``; never one with NumPy 2 (the
stub of tritonserver 2.51 answers with empty outputs there), never a folder without
nvidia-pytriton, each refusal saying how to make one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from medops.errors import ServingError
from medops.serving.server import TRITON_ENV_VAR, default_triton_env, triton_env


def fake_env(root: Path, numpy_version: str) -> Path:
    """An environment whose python answers the probe as one with nvidia-pytriton would."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    answer = {"prefix": str(root), "libdir": str(root / "lib"), "python_version": "3.11",
              "numpy_version": numpy_version, "pytriton_dir": str(root / "tritonserver"),
              "pytriton_version": "0.7.0"}
    python = bin_dir / "python"
    python.write_text(f"#!/bin/sh\necho '{json.dumps(answer)}'\n")
    python.chmod(0o755)
    return root


def test_the_default_is_beside_medops_environment(monkeypatch):
    monkeypatch.delenv(TRITON_ENV_VAR, raising=False)
    assert default_triton_env() == Path(sys.prefix).with_name(Path(sys.prefix).name + "-triton")
    monkeypatch.setenv(TRITON_ENV_VAR, "/somewhere/else")
    assert default_triton_env() == Path("/somewhere/else")


def test_an_environment_with_numpy_1_is_used(tmp_path, monkeypatch):
    env = fake_env(tmp_path / "env1", "1.26.4")
    monkeypatch.setenv(TRITON_ENV_VAR, str(env))
    found = triton_env()
    assert (found.prefix, found.numpy_version, found.python_version) == (str(env), "1.26.4", "3.11")


def test_an_environment_with_numpy_2_is_refused(tmp_path, monkeypatch):
    env = fake_env(tmp_path / "env2", "2.4.6")
    monkeypatch.setenv(TRITON_ENV_VAR, str(env))
    with pytest.raises(ServingError, match=r"NumPy 2\.4\.6: the Python-backend stub .* empty outputs"):
        triton_env()


def test_a_missing_environment_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv(TRITON_ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(ServingError, match=r"no environment at .*nowhere.*`make setup`.*"
                                           r"requirements-triton\.lock.*MEDOPS_TRITON_ENV"):
        triton_env()


def test_medops_own_environment_is_not_one(monkeypatch):
    """medops' own environment has no nvidia-pytriton (it requires numpy<2): refused, by name."""
    monkeypatch.setenv(TRITON_ENV_VAR, sys.prefix)
    with pytest.raises(ServingError, match=r"has no nvidia-pytriton or numpy: .*pytriton"):
        triton_env(Path(sys.prefix))
