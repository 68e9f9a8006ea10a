"""The stage registry, dvc.yaml and the CLI name the same stages, params and code."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from medops.cli import build_parser
from medops.config import Params
from medops.pipeline import STAGES


@pytest.fixture(scope="module")
def dvc_stages(repo_root):
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]


def test_every_registered_stage_is_a_dvc_stage_and_back(dvc_stages):
    assert set(dvc_stages) == set(STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_stage_runs_the_registered_stage(name, dvc_stages):
    stage = dvc_stages[name]
    assert stage["cmd"] == f"medops stage {name}"
    # only the sections the stage reads, so an unrelated change does not rerun it
    assert sorted(stage["params"]) == sorted(STAGES[name].sections)
    module_file = STAGES[name].module.replace(".", "/") + ".py"
    assert module_file in stage["deps"], f"{name}: dvc.yaml deps lack {module_file}"


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_sections_exist_in_params(name):
    for section in STAGES[name].sections:
        assert section in Params.model_fields


def test_deploy_is_not_a_dvc_stage(dvc_stages):
    # deploy changes a running server: it belongs to the CLI and the flow, not `dvc repro`
    assert "deploy" not in dvc_stages


def test_cli_stage_rejects_unknown_stage(capsys):
    from medops.cli import main

    with pytest.raises(KeyError, match="unknown stage 'nope'"):
        main(["stage", "nope"])


def test_cli_has_the_documented_commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("synth", "ingest", "stage", "serve", "deploy", "predict", "up", "down", "demo"):
        assert name in sub.choices


def test_light_imports_do_not_pull_tensorflow(repo_root):
    # Triton's Python-backend stub and `medops predict` import these; TensorFlow must stay out
    code = (
        "import sys; import medops.config, medops.dicom.pixels, medops.client, "
        "medops.serving.contract, medops.cli, medops.pipeline; "
        "bad = [m for m in ('tensorflow', 'keras', 'prefect') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
