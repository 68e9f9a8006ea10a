"""medops.atomic: a file killed half-way through its write is never seen under its name.

The kills here are real SIGKILLs of a child process: once from outside (when the child says it is
half-way through a large write) and once through the named crash point (MEDOPS_CRASH_AT).
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medops.atomic import CRASH_ENV, CRASH_POINTS, atomic_path, atomic_write, crash_point, write_text

REPO = Path(__file__).resolve().parents[2]

# writes 64 MiB in 1 MiB blocks, saying "half" after 8 of them, then waits to be killed
SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from medops.atomic import atomic_write
    with atomic_write(sys.argv[1], "wb") as fh:
        for i in range(64):
            fh.write(bytes([i % 251]) * (1 << 20))
            if i == 8:
                fh.flush()
                print("half", flush=True)
                time.sleep(60)
""")


def _child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def test_a_write_killed_from_outside_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the previous model")
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], env=_child_env(),
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "half"
        temps = [p for p in tmp_path.iterdir() if p.name != "model.onnx"]
        assert len(temps) == 1 and temps[0].name.startswith(".model.tmp-")  # hidden, same suffix
        assert temps[0].suffix == ".onnx" and temps[0].stat().st_size >= 9 << 20
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"the previous model"  # never the 9 MiB written so far
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["model.onnx"]

    write_text(target, "the next model")  # the next write is not disturbed by the leftover
    assert target.read_text() == "the next model"


def test_the_crash_point_kills_only_where_it_is_named(tmp_path: Path) -> None:
    script = ("import sys; from medops.atomic import crash_point, write_text\n"
              "crash_point('a.first'); write_text(sys.argv[1], 'one')\n"
              "crash_point('b.second'); write_text(sys.argv[1], 'two')\n")
    out = tmp_path / "out.txt"
    run = lambda **env: subprocess.run([sys.executable, "-c", script, str(out)],  # noqa: E731
                                       env=_child_env(**env), timeout=60)
    assert run(**{CRASH_ENV: "x,b.second"}).returncode == -signal.SIGKILL
    assert out.read_text() == "one"
    assert run(**{CRASH_ENV: "a.first"}).returncode == -signal.SIGKILL
    assert out.read_text() == "one"
    env = _child_env()
    env.pop(CRASH_ENV, None)
    assert subprocess.run([sys.executable, "-c", script, str(out)], env=env, timeout=60).returncode == 0
    assert out.read_text() == "two"


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "plots" / "roc.csv"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    assert target.read_text() == "old\n"
    assert [p.name for p in target.parent.iterdir()] == ["roc.csv"]
    with pytest.raises(ValueError, match="whole files"), atomic_write(target, "a"):
        pass


def test_written_files_get_the_mode_open_would_give(tmp_path: Path) -> None:
    old = os.umask(0o027)
    os.umask(old)
    target = write_text(tmp_path / "metrics.json", "{}\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~old


def test_crash_points_are_listed_and_each_listed_one_is_placed() -> None:
    called: dict[str, list[str]] = {}
    for path in [*(REPO / "medops").rglob("*.py"), *(REPO / "flows").rglob("*.py")]:
        for name in re.findall(r"crash_point\(\"([a-z_.]+)\"\)", path.read_text()):
            called.setdefault(name, []).append(str(path.relative_to(REPO)))
    # medops.pipeline.run_stage has one for every stage, by its name
    assert 'crash_point(f"{name}.done")' in (REPO / "medops" / "pipeline.py").read_text()
    from medops.pipeline import STAGES

    called.update({f"{stage}.done": ["medops/pipeline.py"] for stage in STAGES})
    assert set(called) == set(CRASH_POINTS), "CRASH_POINTS must list exactly the points placed"
    assert all(len(places) == 1 for places in called.values()), called
    crash_point("no.such.point")  # unset or unnamed: nothing happens


def test_a_deploy_killed_half_way_leaves_folders_the_next_one_discards(tmp_path: Path) -> None:
    from medops.serving.repository import VERSION_INFO, discard_unfinished, list_versions

    repo, name = tmp_path / "repo", "clf"
    model = repo / name
    for version in (1, 2, 3, 4):
        (model / str(version)).mkdir(parents=True)
        (model / str(version) / "model.onnx").write_bytes(b"onnx")
    (model / "1" / VERSION_INFO).write_text("{}")   # deployed, then replaced
    (model / "3" / VERSION_INFO).write_text("{}")   # deployed and served
    (model / ".5.partial").mkdir()                  # killed while copying
    (model / "config.pbtxt").write_text('name: "clf"\nversion_policy: { specific: { versions: [ 3 ] } }\n')
    # 4: newer than every finished or served version, no record: left by a killed deploy
    assert discard_unfinished(repo, name) == [".5.partial", "4"]
    assert list_versions(repo, name) == [1, 2, 3]   # 2, older and unrecorded, is not guessed at
    (model / "4").mkdir()                           # killed while switching: config serves both
    (model / "config.pbtxt").write_text('name: "clf"\nversion_policy: { specific: { versions: [ 3, 4 ] } }\n')
    assert discard_unfinished(repo, name) == [] and list_versions(repo, name) == [1, 2, 3, 4]
    (model / "config.pbtxt").write_text('name: "clf"\nversion_policy: { latest: { num_versions: 1 } }\n')
    (model / "9").mkdir()
    assert discard_unfinished(repo, name) == []     # a hand-written policy: nothing is touched
