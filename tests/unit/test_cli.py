"""The `medops` entry point, in-process (main(argv)), on small real data: summaries, one JSON object
with --json, and each exit code of medops.errors.ExitCode reached by a real failure."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import tomllib

import numpy as np
import pandas as pd
import pytest

import medops
from medops.cli import main, progress_bar
from medops.config import GateConfig, update_params_file
from medops.errors import ExitCode
from medops.hashing import sha256_file


@pytest.fixture
def project(tmp_path, repo_root, deid_key):
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    update_params_file(tmp_path / "params.yaml", {"synth": {"max_images_per_split": 3}})
    return tmp_path


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    """``medops ARGV --json``: the exit code and stdout parsed as the one JSON object it must be."""
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1, f"stdout is not one line of JSON: {out!r}"
    return code, json.loads(out)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- the table of exit codes --------------------------------------------------------------------

def test_exit_codes_are_distinct_and_argparse_keeps_2():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5, 130]
    assert ExitCode.USAGE == 2  # what argparse itself exits with


def test_help_ends_with_the_table_of_exit_codes(capsys):
    assert main(["--help"]) == ExitCode.OK
    epilog = capsys.readouterr().out.split("exit codes:\n", 1)[1]
    rows = re.findall(r"^  (\d+) +(.+?)(?=^  \d|\Z)", epilog, flags=re.M | re.S)
    assert [(int(n), " ".join(text.split())) for n, text in rows] == [
        (int(c), c.meaning) for c in ExitCode]


def test_readme_lists_the_same_exit_codes(repo_root):
    readme = (repo_root / "README.md").read_text()
    rows = re.findall(r"^\| `(\d+)` \| `(\w+)` \| (.+) \|$", readme, flags=re.M)
    assert [(int(n), name, meaning) for n, name, meaning in rows] == [
        (int(c), c.name, c.meaning) for c in ExitCode]


def test_version_is_the_package_version(capsys, repo_root):
    assert main(["--version"]) == ExitCode.OK
    assert capsys.readouterr().out == f"medops {medops.__version__}\n"
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    assert medops.__version__ == pyproject["project"]["version"]


@pytest.mark.parametrize("argv", [["nonsense"], ["deploy", "--protocol", "ftp"], ["ingest", "--workers", "two"],
                                  ["stages", "--no-such-option"]])
def test_a_usage_error_exits_2_with_argparse_usage(argv, capsys):
    assert main(argv) == ExitCode.USAGE
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: medops" in captured.err


def test_an_unexpected_error_goes_on_up_after_its_json_object(monkeypatch, capsys):
    from medops import cli

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_stages", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # `python -m medops`: traceback, exit 1
        main(["stages", "--json"])
    assert json.loads(capsys.readouterr().out) == {
        "error": {"code": ExitCode.FAILURE, "type": "RuntimeError", "message": "a bug"}}


def test_ctrl_c_exits_130(monkeypatch, capsys):
    from medops import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_stages", interrupted)
    assert main(["stages"]) == ExitCode.INTERRUPTED == 130


# -- 3: bad input ---------------------------------------------------------------------------------

def test_a_typo_in_params_is_bad_input(tmp_path, repo_root, capsys):
    (tmp_path / "params.yaml").write_text(
        (repo_root / "params.yaml").read_text().replace("epochs:", "epoch:"))
    assert main(["--project", str(tmp_path), "stage", "train"]) == ExitCode.BAD_INPUT
    assert "train.epoch" in capsys.readouterr().err
    code, out = run_json(capsys, "--project", str(tmp_path), "stage", "train")
    assert code == ExitCode.BAD_INPUT
    assert out["error"]["code"] == 3 and out["error"]["type"] == "ConfigError"
    assert "train.epoch" in out["error"]["message"]


def test_a_missing_source_folder_is_bad_input(project, capsys):
    code = main(["--project", str(project), "ingest", str(project / "nowhere"), "--out", str(project / "o")])
    assert code == ExitCode.BAD_INPUT
    assert "nowhere" in capsys.readouterr().err


def test_predict_on_files_that_are_not_dicom_answers_each_and_exits_3(project, capsys):
    # via tensor, files are preprocessed here: none is DICOM, so no server is asked
    bad = project / "notes.dcm"
    bad.write_text("this is not DICOM")
    code, out = run_json(capsys, "--project", str(project), "predict", "--via", "tensor",
                         "--url", "127.0.0.1:1", str(bad))
    assert code == ExitCode.BAD_INPUT
    assert out["failed"] == 1 and out["url"] == "127.0.0.1:1" and out["via"] == "tensor"
    [pred] = out["predictions"]
    assert set(pred) == {"file", "probability", "label", "model_version", "error", "ood_score",
                         "in_distribution", "reason"}
    assert pred["file"] == str(bad) and pred["probability"] is None and pred["ood_score"] is None
    assert pred["error"].startswith("not_dicom")


# -- 4: refused by the gate ------------------------------------------------------------------------

def write_gate(project, *, passed: bool) -> None:
    """A real gate decision (medops.stages.gate.decide) from metrics that pass or fail the defaults."""
    from medops.stages.gate import decide

    metrics = ({"auc": 0.95, "accuracy": 0.9, "sensitivity": 0.9, "specificity": 0.8} if passed
               else {"auc": 0.61, "accuracy": 0.9, "sensitivity": 0.40, "specificity": 0.8})
    decision = decide(GateConfig(), metrics, {"data_version": "dv-test", "model": "tiny"})
    assert decision.passed is passed
    (project / "reports").mkdir(exist_ok=True)
    (project / "reports" / "gate.json").write_text(decision.model_dump_json())


def test_deploy_refused_by_the_gate_exits_4_before_asking_any_server(project, capsys):
    assert main(["--project", str(project), "deploy", "--url", "127.0.0.1:1"]) == ExitCode.REFUSED
    assert "no gate decision" in capsys.readouterr().err
    write_gate(project, passed=False)
    code, out = run_json(capsys, "--project", str(project), "deploy", "--url", "127.0.0.1:1")
    assert code == ExitCode.REFUSED
    assert out["error"]["type"] == "GateRejectedError" and out["error"]["code"] == 4
    assert "gate rejected the model" in out["error"]["message"] and "auc" in out["error"]["message"]


# -- 5: server unreachable --------------------------------------------------------------------------

def write_exported_model(project, size: int = 28) -> None:
    """What export leaves for deploy: model.onnx (any bytes: deploy hashes it before it asks
    Triton), export.json with its sha256, and golden.npz."""
    models = project / "models"
    models.mkdir()
    (models / "model.onnx").write_bytes(b"not loaded before Triton answers")
    (models / "export.json").write_text(json.dumps(
        {"sha256": sha256_file(models / "model.onnx"), "data_version": "dv-test", "parity_atol": 1e-4}))
    np.savez(models / "golden.npz", images=np.zeros((2, size, size, 1), np.float32),
             probabilities=np.full((2, 1), 0.5, np.float32))


def test_deploy_to_a_closed_port_exits_5(project, capsys, free_port):
    write_gate(project, passed=True)
    write_exported_model(project)
    url = f"127.0.0.1:{free_port()}"
    code, out = run_json(capsys, "--project", str(project), "deploy", "--url", url)
    assert code == ExitCode.UNAVAILABLE
    assert out["error"]["type"] == "ServerUnreachableError"
    assert f"cannot reach Triton at {url}" in out["error"]["message"]
    assert not (project / ".medops" / "triton" / "repository" / "pneumonia_classifier").exists()


def test_predict_with_no_server_is_a_clear_error_not_a_traceback(project, capsys, free_port):
    assert main(["--project", str(project), "synth"]) == ExitCode.OK
    capsys.readouterr()
    dcm = next((project / "data" / "export" / "dicom").rglob("*.dcm"))
    code = main(["--project", str(project), "predict", "--url", f"127.0.0.1:{free_port()}", str(dcm)])
    captured = capsys.readouterr()
    assert code == ExitCode.UNAVAILABLE
    assert captured.out == ""
    assert "Traceback" not in captured.err
    assert "medops predict: error: cannot reach Triton at 127.0.0.1" in captured.err


def test_serve_status_with_no_server_exits_5_with_a_sentence(project, capsys):
    assert main(["--project", str(project), "serve", "status"]) == ExitCode.UNAVAILABLE
    out = capsys.readouterr().out
    assert out == "Triton is not running (no server recorded); start it with `medops serve start`\n"
    # a record left behind by a server that has gone: a pid that is not running
    run = project / ".medops" / "run"
    run.mkdir(parents=True)
    (run / "triton.pid").write_text("999999999\n")
    (run / "triton.json").write_text(json.dumps({
        "pid": 999999999, "host": "127.0.0.1", "http_port": 1, "grpc_port": 2, "metrics_port": 3,
        "repository": "r", "log_file": "l", "started_at": "2024-01-01T00:00:00+00:00"}))
    code, out = run_json(capsys, "--project", str(project), "serve", "status")
    assert code == ExitCode.UNAVAILABLE
    assert (out["running"], out["ready"], out["detail"]) == (
        False, False, "recorded pid 999999999 is not running")
    assert out["info"]["pid"] == 999999999 and out["info"]["http_port"] == 1
    code, out = run_json(capsys, "--project", str(project), "serve", "stop")
    assert (code, out) == (ExitCode.OK, {"stopped": False})


# -- 0: --json on real data ----------------------------------------------------------------------

def test_synth_then_ingest_prints_a_summary_and_quarantines_bad_files(project, capsys, free_port):
    assert main(["--project", str(project), "synth"]) == 0
    assert "wrote 9 DICOM files" in capsys.readouterr().out
    src = project / "data" / "export" / "dicom"
    (src / "notes.txt").write_text("not a DICOM file")
    out = project / "ingested"
    code = main(["--project", str(project), "ingest", str(src), "--out", str(out),
                 "--manifest", str(project / "data" / "export" / "labels.csv"), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0  # finished, even with a file quarantined
    assert "ingested 9 of 10 files" in printed and "not_dicom" in printed
    quarantine = pd.read_csv(out / "quarantine.csv")
    assert quarantine[["path", "reason"]].values.tolist() == [["notes.txt", "not_dicom"]]
    assert len(pd.read_parquet(out / "metadata.parquet")) == 9
    args = ["--project", str(project), "ingest", str(src), "--out", str(out),
            "--manifest", str(project / "data" / "export" / "labels.csv"), "--quiet"]
    assert main(args + ["--full"]) == 0
    assert "reused" not in capsys.readouterr().out  # --full decodes everything again
    assert main(args) == 0  # and the incremental run after it reuses what it wrote
    assert "0 file(s) decoded, 10 reused, 0 shard(s) written; nothing changed" in capsys.readouterr().out
    code, result = run_json(capsys, *args)
    assert code == ExitCode.OK
    assert (result["files_seen"], result["used"], result["reused"], result["changed"]) == (10, 9, 10, False)
    assert result["quarantined_by_reason"] == {"not_dicom": 1}
    assert result["metadata"] == str(out / "metadata.parquet")
    # one de-identified file, by its SOP Instance UID, out of its shard's pack
    row = pd.read_parquet(out / "metadata.parquet").iloc[4]
    target = project / "one" / "file.dcm"
    code, got = run_json(capsys, "--project", str(project), "dataset", "get", row["sop_instance_uid"],
                         "--dataset", str(out), "--out", str(target))
    assert code == ExitCode.OK and got["out"] == str(target) and got["deid_path"] == row["deid_path"]
    import pydicom

    ds = pydicom.dcmread(target)
    assert ds.SOPInstanceUID == row["sop_instance_uid"] and ds.PatientIdentityRemoved == "YES"
    assert main(["--project", str(project), "dataset", "get", "2.25.1", "--dataset", str(out)]) == ExitCode.BAD_INPUT
    assert "no image with SOP Instance UID 2.25.1" in capsys.readouterr().err


def test_synth_and_stage_json_on_real_data(project, capsys):
    code, synth = run_json(capsys, "--project", str(project), "synth")
    assert code == ExitCode.OK
    assert synth["files"] == 9 and synth["by_split"] == {"train": 3, "val": 3, "test": 3}
    assert synth["manifest"] == str(project / "data" / "export" / "labels.csv")
    # medops ingest without a folder: the project's export in, the published dataset out
    code, ingested = run_json(capsys, "--project", str(project), "ingest")
    assert code == ExitCode.OK
    assert ingested["used"] == 9 and ingested["quarantined"] == 0 and ingested["published"] is True
    assert ingested["dataset"] == str(project / "data" / "ingested")
    assert (project / "data" / "ingested" / "quarantine.csv").read_text() == "file_id,reason\n"
    assert not (project / "data" / "ingested" / "ingest_index.json").exists()  # export paths: private
    code, again = run_json(capsys, "--project", str(project), "ingest")
    assert (code, again["changed"], again["published"]) == (ExitCode.OK, False, False)
    # a new delivery: medops synth --add N, and the next ingest decodes just those files
    code, added = run_json(capsys, "--project", str(project), "synth", "--add", "2")
    assert code == ExitCode.OK and added["manifest"].endswith("labels-add-1.csv")
    code, grown = run_json(capsys, "--project", str(project), "ingest")
    assert (grown["decoded"], grown["used"], grown["published"]) == (added["files"], 9 + added["files"], True)
    code, stages = run_json(capsys, "--project", str(project), "stages")
    assert code == ExitCode.OK
    assert [s["name"] for s in stages["stages"]][:2] == ["quality", "split"]
    assert {"name": "train", "module": "medops.stages.train", "params": ["train", "augment"]} in stages["stages"]


def test_json_stdout_stays_clean_while_a_progress_bar_draws_on_a_terminal(project, capsys, monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = main(["--project", str(project), "synth", "--json"])
    out = capsys.readouterr().out
    assert code == ExitCode.OK and json.loads(out)["files"] == 9
    assert "synth" in terminal.getvalue() and "9/9" in terminal.getvalue()  # the bar, on stderr


def test_progress_bar_only_on_a_terminal():
    with progress_bar("x", stream=io.StringIO()) as bar:
        assert bar is None  # a pipe or a log file: no bar
    with progress_bar("x", stream=FakeTerminal(), enabled=False) as bar:
        assert bar is None  # --quiet
    terminal = FakeTerminal()
    with progress_bar("x", stream=terminal) as bar:
        bar(1, 4)
        bar(4, 4)
    assert "4/4" in terminal.getvalue()
