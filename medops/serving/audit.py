"""Who changed what Triton serves, when, and why: an append-only log beside the model repository.

Every ``deploy`` and ``rollback`` (``medops deploy``, ``medops rollback``, the training flow's
deploy task) appends one JSON line to ``<repository>/.deploy-audit.jsonl`` when it ends, whether
it served a new version, found it already served, was refused or failed:

- ``time`` (UTC, ISO 8601), ``action`` (deploy | rollback), ``outcome`` (deployed | unchanged |
  rolled_back | refused | failed) and, when it did not succeed, ``error`` (its first line);
- ``by``: who asked (``--by``, else the OS user), ``os_user`` and ``host``: where it ran (kept
  even when ``by`` names someone else), ``pid``;
- ``reason``: why (``--reason``; the flow says which run), None when nobody said;
- what: ``model_name``, ``version`` (deployed or rolled back to), ``previous_version``,
  ``data_version``, ``sha256``, ``url``, ``protocol``; ``flavour`` (embedded | production) and
  ``verified_by`` (triton: a server checked it against the golden outputs before serving it;
  none: ``--no-verify``, written and pinned with no server's check).

The file is opened for appending only and each line is written whole under an exclusive lock, so
two writers never interleave; it lives with the repository (Triton ignores files there), so it
survives restarts of Triton and of medops. Secrets are never recorded (the admin key is no
argument of it). ``history`` reads it back (``medops serve history``).
"""

from __future__ import annotations

import fcntl
import functools
import getpass
import inspect
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from medops.errors import GateRejectedError, first_line

AUDIT_FILE = ".deploy-audit.jsonl"


def audit_log(repository: Path) -> Path:
    return Path(repository) / AUDIT_FILE


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return f"uid {os.getuid()}"


def append(repository: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append ``entry`` (with time, os_user, host and pid added) as one line; returns it."""
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "os_user": os_user(),
             "host": socket.gethostname(), "pid": os.getpid(), **entry}
    entry["by"] = entry.get("by") or entry["os_user"]
    path = audit_log(repository)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # end a line torn by a crash or a full disk: this one stays whole
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock
    return entry


def history(repository: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The recorded deploys and rollbacks, oldest first (the last ``limit`` if given); a line that
    is not JSON (a disk filled mid-write) is skipped, not fatal."""
    try:
        lines = audit_log(repository).read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries[-limit:] if limit else entries


def _what(action: str, result: Any) -> dict[str, Any]:
    data = result.model_dump(mode="json") if hasattr(result, "model_dump") else dict(result)
    if action == "rollback":
        return {"outcome": "rolled_back", "model_name": data.get("model_name"),
                "version": data.get("to_version"), "previous_version": data.get("from_version"),
                "flavour": data.get("flavour"), "verified_by": data.get("verified_by")}
    return {"outcome": "unchanged" if data.get("unchanged") else "deployed",
            **{k: data.get(k) for k in ("model_name", "version", "previous_version", "data_version",
                                         "sha256", "url", "protocol", "flavour", "verified_by",
                                         "precision")}}


def audited(action: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Record every call of ``deploy``/``rollback`` in the repository's audit log, as it ends.

    The wrapped function gains two keyword arguments, ``by`` (who asked; default the OS user)
    and ``reason`` (why), and must take ``cfg`` first and ``repository=`` by keyword.
    """
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, by: str | None = None, reason: str | None = None, **kwargs: Any) -> Any:
            cfg = args[0] if args else kwargs.get("cfg")
            base = {"action": action, "by": by, "reason": reason,
                    "model_name": getattr(cfg, "model_name", None),
                    "protocol": kwargs.get("protocol", "grpc"), "url": kwargs.get("url")}
            if action == "rollback":
                base["version"] = kwargs.get("to_version")
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                outcome = "refused" if isinstance(exc, GateRejectedError) else "failed"
                append(kwargs["repository"], {**base, "outcome": outcome, "error": first_line(exc)})
                raise
            append(kwargs["repository"], {**base, **{k: v for k, v in _what(action, result).items()
                                                     if v is not None}})
            return result

        sig = inspect.signature(fn)
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                   annotation="str | None") for name in ("by", "reason")]
        run.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # type: ignore[attr-defined]
        return run
    return wrap
