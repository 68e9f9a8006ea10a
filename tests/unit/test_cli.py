"""The `medops` entry point, in-process (main(argv)), on small real data."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from medops.cli import main
from medops.config import update_params_file


@pytest.fixture
def project(tmp_path, repo_root, deid_key):
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    update_params_file(tmp_path / "params.yaml", {"synth": {"max_images_per_split": 3}})
    return tmp_path


def test_synth_then_ingest_prints_a_summary_and_quarantines_bad_files(project, capsys, free_port):
    assert main(["--project", str(project), "synth"]) == 0
    assert "wrote 9 DICOM files" in capsys.readouterr().out
    src = project / "data" / "raw" / "dicom"
    (src / "notes.txt").write_text("not a DICOM file")
    out = project / "ingested"
    code = main(["--project", str(project), "ingest", str(src), "--out", str(out),
                 "--manifest", str(project / "data" / "raw" / "labels.csv"), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0  # finished, even with a file quarantined
    assert "ingested 9 of 10 files" in printed and "not_dicom" in printed
    quarantine = pd.read_csv(out / "quarantine.csv")
    assert quarantine[["path", "reason"]].values.tolist() == [["notes.txt", "not_dicom"]]
    assert len(pd.read_parquet(out / "metadata.parquet")) == 9
    args = ["--project", str(project), "ingest", str(src), "--out", str(out),
            "--manifest", str(project / "data" / "raw" / "labels.csv"), "--quiet"]
    assert main(args + ["--full"]) == 0
    assert "reused" not in capsys.readouterr().out  # --full decodes everything again
    assert main(args) == 0  # and the incremental run after it reuses what it wrote
    assert "0 file(s) decoded, 10 reused; nothing changed" in capsys.readouterr().out


def test_predict_with_no_server_is_a_clear_error_not_a_traceback(project, capsys, free_port):
    assert main(["--project", str(project), "synth"]) == 0
    capsys.readouterr()
    dcm = next((project / "data" / "raw" / "dicom").rglob("*.dcm"))
    code = main(["--project", str(project), "predict", "--url", f"127.0.0.1:{free_port()}", str(dcm)])
    captured = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in captured.out + captured.err
    assert "127.0.0.1" in captured.out + captured.err


def test_a_typo_in_params_is_a_clear_error(tmp_path, repo_root, capsys):
    (tmp_path / "params.yaml").write_text((repo_root / "params.yaml").read_text().replace("epochs:", "epoch:"))
    assert main(["--project", str(tmp_path), "stage", "train"]) == 2
    assert "train.epoch" in capsys.readouterr().err
