"""A dvc.lock cut short by a kill inside DVC's own write (issue 14, item 3).

DVC rewrites dvc.lock in place after each stage (open "w+", then write). A process killed in
that window leaves a cut file, and every later `dvc repro` stops at "dvc.lock validation failed".
Here a real `dvc repro` is killed with SIGKILL half-way through that write (DVC's writer is
wrapped to write part of the text, as the kernel would have it when the process dies, then kill
the process), and the next run through medops puts back the copy the last stage took as it
started: the stages before it are not run again (the killed one comes back from DVC's run cache
when it had finished).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medops.ops import dvc

pytestmark = pytest.mark.dvc

# each stage: the copy a medops stage takes as it starts, one line in runs.log, its output
STAGE = ('{python} -c "from medops.ops.dvc import checkpoint_lockfile; checkpoint_lockfile(\'.\'); '
         'open(\'runs.log\', \'a\').write(\'{name}\\\\n\'); open(\'{name}.txt\', \'w\').write(\'{name}\')"')

# `dvc repro` whose N-th write of dvc.lock stops after the text up to the last "size:" (a value
# cut off: DVC's schema refuses it) and dies there with SIGKILL
DRIVER = """
import io, os, signal, sys
import dvc.utils.serialize._common as common

original, writes = common._dump_data, [0]

def dump(path, data, dumper, fs=None, **kwargs):
    if os.path.basename(str(path)) == "dvc.lock":
        writes[0] += 1
        if writes[0] == int(os.environ["CUT_AT_WRITE"]):
            text = io.StringIO()
            dumper(data, text, **kwargs)
            text = text.getvalue()
            with open(path, "w+", encoding="utf-8") as f:  # as DVC opens it
                f.write(text[: text.rindex("size:") + len("size:")])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return original(path, data, dumper, fs=fs, **kwargs)

common._dump_data = dump
from dvc.cli import main
sys.exit(main(["repro"]))
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc.init(root)
    stages = {}
    for name, dep in (("a", None), ("b", "a.txt"), ("c", "b.txt")):
        stages[name] = {"cmd": STAGE.format(python=sys.executable, name=name),
                        "outs": [f"{name}.txt"], **({"deps": [dep]} if dep else {})}
    (root / "dvc.yaml").write_text(json.dumps({"stages": stages}, indent=1))
    return root


def _dvc(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True,
                          env={**dvc.dvc_env(root), **(env or {})}, timeout=300)


def _runs(root: Path) -> list[str]:
    return (root / "runs.log").read_text().split()


def test_a_repro_killed_while_dvc_writes_its_lock_file_resumes_after_the_last_whole_stage(
        repo: Path) -> None:
    # killed in the write that follows stage b (the first write records a)
    killed = _dvc(repo, "-c", DRIVER, env={"CUT_AT_WRITE": "2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _runs(repo) == ["a", "b"]
    cut = (repo / "dvc.lock").read_bytes()
    assert dvc.lockfile_problem(cut) is not None
    # what a user meets without medops: DVC itself refuses to run again
    blocked = _dvc(repo, "-m", "dvc", "repro")
    assert blocked.returncode != 0 and "dvc.lock" in blocked.stderr + blocked.stdout
    assert _runs(repo) == ["a", "b"]

    out = dvc.repro(repo)
    # a is not run again; b, whose record was cut, comes back from DVC's run cache (it finished
    # and DVC had saved its outputs before the lock write); c runs
    assert _runs(repo) == ["a", "b", "c"], out
    assert "Running stage 'a'" not in out and "Stage 'b' is cached" in out, out
    assert dvc.status(repo) == {}
    assert dvc.lockfile_problem((repo / "dvc.lock").read_bytes()) is None
    kept = list((repo / dvc.LAST_GOOD_LOCK.parent).glob("dvc.lock.cut-*"))
    assert [p.read_bytes() for p in kept] == [cut]  # the cut file is kept, not lost
    assert dvc.recover_lockfile(repo) is None  # whole now: nothing to do


def test_without_a_copy_the_cut_lock_is_moved_aside_and_the_stages_run_again(repo: Path) -> None:
    dvc.repro(repo)
    assert _runs(repo) == ["a", "b", "c"]
    (repo / dvc.LAST_GOOD_LOCK).unlink()
    text = (repo / "dvc.lock").read_text()
    (repo / "dvc.lock").write_text(text[: text.index("outs:")] + "outs:\n  - path")
    done = dvc.recover_lockfile(repo)
    assert done is not None and done["restored_from"] is None
    assert not (repo / "dvc.lock").exists() and (repo / done["cut_file"]).is_file()
    out = dvc.repro(repo)  # no lock: DVC vouches for no output; a, with no dependencies, runs
    assert _runs(repo) == ["a", "b", "c", "a"], out  # b and c: from DVC's run cache
    assert "Stage 'b' is cached" in out and "Stage 'c' is cached" in out, out
    assert dvc.status(repo) == {}


def test_medops_recover_reports_what_it_put_back(repo: Path, repo_root: Path, capsys) -> None:
    from medops.cli import main

    shutil.copy(repo_root / "params.yaml", repo / "params.yaml")
    dvc.repro(repo)
    good = (repo / "dvc.lock").read_bytes()
    assert main(["--project", str(repo), "recover", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"recovered": False}
    (repo / "dvc.lock").write_bytes(good[: good.rindex(b"size:") + 5])
    assert main(["--project", str(repo), "recover", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recovered"] and report["restored_from"] == str(dvc.LAST_GOOD_LOCK)
    assert "size" in report["problem"]
    # the copy the last stage (c) took as it started: a and b, which dvc repro then trusts
    assert (repo / "dvc.lock").read_bytes() == (repo / dvc.LAST_GOOD_LOCK).read_bytes()
    assert "  c:" not in (repo / "dvc.lock").read_text()


def test_a_lock_file_dvc_cannot_read_is_never_taken_as_the_copy(repo: Path) -> None:
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages:\n  a:\n    cmd: x\n    outs:\n    - path")
    assert not dvc.checkpoint_lockfile(repo)
    assert not (repo / dvc.LAST_GOOD_LOCK).exists()
    (repo / "dvc.lock").unlink()
    assert not dvc.checkpoint_lockfile(repo)


def test_every_stage_takes_the_copy_as_it_starts(tmp_path: Path, repo_root: Path,
                                                 monkeypatch) -> None:
    from medops import pipeline
    from medops.config import load_params
    from medops.paths import ProjectPaths

    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    lock = "schema: '2.0'\nstages:\n  a:\n    cmd: x\n"
    (tmp_path / "dvc.lock").write_text(lock)
    seen = []
    probe = pipeline.Stage("probe", "medops.pipeline", (), lambda params, paths: seen.append(
        (paths.root / dvc.LAST_GOOD_LOCK).read_text()) or {"ok": True})
    monkeypatch.setitem(pipeline.STAGES, "probe", probe)
    paths = ProjectPaths(tmp_path)
    assert pipeline.run_stage("probe", load_params(tmp_path / "params.yaml"), paths) == {"ok": True}
    assert seen == [lock]
    assert os.path.isfile(paths.stage_result("probe"))
