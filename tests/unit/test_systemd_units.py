"""deploy/systemd/: one unit per service medops supervises, running the same foreground command
as supervisord, restarted always; checked by systemd's own `systemd-analyze verify` where it is
installed (any warning fails), and parsed here either way."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medops.ops.supervise import SERVICES

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
INSTALL = "/opt/medops"


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_each_supervised_service_has_a_unit_that_runs_it_like_supervisord():
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(
        f"medops-{name}.service" for name in SERVICES)
    target = read_unit(UNITS / "medops.target")
    assert sorted(target["Unit"]["Wants"].split()) == sorted(f"medops-{n}.service" for n in SERVICES)
    for name in SERVICES:
        unit = read_unit(UNITS / f"medops-{name}.service")
        service = unit["Service"]
        assert shlex.split(service["ExecStart"]) == [
            f"{INSTALL}/.venv/bin/python", "-m", "medops.ops.supervise", name, "--project", INSTALL]
        assert service["Restart"] == "always" and float(service["RestartSec"]) <= 5
        assert service["WorkingDirectory"] == INSTALL
        assert unit["Unit"]["PartOf"] == "medops.target"
        # Triton ends its stubs itself on SIGTERM (as supervisord's stopasgroup=false)
        assert service["KillMode"] == ("mixed" if name == "triton" else "control-group")
        if name in ("deployments", "watcher"):
            assert "medops-prefect.service" in unit["Unit"]["After"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (the units are still parsed above)")
def test_systemd_analyze_verifies_the_units(tmp_path):
    # systemd checks that ExecStart exists: point the units at this checkout and interpreter
    for unit in [*UNITS.glob("*.service"), *UNITS.glob("*.target")]:
        text = unit.read_text().replace(f"{INSTALL}/.venv/bin/python", sys.executable)
        (tmp_path / unit.name).write_text(text.replace(INSTALL, str(tmp_path)))
    files = sorted(str(p) for p in tmp_path.iterdir())
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *files],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"systemd-analyze warned:\n{proc.stderr}"
