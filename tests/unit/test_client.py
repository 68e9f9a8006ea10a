"""medops.client without a server: labels, per-file errors, the table and JSON-lines outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import pydicom_file
from medops.client import (
    Prediction,
    chunk_requests,
    format_predictions,
    label_for,
    predict_files,
    preprocess_files,
    read_files,
    to_json_lines,
)
from medops.errors import ServingError


def test_label_threshold_is_inclusive():
    assert label_for(0.5, 0.5) == "pneumonia"
    assert label_for(0.4999, 0.5) == "normal"
    assert label_for(0.2, 0.1) == "pneumonia"


def test_preprocess_files_keeps_order_and_turns_bad_files_into_errors(tmp_path):
    text = tmp_path / "report.txt"
    text.write_text("not DICOM")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(pydicom_file("CT_small.dcm").read_bytes()[:2000])
    missing = tmp_path / "missing.dcm"
    ct = pydicom_file("CT_small.dcm")
    items = preprocess_files([text, ct, truncated, missing], image_size=28)
    assert [f for f, _, _ in items] == [str(text), str(ct), str(truncated), str(missing)]
    (_, none1, err1), (_, img, err2), (_, none3, err3), (_, none4, err4) = items
    assert none1 is None and err1.startswith("not_dicom:")
    assert err2 is None and img.shape == (28, 28) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert none3 is None and err3 and "Traceback" not in err3
    assert none4 is None and err4


@pytest.mark.parametrize("via", ["ensemble", "tensor"])
def test_only_unusable_files_need_no_server(tmp_path, free_port, via):
    # the ensemble sends bytes, so only an unreadable file is known bad without the server;
    # preprocessing here also knows a non-DICOM file
    missing = tmp_path / "missing.dcm"
    bad = tmp_path / "x.txt"
    bad.write_text("no")
    paths = [missing] if via == "ensemble" else [missing, bad]
    preds = predict_files(paths, url=f"127.0.0.1:{free_port()}", model_name="m", image_size=28,
                          via=via)
    assert [p.file for p in preds] == [str(p) for p in paths]
    assert all(p.probability is None and p.error.startswith("not_dicom: ") for p in preds)


def test_read_files_reads_bytes_and_reports_unreadable(tmp_path):
    ok = tmp_path / "a.dcm"
    ok.write_bytes(b"\x00\x01")
    [(f1, data, e1), (f2, none, e2)] = read_files([ok, tmp_path / "gone.dcm"])
    assert (f1, data, e1) == (str(ok), b"\x00\x01", None)
    assert none is None and e2.startswith("not_dicom: cannot read file:") and "gone.dcm" in e2


def test_unreachable_server_is_a_serving_error(free_port):
    url = f"127.0.0.1:{free_port()}"
    with pytest.raises(ServingError, match=rf"cannot reach Triton at {url} over http"):
        predict_files([pydicom_file("CT_small.dcm")], url=url, protocol="http", model_name="m",
                      image_size=28, timeout=3)


def test_bad_via_is_refused():
    with pytest.raises(ValueError, match="via must be 'ensemble' or 'tensor'"):
        predict_files([], url="127.0.0.1:1", model_name="m", image_size=28, via="both")  # type: ignore[arg-type]


def test_bad_protocol_is_refused():
    with pytest.raises(ValueError, match="protocol must be 'grpc' or 'http'"):
        predict_files([pydicom_file("CT_small.dcm")], url="127.0.0.1:1", protocol="ftp",  # type: ignore[arg-type]
                      model_name="m", image_size=28)


PREDS = [
    Prediction(file="a.dcm", probability=0.91234, label="pneumonia", model_version="3"),
    Prediction(file="notes.txt", error="not_dicom: notes.txt is not a DICOM file"),
]


def test_table_has_one_aligned_row_per_file():
    lines = format_predictions(PREDS).splitlines()
    assert lines[0].split() == ["file", "label", "probability", "version", "error"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["a.dcm", "pneumonia", "0.9123", "3"]
    assert lines[3].split()[:4] == ["notes.txt", "-", "-", "-"]
    assert lines[3].endswith("not_dicom: notes.txt is not a DICOM file")
    # columns line up: the label column starts at the same offset on every row
    assert lines[2].index("pneumonia") == lines[0].index("label") == lines[3].index("-")


def test_json_lines_round_trip():
    text = to_json_lines(PREDS)
    assert text.endswith("\n") and len(text.splitlines()) == 2
    rows = [json.loads(line) for line in text.splitlines()]
    assert rows[1] == {"file": "notes.txt", "probability": None, "label": None,
                       "model_version": None, "error": "not_dicom: notes.txt is not a DICOM file"}
    assert [Prediction.model_validate(r) for r in rows] == PREDS


def test_requests_are_split_by_count_and_by_bytes():
    idx = [0, 2, 3, 5, 6]
    assert chunk_requests(idx, [0] * 5, max_items=2, max_bytes=10) == [[0, 2], [3, 5], [6]]
    assert chunk_requests(idx, [4, 4, 4, 20, 1], max_items=64, max_bytes=10) == [[0, 2], [3], [5], [6]]
    assert chunk_requests([], [], max_items=4, max_bytes=10) == []
