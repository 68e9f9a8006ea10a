"""The drift recorder through a real embedded Triton: one record per served image, in order, with
the answer, and nothing identifying from the file's header in the store; recording off adds none;
the log survives a restart.

A tiny ONNX classifier (tests/integration/test_triton_serving.py's sigmoid(w * mean + b)) so each
recorded probability is worked out from the file's own pixels.
"""

from __future__ import annotations

import json

import pytest

from conftest import pydicom_file
from medops.config import ServingConfig
from medops.drift import RequestLog
from medops.serving.client import predict_files
from medops.serving.deploy import deploy
from medops.serving.server import start_server, stop_server
from test_triton_serving import (S, SPEC, expected_probability, write_bundled_dicom, write_export_result,
                                 write_gate, write_golden, write_tiny_onnx)

pytestmark = [pytest.mark.triton, pytest.mark.slow]

W = {"w": 4.0, "b": -2.0}
# synthetic PHI: none of it may reach the drift log
CANARIES = {"PatientName": "CANARY^PHI^ZEBRA", "PatientID": "PHIID-778899",
            "PatientBirthDate": "19370412", "StudyDate": "20260917", "AccessionNumber": "ACC-55231",
            "InstitutionName": "Canary Memorial Hospital", "ReferringPhysicianName": "DOC^CANARY"}


def write_phi_film(path):
    """A bundled chest film (CR) carrying synthetic PHI in its header, with a GE-like manufacturer."""
    import pydicom

    write_bundled_dicom(path, index=5)
    ds = pydicom.dcmread(path)
    for keyword, value in CANARIES.items():
        setattr(ds, keyword, value)
    ds.Manufacturer = "Synthetic Imaging Co."
    ds.BodyPartExamined = "CHEST"
    ds.PixelSpacing = [0.15, 0.15]
    ds.save_as(path)
    return path, [str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, free_port):
    base = tmp_path_factory.mktemp("drift-triton")
    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=60)
    state, repo = base / "state", base / "repository"
    info = start_server(cfg, repository=repo, state_dir=state)
    try:
        onnx_path = write_tiny_onnx(base / "export" / "model.onnx", **W)
        write_golden(onnx_path, **W)
        kwargs = dict(onnx=onnx_path, gate=write_gate(base / "gate.json", passed=True),
                      export_result=write_export_result(onnx_path), repository=repo,
                      url=info.grpc_url, preprocessing=SPEC)
        deploy(cfg, **kwargs)
        yield {"cfg": cfg, "info": info, "state": state, "base": base, "deploy": kwargs}
    finally:
        stop_server(state)


def test_each_served_image_is_recorded_once_with_its_answer_and_no_phi(server):
    base, info = server["base"], server["info"]
    phi, uids = write_phi_film(base / "phi.dcm")
    bad = base / "notes.txt"
    bad.write_text("not a DICOM file\n")
    ct = pydicom_file("CT_small.dcm")
    log = RequestLog(server["cfg"].record_path(server["state"]))
    before = len(log.read_last())
    paths = [phi, ct, bad, phi]
    preds = predict_files(paths, url=info.grpc_url, model_name=server["cfg"].model_name,
                          preprocessing=SPEC, batch_size=4)
    records = log.read_last()[before:]
    assert len(records) == len(paths)  # one per image, in the order sent (one batch)
    film, ct_rec, bad_rec, film_again = records
    assert film == film_again
    assert film["probability"] == pytest.approx(expected_probability(phi, **W), abs=1e-5)
    assert film["probability"] == pytest.approx(preds[0].probability, abs=1e-6)
    assert film["ood_score"] is None  # this classifier declares no ood_score
    assert (film["modality"], film["body_part"], film["manufacturer"], film["photometric"]) == (
        "CR", "CHEST", "SYNTHETIC IMAGING CO.", "MONOCHROME2")
    assert (film["spacing"], film["rows"], film["columns"], film["matrix"]) == ("[0.1,0.2)", 28, 28,
                                                                               "[0,64)")
    assert film["transfer_syntax"] == "Explicit VR Little Endian" and film["error"] is None
    assert 0 <= film["p05"] <= film["p50"] <= film["p95"] <= 1
    assert ct_rec["modality"] == "CT" and ct_rec["rows"] == 128 and ct_rec["spacing"] != "none"
    assert bad_rec["error"] == "not_dicom" and bad_rec["probability"] is None
    assert bad_rec["mean"] is None and bad_rec["modality"] is None
    # the PHI canaries, the file's UIDs and its dates appear nowhere in the store
    store = b"".join(p.read_bytes() for p in log.files())
    for needle in [*CANARIES.values(), "CANARY", *uids, "2.25.", "1.2.840"]:
        assert needle.encode() not in store, needle


@pytest.mark.long  # two more server starts; recording itself is tested above in make test
def test_recording_off_records_nothing_and_the_log_survives_a_restart(server):
    cfg, base = server["cfg"], server["base"]
    log = RequestLog(cfg.record_path(server["state"]))
    film = write_bundled_dicom(base / "film.dcm", index=7)
    predict_files([film], url=server["info"].grpc_url, model_name=cfg.model_name, preprocessing=SPEC)
    n = len(log.read_last())
    off = cfg.model_copy(update={"record": False})
    deploy(off, **server["deploy"])  # the same model, re-rendered without the recorder step
    preds = predict_files([film], url=server["info"].grpc_url, model_name=cfg.model_name,
                          preprocessing=SPEC)
    assert preds[0].error is None and len(log.read_last()) == n
    # back on, then a restart: the earlier records are still there and new ones follow them
    deploy(cfg, **server["deploy"])
    m = len(log.read_last())  # deploy's own check through the ensemble is served, so recorded
    assert m == n + 1
    assert stop_server(server["state"])
    info = start_server(cfg, repository=server["deploy"]["repository"], state_dir=server["state"])
    predict_files([film], url=info.grpc_url, model_name=cfg.model_name, preprocessing=SPEC)
    records = log.read_last()
    assert len(records) == m + 1 and records[-1] == records[n - 1]
    json.dumps(records)  # plain JSON values only


def test_a_recorder_that_cannot_write_does_not_fail_the_request(server):
    cfg = server["cfg"]
    log = RequestLog(cfg.record_path(server["state"]))
    film = write_bundled_dicom(server["base"] / "film2.dcm", index=9)
    kept = log.path.with_name("kept.jsonl")
    log.path.replace(kept)
    log.path.mkdir()  # the log file is a folder now: every append fails (even for root)
    try:
        for _ in range(2):
            preds = predict_files([film], url=server["info"].grpc_url, model_name=cfg.model_name,
                                  preprocessing=SPEC)
            assert preds[0].error is None
            assert preds[0].probability == pytest.approx(expected_probability(film, **W), abs=1e-5)
    finally:
        log.path.rmdir()
        kept.replace(log.path)
    text = (server["state"] / "logs" / "triton.log").read_text(errors="replace")
    assert "drift recorder: 1 request(s) not recorded; last: IsADirectoryError" in text
