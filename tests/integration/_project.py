"""A fresh copy of this project (what a clone holds) in a temporary git repository, for tests that
run medops as a user would on a project of their own."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("tests/", "benchmarks/", "data/", "models/", "reports/", ".medops/", "dvc-remote/")


def clone_project(dest: Path, params: dict[str, Any] | None = None) -> Path:
    """Copy the git-tracked files (and those about to be), nothing generated; apply ``params``
    (sections of params.yaml) and commit, so DVC has its git repository."""
    from medops.config import update_params_file

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in listed:
        src = REPO / rel
        if src.is_file() and not rel.startswith(GENERATED) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    if params:
        update_params_file(dest / "params.yaml", params)
    git = ["git", "-c", "user.name=medops-test", "-c", "user.email=test@medops.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "clone"], cwd=dest, check=True)
    return dest
