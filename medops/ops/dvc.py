"""Thin adapter over the ``dvc`` command: data versioning and stage reproduction for the flows.

Every call runs ``<this python> -m dvc ...`` in the project root, with this interpreter's bin folder
first on PATH, so that the ``medops stage NAME`` commands in dvc.yaml resolve to the same
installation that called DVC. DVC's own Python API is not used: the command line is DVC's stable
interface, and a subprocess keeps DVC's global state (repo locks, logging) out of a long-running
Prefect worker. A failed command raises DvcError with the tail of dvc's stderr. ``dvc repro`` can
hand its output over line by line while it runs (``on_line``), for a flow to log as it comes.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import yaml

from medops.errors import DvcError

STDERR_TAIL_LINES = 20


def dvc_env(root: Path | str | None = None) -> dict[str, str]:
    """The environment dvc runs in: this interpreter's bin folder first on PATH, no analytics.

    With ``root``, MEDOPS_ROOT points at it, so ``medops stage NAME`` run by ``dvc repro`` works on
    the project being reproduced even if the caller's MEDOPS_ROOT names another one.
    """
    env = dict(os.environ)
    if root is not None:
        env["MEDOPS_ROOT"] = str(Path(root).resolve())
    bin_dir = str(Path(sys.executable).parent)  # not resolved: keep the virtualenv's bin, not the base python's
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    # stage commands may import TensorFlow; its C++ info lines would bury the stage's own error
    # in the stderr tail that DvcError carries
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_dvc(root: Path | str, *args: str, timeout: float | None = None,
            on_line: Callable[[str], None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``dvc *args`` in ``root`` and return the completed process (output captured as text).

    With ``on_line``, each line of output (stdout and stderr, without its newline) is handed to it
    as soon as the command prints it, so a long ``dvc repro`` can be followed while it runs; the
    stages' Python runs unbuffered for that. The output is captured all the same.

    Raises:
        DvcError: dvc exited non-zero (the message holds the command and dvc's stderr tail), or ran
            past ``timeout`` seconds (it is killed).
    """
    cmd = [sys.executable, "-m", "dvc", *args]
    try:
        if on_line is None:
            proc = subprocess.run(cmd, cwd=Path(root), env=dvc_env(root), capture_output=True, text=True,
                                  timeout=timeout)
        else:
            proc = _run_streaming(cmd, Path(root), on_line, timeout)
    except subprocess.TimeoutExpired as exc:
        raise DvcError(f"`dvc {' '.join(args)}` in {root} ran past {timeout} s") from exc
    if proc.returncode != 0:
        detail = _tail(proc.stderr) or _tail(proc.stdout)
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}):\n{detail}")
    return proc


def _pump(stream: IO[str], name: str, lines: queue.Queue) -> None:
    """Move ``stream``'s lines onto ``lines`` as ``(name, line)``; ``(name, None)`` at its end."""
    with stream:
        for line in stream:
            lines.put((name, line))
    lines.put((name, None))


def _run_streaming(cmd: list[str], cwd: Path, on_line: Callable[[str], None],
                   timeout: float | None) -> subprocess.CompletedProcess[str]:
    """``cmd`` with stdout and stderr read line by line as they come (one reader thread each, so
    neither pipe fills up), each line handed to ``on_line`` in this thread and kept."""
    env = {**dvc_env(cwd), "PYTHONUNBUFFERED": "1"}  # a stage's print() reaches us when it prints
    # its own process group: a timeout stops dvc *and* the stage it runs, not dvc alone
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", bufsize=1, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        threading.Thread(target=_pump, args=(stream, name, lines), daemon=True).start()
    kept: dict[str, list[str]] = {"stdout": [], "stderr": []}
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        open_streams = 2
        while open_streams:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
            try:
                name, line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                open_streams -= 1
                continue
            kept[name].append(line)
            on_line(line.rstrip("\r\n"))
        proc.wait()
    finally:
        if proc.poll() is None:  # timed out, or on_line raised: do not leave dvc running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(kept["stdout"]), "".join(kept["stderr"]))


def _is_git_repo(root: Path) -> bool:
    proc = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root,
                          capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def init(root: Path | str) -> None:
    """``dvc init`` in ``root`` unless it already has a .dvc folder. DVC needs a git repository."""
    root = Path(root)
    if (root / ".dvc").is_dir():
        return
    if not _is_git_repo(root):
        raise DvcError(f"{root} is not a git repository: run `git init` before initialising DVC")
    run_dvc(root, "init", "--quiet")


def ensure_remote(root: Path | str, name: str, url: str, default: bool = True) -> None:
    """Add or overwrite remote ``name`` in the project config (.dvc/config).

    A relative local ``url`` is relative to ``root`` (DVC stores it relative to .dvc/).
    """
    args = ["remote", "add", "--force"]
    if default:
        args.append("--default")
    run_dvc(root, *args, name, url)


def configure_remote(root: Path | str, name: str, **options: str) -> None:
    """``dvc remote modify name KEY VALUE`` for each option (project config, .dvc/config): e.g.
    ``endpointurl`` for an S3-compatible store (MinIO, Ceph, moto). Credentials belong in the
    environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or ``--local`` config, never here."""
    for key, value in options.items():
        run_dvc(root, "remote", "modify", name, key, value)


def _relative(root: Path, path: Path | str) -> str:
    path = Path(path)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(root.resolve())
        except ValueError:
            raise DvcError(f"{path} is outside the DVC project at {root}") from None
    return path.as_posix()


def add(root: Path | str, path: Path | str) -> str:
    """``dvc add path`` (a file or folder inside ``root``); returns its new data version."""
    root = Path(root)
    rel = _relative(root, path)
    run_dvc(root, "add", rel)
    return data_version(root, rel)


def push(root: Path | str, targets: Sequence[str | Path] | None = None, remote: str | None = None) -> str:
    """``dvc push [targets]`` to the default remote (or ``remote``); returns dvc's summary line."""
    root = Path(root)
    args = ["push", *(["--remote", remote] if remote else []), *(_relative(root, t) for t in targets or ())]
    return _tail(run_dvc(root, *args).stdout, 1)


_push = push  # for version_dataset, whose ``push`` flag (a public keyword) shadows the function


def version_dataset(root: Path | str, path: Path | str, push: bool = True) -> str:
    """Track ``path`` with DVC (``dvc add``) and, with ``push``, send it to the default remote.

    Initialises DVC first if the project lacks it. Returns the data version (see data_version).
    """
    init(root)
    version = add(root, path)
    if push:
        _push(root, [path])
    return version


def uncached_outputs(root: Path | str) -> list[str]:
    """Files that DVC leaves to git: ``.dvc`` files and the ``cache: false`` outs, metrics and plots
    of dvc.yaml (metrics, plots, the gate decision) — the ones that exist."""
    root = Path(root)
    found: list[str] = [str(p.relative_to(root)) for p in root.glob("data/*.dvc")]
    dvcfile = root / "dvc.yaml"
    stages = (yaml.safe_load(dvcfile.read_text()) or {}).get("stages", {}) if dvcfile.is_file() else {}
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []) or []:
                if isinstance(entry, dict):
                    [(path, opts)] = entry.items()
                    if (opts or {}).get("cache") is False and (root / path).exists():
                        found.append(path)
    found = sorted(set(found))
    if not found:
        return found
    # git-ignored ones (per-stage JSON results) stay out: ignoring them was a decision
    ignored = subprocess.run(["git", "check-ignore", "--", *found], cwd=root, capture_output=True,
                             text=True).stdout.split()
    return [p for p in found if p not in set(ignored)]


def exp_save(root: Path | str, name: str, message: str | None = None) -> str:
    """``dvc exp save``: record the workspace (params, metrics, dvc.lock, outputs) as an
    experiment named ``name`` on top of the current git commit, so ``dvc exp show`` compares runs.
    Untracked uncached outputs (metrics, plots, the gate decision, ``data/*.dvc``) are included."""
    root = Path(root)
    args = ["exp", "save", "--force", "-n", name, *(["-m", message] if message else [])]
    for path in uncached_outputs(root):
        args += ["-I", path]
    return _tail(run_dvc(root, *args).stdout, 1)


def pull(root: Path | str, targets: Sequence[str | Path] | None = None, remote: str | None = None) -> str:
    """``dvc pull [targets]`` from the default remote (or ``remote``); returns dvc's summary line."""
    root = Path(root)
    args = ["pull", *(["--remote", remote] if remote else []), *(_relative(root, t) for t in targets or ())]
    return _tail(run_dvc(root, *args).stdout, 1)


# DVC rewrites dvc.lock in place (truncate, then write) after each stage: a process killed in that
# window leaves a file cut short, and every later `dvc repro` stops at "dvc.lock validation
# failed". Each `medops stage` keeps a copy of the lock file DVC has just read (whole, as DVC
# checked it before starting the stage) to put back.
LOCK_FILE = "dvc.lock"
LAST_GOOD_LOCK = Path(".dvc") / "tmp" / "medops" / "dvc.lock.last-good"


def lockfile_problem(data: bytes | str) -> str | None:
    """Why ``data`` is not a dvc.lock DVC can read (DVC's own schema), or None when it is."""
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA

    try:
        parsed = yaml.safe_load(data)
        COMPILED_LOCKFILE_SCHEMA(parsed if parsed is not None else {})
    except Exception as exc:  # noqa: BLE001 - yaml's and voluptuous' errors alike
        return " ".join(str(exc).split())[:300] or type(exc).__name__
    return None


def checkpoint_lockfile(root: Path | str) -> bool:
    """Copy ``dvc.lock`` to LAST_GOOD_LOCK if DVC can read it (atomically); True when copied.
    Called as each stage starts, when DVC has written the lock of every stage before it."""
    from medops.atomic import write_bytes

    path = Path(root) / LOCK_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    if lockfile_problem(data) is not None:
        return False
    target = Path(root) / LAST_GOOD_LOCK
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(target, data)
    return True


def recover_lockfile(root: Path | str) -> dict[str, Any] | None:
    """Put back a ``dvc.lock`` that a crash cut short; None when it is absent or whole.

    The copy the last stage took (``checkpoint_lockfile``) replaces it: the stages it records
    are not run again, and DVC checks their hashes against the files before it skips one, so an
    older copy can only make it run a stage again. With no copy, the cut file is moved aside and
    DVC runs every stage whose outputs it cannot vouch for. The cut file is kept beside the copy
    (``dvc.lock.cut-<time>``) either way."""
    from medops.atomic import write_bytes

    root = Path(root)
    path = root / LOCK_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    problem = lockfile_problem(data)
    if problem is None:
        return None
    keep = root / LAST_GOOD_LOCK.parent / f"dvc.lock.cut-{time.strftime('%Y%m%dT%H%M%S')}"
    keep.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(keep, data)
    good = root / LAST_GOOD_LOCK
    restored = good.is_file() and lockfile_problem(good.read_bytes()) is None
    if restored:
        write_bytes(path, good.read_bytes())
    else:
        path.unlink()
    return {"problem": problem, "restored_from": str(LAST_GOOD_LOCK) if restored else None,
            "cut_file": str(keep.relative_to(root))}


def repro(root: Path | str, stage: str | None = None, single_item: bool = False,
          on_line: Callable[[str], None] | None = None) -> str:
    """``dvc repro [--single-item] [stage]``; returns dvc's output.

    ``single_item`` reproduces ``stage`` alone, without checking its upstream stages: the flow runs
    the stages one task at a time in order, so each task's DVC run records exactly that stage.
    ``on_line`` gets every line of output (DVC's and the stage's) while it runs (see run_dvc).
    A dvc.lock cut short by a crash is put back first (``recover_lockfile``), and said so.
    """
    recovered = recover_lockfile(root)
    if recovered is not None:
        message = (f"dvc.lock was cut short ({recovered['problem']}); "
                   + (f"put back the copy taken when the last stage started ({recovered['restored_from']})"
                      if recovered["restored_from"] else "no copy to put back: moved it aside")
                   + f"; the cut file is {recovered['cut_file']}")
        print(f"medops: {message}", file=sys.stderr)
        if on_line is not None:
            on_line(f"medops: {message}")
    args = ["repro"]
    if single_item:
        if stage is None:
            raise ValueError("single_item needs a stage name")
        args.append("--single-item")
    if stage:
        args.append(stage)
    return run_dvc(root, *args, on_line=on_line).stdout


def status(root: Path | str, cloud: bool = False) -> dict[str, Any]:
    """``dvc status --json`` (``--cloud``: against the default remote); ``{}`` when up to date.

    Keys are stage names or .dvc files; values list what changed (see ``dvc status``).
    """
    args = ["status", "--json", *(["--cloud"] if cloud else [])]
    out = run_dvc(root, *args).stdout.strip()
    # dvc prints the JSON document last; anything before it is a warning line
    start = out.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(out[start:])
    except json.JSONDecodeError as exc:
        raise DvcError(f"`dvc status --json` in {root} printed no JSON: {_tail(out)}") from exc


def data_version(root: Path | str, tracked_path: Path | str) -> str:
    """The content hash DVC recorded for ``tracked_path``, e.g. ``"3f2a...e1.dir"`` for a folder.

    Read from ``<tracked_path>.dvc`` (``dvc add``) or, failing that, from a stage output in
    dvc.lock. The hash identifies the data's exact content: training records it as the data version.

    Raises:
        DvcError: the path is tracked by neither.
    """
    root = Path(root)
    rel = Path(_relative(root, tracked_path))
    dvc_file = root / rel.parent / f"{rel.name}.dvc"
    if dvc_file.is_file():
        doc = yaml.safe_load(dvc_file.read_text()) or {}
        for out in doc.get("outs", []):
            if Path(out.get("path", "")) == Path(rel.name) and out.get("md5"):
                return str(out["md5"])
        raise DvcError(f"{dvc_file} has no md5 for {rel.name}: run `dvc add {rel.as_posix()}`")
    lock = root / "dvc.lock"
    if lock.is_file():
        doc = yaml.safe_load(lock.read_text()) or {}
        for stage in (doc.get("stages") or {}).values():
            for out in stage.get("outs", []):
                if Path(out.get("path", "")) == rel and out.get("md5"):
                    return str(out["md5"])
    raise DvcError(f"{rel.as_posix()} is not tracked by DVC in {root}: no {dvc_file.name} "
                   f"and no dvc.lock output; run `dvc add {rel.as_posix()}`")


def data_version_or_none(root: Path | str, tracked_path: Path | str) -> str | None:
    """:func:`data_version`, or None while the path is not tracked yet (before its first version)."""
    try:
        return data_version(root, tracked_path)
    except DvcError:
        return None
