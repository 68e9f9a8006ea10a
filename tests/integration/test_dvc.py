"""medops.ops.dvc against the real dvc command in a temporary git + DVC repository."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medops.ops import dvc
from medops.errors import DvcError

pytestmark = pytest.mark.dvc


def _git_init(root: Path) -> None:
    subprocess.run(["git", "init", "-q", str(root)], check=True)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    _git_init(root)
    dvc.init(root)
    dvc.ensure_remote(root, "local", "dvc-remote")
    raw = root / "data" / "raw"
    (raw / "dicom").mkdir(parents=True)
    (raw / "dicom" / "a.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"first")
    (raw / "labels.csv").write_text("sop_instance_uid,label\n1.2.3,0\n")
    return root


def test_init_needs_git_and_is_idempotent(tmp_path: Path) -> None:
    with pytest.raises(DvcError, match="not a git repository"):
        dvc.init(tmp_path)
    _git_init(tmp_path)
    dvc.init(tmp_path)
    config = (tmp_path / ".dvc" / "config").read_text()
    dvc.init(tmp_path)  # second call: no error, nothing changed
    assert (tmp_path / ".dvc" / "config").read_text() == config


def test_remote_is_default_and_relative_to_the_project(project: Path) -> None:
    config = (project / ".dvc" / "config").read_text()
    assert "remote = local" in config
    assert "url = ../dvc-remote" in config  # stored relative to .dvc/, i.e. <project>/dvc-remote
    dvc.ensure_remote(project, "local", "elsewhere")  # overwriting is allowed
    assert "url = ../elsewhere" in (project / ".dvc" / "config").read_text()


def test_data_version_is_the_content_hash(project: Path) -> None:
    version = dvc.add(project, project / "data" / "raw")
    assert version.endswith(".dir") and len(version) == 32 + 4
    assert version == dvc.data_version(project, "data/raw")
    # the version is the md5 of the folder listing DVC stored in its cache: a real content hash
    listing = project / ".dvc" / "cache" / "files" / "md5" / version[:2] / version[2:]
    assert hashlib.md5(listing.read_bytes()).hexdigest() == version[:-4]

    # same content -> same version; different content -> different version
    assert dvc.add(project, "data/raw") == version
    (project / "data" / "raw" / "labels.csv").write_text("sop_instance_uid,label\n1.2.3,1\n")
    changed = dvc.add(project, "data/raw")
    assert changed != version and changed.endswith(".dir")


def test_status_and_push(project: Path) -> None:
    dvc.add(project, "data/raw")
    assert dvc.status(project) == {}
    assert dvc.status(project, cloud=True)  # nothing pushed yet: the remote lacks the data

    dvc.push(project)
    remote_files = [p for p in (project / "dvc-remote").rglob("*") if p.is_file()]
    assert len(remote_files) == 3  # two files and the folder listing
    assert dvc.status(project, cloud=True) == {}

    (project / "data" / "raw" / "dicom" / "b.dcm").write_bytes(b"second")
    assert dvc.status(project) == {"data/raw.dvc": [{"changed outs": {"data/raw": "modified"}}]}


def test_pull_restores_data_from_the_remote(project: Path) -> None:
    version = dvc.add(project, "data/raw")
    dvc.push(project)
    original = (project / "data" / "raw" / "labels.csv").read_text()
    shutil.rmtree(project / "data" / "raw")
    shutil.rmtree(project / ".dvc" / "cache")
    dvc.pull(project, ["data/raw"])
    assert (project / "data" / "raw" / "labels.csv").read_text() == original
    assert dvc.data_version(project, "data/raw") == version


def test_untracked_path_is_a_clear_error(project: Path) -> None:
    with pytest.raises(DvcError, match="data/raw is not tracked by DVC"):
        dvc.data_version(project, project / "data" / "raw")


def test_failed_command_carries_dvc_stderr(project: Path) -> None:
    with pytest.raises(DvcError) as err:
        dvc.repro(project, "no_such_stage", single_item=True)
    message = str(err.value)
    assert "`dvc repro --single-item no_such_stage` failed" in message
    assert message.splitlines()[-1] == "ERROR: 'dvc.yaml' does not exist"  # dvc's own stderr


def test_repro_runs_stages_with_this_interpreter_first_on_path(project: Path) -> None:
    (project / "dvc.yaml").write_text(
        "stages:\n"
        "  first:\n"
        "    cmd: python -c \"import sys; open('first.txt', 'w').write(sys.prefix)\"\n"
        "    outs: [first.txt]\n"
        "  second:\n"
        "    cmd: python -c \"open('second.txt', 'w').write(open('first.txt').read().upper())\"\n"
        "    deps: [first.txt]\n"
        "    outs: [second.txt]\n"
    )
    with pytest.raises(DvcError):  # --single-item does not build the missing upstream output
        dvc.repro(project, "second", single_item=True)
    dvc.repro(project, "first", single_item=True)
    assert (project / "first.txt").read_text() == sys.prefix
    assert not (project / "second.txt").exists()
    dvc.repro(project, "second", single_item=True)
    assert (project / "second.txt").read_text() == sys.prefix.upper()
    assert dvc.status(project) == {}
    assert dvc.data_version(project, "second.txt") == hashlib.md5(sys.prefix.upper().encode()).hexdigest()

    out = dvc.repro(project)  # nothing changed: nothing runs
    assert "didn't change" in out or "up to date" in out


def test_version_dataset_adds_and_pushes(project: Path) -> None:
    version = dvc.version_dataset(project, project / "data" / "raw")
    assert version == dvc.data_version(project, "data/raw")
    assert dvc.status(project, cloud=True) == {}
    assert dvc.version_dataset(project, "data/raw", push=False) == version


def test_medops_version_data_json(project: Path, repo_root: Path, capsys) -> None:
    import json

    from medops.cli import main

    shutil.copy(repo_root / "params.yaml", project / "params.yaml")
    shutil.copytree(project / "data" / "raw", project / "data" / "ingested")  # a dataset to version
    assert main(["--project", str(project), "version-data", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # one object; dvc's own output stays off stdout
    assert out == {"path": "data/ingested", "data_version": dvc.data_version(project, "data/ingested"),
                   "pushed": True}
    assert dvc.status(project, cloud=True) == {}


def test_repro_runs_stage_commands_on_the_reproduced_project(project: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDOPS_ROOT", "/somewhere/else")
    (project / "dvc.yaml").write_text(
        "stages:\n"
        "  where:\n"
        "    cmd: python -c \"import os; open('root.txt', 'w').write(os.environ['MEDOPS_ROOT'])\"\n"
        "    outs: [root.txt]\n"
    )
    dvc.repro(project, "where", single_item=True)
    assert (project / "root.txt").read_text() == str(project.resolve())


def test_repro_hands_over_each_line_while_the_stage_runs(project: Path) -> None:
    import time

    # prints (no flush: the stage's Python must run unbuffered), sleeps, prints, writes its output
    (project / "dvc.yaml").write_text(
        "stages:\n"
        "  slow:\n"
        "    cmd: python -c \"import sys, time; print('first line'); time.sleep(2); "
        "print('to stderr', file=sys.stderr); open('slow.txt', 'w').write('done')\"\n"
        "    outs: [slow.txt]\n"
    )
    seen: list[tuple[float, str]] = []
    out = dvc.repro(project, "slow", single_item=True, on_line=lambda line: seen.append((time.monotonic(), line)))

    when = {line: t for t, line in seen}
    assert "first line" in when and "to stderr" in when
    assert when["to stderr"] - when["first line"] >= 1.5  # the first line came before the sleep
    assert "Running stage 'slow'" in " ".join(line for _, line in seen)
    assert "first line" in out  # still captured, for summaries and errors


def test_a_failed_streamed_repro_still_carries_the_stage_error(project: Path) -> None:
    (project / "dvc.yaml").write_text(
        "stages:\n"
        "  broken:\n"
        "    cmd: python -c \"import sys; sys.exit('the stage says why')\"\n"
        "    outs: [never.txt]\n"
    )
    lines: list[str] = []
    with pytest.raises(DvcError, match="the stage says why"):
        dvc.repro(project, "broken", single_item=True, on_line=lines.append)
    assert "the stage says why" in lines


def test_a_streamed_repro_past_its_timeout_is_stopped(project: Path) -> None:
    (project / "dvc.yaml").write_text(
        "stages:\n"
        "  forever:\n"
        "    cmd: python -c \"import time; print('started', flush=True); time.sleep(60)\"\n"
        "    outs: [never.txt]\n"
    )
    with pytest.raises(DvcError, match="ran past 3"):
        dvc.run_dvc(project, "repro", "--single-item", "forever", timeout=3, on_line=lambda line: None)
