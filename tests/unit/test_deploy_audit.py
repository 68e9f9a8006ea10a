"""The deploy/rollback audit log (medops.serving.audit): who, when, what version, why, and the
outcome, appended as JSON lines beside the model repository and read back by `medops serve history`.

Refused and failed attempts need no Triton (the gate refuses before connecting; a closed port
fails), so they are tested here; successful deploys and rollbacks on a real Triton are in
tests/integration/test_deploy_restricted.py.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from medops.config import GateConfig, PreprocessSpec, ServingConfig
from medops.errors import GateRejectedError, ServerUnreachableError, ServingError
from medops.serving.audit import AUDIT_FILE, append, audit_log, history, os_user
from medops.serving.deploy import deploy, rollback
from medops.stages.gate import decide

SPEC = PreprocessSpec(image_size=28)


def _gate(path: Path, passed: bool) -> Path:
    metrics = ({"auc": 0.95, "accuracy": 0.9, "sensitivity": 0.9, "specificity": 0.8} if passed
               else {"auc": 0.61, "accuracy": 0.9, "sensitivity": 0.40, "specificity": 0.8})
    path.write_text(decide(GateConfig(), metrics, {"data_version": "dv-audit", "model": "tiny"}).model_dump_json())
    return path


def test_a_refused_deploy_is_recorded_with_who_and_why(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    before = datetime.now(timezone.utc).replace(microsecond=0)
    with pytest.raises(GateRejectedError):
        deploy(ServingConfig(), onnx=tmp_path / "m.onnx", gate=_gate(tmp_path / "gate.json", passed=False),
               export_result=tmp_path / "export.json", repository=repo, preprocessing=SPEC,
               by="dr.chen", reason="CAB-1234: weekly retrain")
    [entry] = history(repo)
    assert entry["action"] == "deploy" and entry["outcome"] == "refused"
    assert entry["by"] == "dr.chen" and entry["os_user"] == os_user()
    assert entry["reason"] == "CAB-1234: weekly retrain"
    assert entry["model_name"] == ServingConfig().model_name
    assert "gate rejected the model" in entry["error"] and "auc" in entry["error"]
    assert datetime.fromisoformat(entry["time"]) >= before
    assert (repo / AUDIT_FILE) == audit_log(repo)


def test_a_failed_rollback_is_recorded_and_the_os_user_is_the_default(tmp_path: Path, free_port) -> None:
    repo = tmp_path / "repo"
    cfg = ServingConfig(grpc_port=free_port())
    for version in (1, 2):  # two versions on disk, the second served: a rollback has a target
        (repo / cfg.model_name / str(version)).mkdir(parents=True)
    (repo / cfg.model_name / "config.pbtxt").write_text(
        f'name: "{cfg.model_name}"\nversion_policy: {{ specific: {{ versions: [2] }} }}\n')
    with pytest.raises((ServerUnreachableError, ServingError)):  # nothing listens on that port
        rollback(cfg, repository=repo, preprocessing=SPEC, timeout=5)
    [entry] = history(repo)
    assert entry["action"] == "rollback" and entry["outcome"] == "failed"
    assert entry["by"] == os_user() and entry["reason"] is None
    assert entry["error"]


def test_the_log_is_append_only_and_whole_lines_under_concurrent_writers(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    append(repo, {"action": "deploy", "outcome": "deployed", "version": 1})
    first = audit_log(repo).read_bytes()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(repo, w, 100)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert audit_log(repo).read_bytes().startswith(first)  # nothing before was rewritten
    entries = history(repo)
    assert len(entries) == 401
    assert sorted((e["writer"], e["n"]) for e in entries[1:]) == [(w, n) for w in range(4) for n in range(100)]
    assert history(repo, limit=3) == entries[-3:]


def _append_many(repo: Path, writer: int, count: int) -> None:
    for n in range(count):
        append(repo, {"action": "deploy", "outcome": "deployed", "writer": writer, "n": n,
                      "reason": "x" * 300})  # longer than nothing, shorter than a page


def test_a_torn_line_is_skipped_not_fatal(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    append(repo, {"action": "deploy", "outcome": "deployed", "version": 1})
    with audit_log(repo).open("a") as fh:
        fh.write('{"action": "deploy", "outc')  # a disk that filled mid-write
    append(repo, {"action": "rollback", "outcome": "rolled_back", "version": 1})
    assert [e["action"] for e in history(repo)] == ["deploy", "rollback"]


def test_serve_history_cli_survives_a_new_process(tmp_path: Path, repo_root: Path) -> None:
    """The log is a file: a later process (after a restart) reads what earlier ones wrote."""
    from medops.config import update_params_file

    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    params = update_params_file(root / "params.yaml", {"serving": {"repository": "triton-repo"}})
    repo = params.serving.repository_path(root)
    assert subprocess.run([sys.executable, "-m", "medops", "--project", str(root), "serve", "history"],
                          capture_output=True, text=True).stdout.startswith("no deploy or rollback recorded")
    append(repo, {"action": "deploy", "outcome": "deployed", "model_name": "m", "version": 2,
                  "previous_version": 1, "by": "ci-bot", "reason": "nightly"})
    append(repo, {"action": "rollback", "outcome": "rolled_back", "model_name": "m", "version": 1,
                  "previous_version": 2, "reason": "AUC dropped on site B"})
    out = subprocess.run([sys.executable, "-m", "medops", "--project", str(root), "serve", "history", "--json"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert data["log"] == str(repo / AUDIT_FILE)
    assert [(e["action"], e["version"], e["by"], e["reason"]) for e in data["entries"]] == [
        ("deploy", 2, "ci-bot", "nightly"), ("rollback", 1, os_user(), "AUC dropped on site B")]
    text = subprocess.run([sys.executable, "-m", "medops", "--project", str(root), "serve", "history",
                           "--limit", "1"], capture_output=True, text=True, check=True).stdout
    assert "rollback" in text and "rolled_back" in text and "v1 (was v2)" in text
    assert "AUC dropped on site B" in text and "nightly" not in text
