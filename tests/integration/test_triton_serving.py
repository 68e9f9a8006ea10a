"""The real embedded tritonserver: deploy gated versions, answer DICOM files over HTTP and gRPC.

One server for the module (free ports, its own state dir), stopped by pid at the end. The models
are tiny ONNX graphs built here with onnx.helper (probability = sigmoid(w * mean(image) + b)), so
the expected probability of each file is worked out from its preprocessed pixels, and v1 and v2
give different answers.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import pydicom_file
from medops.cli import main
from medops.serving.client import Prediction, format_predictions, predict_files, to_json_lines
from medops.config import PreprocessSpec, ServingConfig, update_params_file
from medops.errors import ExitCode, GateRejectedError, ServingError
from medops.serving.deploy import deploy, rollback, sha256_file
from medops.serving.repository import list_versions, remove_version, served_version
from medops.serving.server import endpoint, start_server, stop_server

pytestmark = [pytest.mark.triton, pytest.mark.slow]

S = 28
SPEC = PreprocessSpec(image_size=S)  # ingest.preprocessing of the tiny models served here
BUNDLED = Path(__file__).resolve().parents[2] / "datasets" / "pneumoniamnist" / "pneumoniamnist.npz"


# -- small real artifacts ----------------------------------------------------------------------------

def write_tiny_onnx(path: Path, *, w: float, b: float, size: int = S) -> Path:
    """probability = sigmoid(w * mean(image) + b); input "image" (-1,S,S,1), output (-1,1)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["mean", "w"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", size, size, 1])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor("w", TensorProto.FLOAT, [1], [w]),
         helper.make_tensor("b", TensorProto.FLOAT, [1], [b])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by the onnxruntime in this environment
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def write_golden(onnx_path: Path, *, w: float, b: float, n: int = 6) -> Path:
    """golden.npz as export writes it: bundled images and the probabilities of sigmoid(w*mean+b)."""
    images = (np.load(BUNDLED)["val_images"][:n].astype(np.float32) / 255.0)[..., np.newaxis]
    means = images.reshape(n, -1).astype(np.float64).mean(axis=1)
    probs = (1.0 / (1.0 + np.exp(-(w * means + b)))).astype(np.float32).reshape(n, 1)
    out = onnx_path.with_name("golden.npz")
    np.savez(out, images=images, probabilities=probs)
    return out


def write_export_result(onnx_path: Path, data_version: str = "dv-test",
                        decision_threshold: float | None = None) -> Path:
    out = onnx_path.with_name("export.json")
    out.write_text(json.dumps({"sha256": sha256_file(onnx_path), "data_version": data_version,
                               "parity_atol": 1e-4, "decision_threshold": decision_threshold}))
    return out


def write_gate(path: Path, *, passed: bool, data_version: str = "dv-test") -> Path:
    """A real gate decision (medops.stages.gate.decide) from metrics that pass or fail the defaults."""
    from medops.config import GateConfig
    from medops.stages.gate import decide

    metrics = ({"auc": 0.95, "accuracy": 0.9, "sensitivity": 0.9, "specificity": 0.8} if passed
               else {"auc": 0.61, "accuracy": 0.9, "sensitivity": 0.40, "specificity": 0.8})
    decision = decide(GateConfig(), metrics, {"data_version": data_version, "model": "tiny"})
    assert decision.passed is passed
    path.write_text(decision.model_dump_json())
    return path


def write_bundled_dicom(path: Path, index: int = 0, scale: int = 1) -> Path:
    """A CR image made from the bundled PneumoniaMNIST test split (8-bit MONOCHROME2),
    optionally enlarged ``scale`` times in each direction."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.kron(np.load(BUNDLED)["test_images"][index], np.ones((scale, scale), np.uint8))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    ds.PatientID = "TEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def expected_probability(path: Path, *, w: float, b: float) -> float:
    from medops.dicom.pixels import preprocess_file

    mean = float(preprocess_file(path, SPEC).astype(np.float64).mean())
    return 1.0 / (1.0 + math.exp(-(w * mean + b)))


# -- one server for the module -------------------------------------------------------------------

MAX_PIXELS = 128 * 128  # serving.max_image_pixels here: CT_small.dcm is exactly 128 x 128

@pytest.fixture(scope="module")
def triton(tmp_path_factory, free_port):
    base = tmp_path_factory.mktemp("triton")
    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=60, max_image_pixels=MAX_PIXELS)
    state, repo = base / "state", base / "repository"
    info = start_server(cfg, repository=repo, state_dir=state)
    try:
        yield {"cfg": cfg, "info": info, "state": state, "repo": repo, "base": base}
    finally:
        stop_server(state)


V1 = {"w": 4.0, "b": -2.0}
V2 = {"w": -3.0, "b": 1.0}
V2_THRESHOLD = 0.4  # CT_small: p = 0.468 -> pneumonia under v2; bundled CR: p = 0.342 -> normal


@pytest.fixture(scope="module")
def deployed(triton):
    """v1 then v2 deployed through the gate; returns both DeployResults."""
    base, cfg = triton["base"], triton["cfg"]
    results = []
    # v2 was "trained" with a decision threshold of 0.4 (export.json), v1 without one (0.5)
    for n, coef, chosen in ((1, V1, None), (2, V2, V2_THRESHOLD)):
        onnx_path = write_tiny_onnx(base / f"export{n}" / "model.onnx", **coef)
        write_golden(onnx_path, **coef)
        results.append(deploy(
            cfg, onnx=onnx_path, gate=write_gate(base / f"gate{n}.json", passed=True),
            export_result=write_export_result(onnx_path, decision_threshold=chosen),
            repository=triton["repo"],
            url=triton["info"].grpc_url, protocol="grpc", preprocessing=SPEC,
        ))
    return results


@pytest.fixture
def cli_project(tmp_path, repo_root, triton, deployed):
    """A project for `medops` whose params point at the module's server and repository, holding
    v2's export (models/) and its passed gate decision (reports/gate.json)."""
    base, cfg = triton["base"], triton["cfg"]
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    update_params_file(tmp_path / "params.yaml", {"serving": {
        "repository": str(triton["repo"]), "http_port": cfg.http_port, "grpc_port": cfg.grpc_port,
        "metrics_port": cfg.metrics_port, "max_image_pixels": MAX_PIXELS}})
    shutil.copytree(base / "export2", tmp_path / "models")
    (tmp_path / "reports").mkdir()
    shutil.copy(base / "gate2.json", tmp_path / "reports" / "gate.json")
    return tmp_path


def medops_json(capsys, *argv: str) -> tuple[int, dict]:
    """``medops ARGV --json``: the exit code and stdout, which must be one JSON object."""
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    return code, json.loads(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    not_dicom = d / "notes.txt"
    not_dicom.write_text("this is not a DICOM file\n")
    return {
        "ct": pydicom_file("CT_small.dcm"),
        "cr": write_bundled_dicom(d / "bundled.dcm", index=3),
        "big": write_bundled_dicom(d / "big.dcm", index=3, scale=5),  # 140 x 140 > MAX_PIXELS
        "bad": not_dicom,
    }


# -- tests ---------------------------------------------------------------------------------------

def test_deploy_writes_versions_and_serves_the_newest(triton, deployed):
    v1, v2 = deployed
    assert (v1.version, v1.previous_version, v2.version, v2.previous_version) == (1, None, 2, 1)
    assert (v1.threshold, v2.threshold) == (0.5, V2_THRESHOLD)
    assert v2.model_name == triton["cfg"].model_name
    assert v2.data_version == "dv-test"
    assert v2.n_golden == 6 and v2.golden_max_abs_diff <= v2.golden_atol == 1e-4
    model_dir = triton["repo"] / v2.model_name
    assert list_versions(triton["repo"], v2.model_name) == [1, 2]
    assert served_version(triton["repo"], v2.model_name) == 2
    assert "version_policy: { specific: { versions: [ 2 ] } }" in (model_dir / "config.pbtxt").read_text()
    # (the Python-backend stub leaves a __pycache__ beside model.py; Triton ignores it)
    assert {p.name for p in (model_dir / "2").iterdir()} - {"__pycache__"} == {
        "model.onnx", "model.py", "golden.npz", "deploy.json"}
    assert json.loads((model_dir / "2" / "deploy.json").read_text())["sha256"] == v2.sha256
    # the candidate model used for the pre-serving check is gone again
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton["info"].grpc_url)
    try:
        loaded = {(m.name, m.version, m.state) for m in client.get_model_repository_index().models}
        assert not client.is_model_ready(f"{v2.model_name}__candidate")
        assert not client.is_model_ready(v2.model_name, "1")  # v1 unloaded, only v2 serves
    finally:
        client.close()
    assert (v2.model_name, "2", "READY") in loaded


@pytest.mark.parametrize("via", ["ensemble", "tensor"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_predict_files_answers_each_file_with_v2_and_flags_the_non_dicom(
    triton, deployed, files, protocol, via
):
    info = triton["info"]
    url = endpoint(info, protocol)
    paths = [files["ct"], files["bad"], files["cr"]]
    preds = predict_files(paths, url=url, protocol=protocol, model_name=triton["cfg"].model_name,
                          preprocessing=SPEC, via=via)
    assert [p.file for p in preds] == [str(p) for p in paths]
    ct, bad, cr = preds
    for pred, path in ((ct, files["ct"]), (cr, files["cr"])):
        assert pred.error is None
        assert pred.model_version == "2"
        # server-side preprocessing (ensemble) and client-side (tensor) are the same function
        assert pred.probability == pytest.approx(expected_probability(path, **V2), abs=1e-5)
    # labelled at v2's own decision threshold (0.4), on the server or read from it
    assert 0.4 < ct.probability < 0.5 and ct.label == "pneumonia"
    assert cr.probability < 0.4 and cr.label == "normal"
    assert bad.probability is None and bad.label is None and bad.model_version is None
    assert bad.error.startswith("not_dicom: ")
    assert "Traceback" not in bad.error


def test_a_file_that_makes_the_decoder_panic_fails_alone_in_medops_predict(
    triton, deployed, files, cli_project, capsys
):
    """Issue 14: the fuzzer's RLE file (pylibjpeg-rle panics on it) beside two good films. Before
    the fix all three answers failed (StatusCode.INTERNAL ... PanicException) and the command
    failed as a whole."""
    from conftest import fuzz_file

    paths = [files["ct"], fuzz_file("rle_panic.dcm"), files["cr"]]
    for protocol in ("grpc", "http"):
        ct, bad, cr = predict_files(paths, url=endpoint(triton["info"], protocol), protocol=protocol,
                                    model_name=triton["cfg"].model_name, preprocessing=SPEC)
        assert ct.error is None and cr.error is None and ct.model_version == cr.model_version == "2"
        assert bad.error.startswith("decode_error: the RLE Lossless (1.2.840.10008.1.2.5) decoder "
                                    "crashed on this file")
        assert "PanicException" in bad.error and bad.probability is None
    # the CLI prints every file's result and exits 3 = BAD_INPUT (some files got no answer, the
    # others did), not 1 = FAILURE (the call failed)
    code = main(["--project", str(cli_project), "predict", "--url", triton["info"].grpc_url,
                 *map(str, paths)])
    out = capsys.readouterr()
    assert code == ExitCode.BAD_INPUT and "Traceback" not in out.err
    lines = out.out.splitlines()
    assert len(lines) == 5 and "decode_error: the RLE Lossless" in lines[3]
    assert lines[2].split()[1] == "pneumonia" and lines[4].split()[1] == "normal"


def test_the_ensemble_refuses_an_image_over_the_pixel_limit_and_answers_the_rest(
    triton, deployed, files
):
    preds = predict_files([files["big"], files["ct"]], url=triton["info"].grpc_url,
                          model_name=triton["cfg"].model_name, preprocessing=SPEC)
    assert preds[0].error == (f"too_large: 140x140 pixels x 1 frames x 1 samples = 19600 values, "
                              f"over the limit of {MAX_PIXELS}")
    assert preds[0].probability is None
    assert preds[1].error is None and preds[1].model_version == "2"


def test_the_ensemble_is_pinned_to_the_served_classifier_version(triton, deployed):
    from medops.serving.repository import read_config

    repo, name = triton["repo"], triton["cfg"].model_name
    ens = read_config(repo, f"{name}_dicom")
    assert list(ens.version_policy.specific.versions) == [2]
    step = {s.model_name: s.model_version for s in ens.ensemble_scheduling.step}
    # postprocess version 2 is the whole DICOM path: it preprocesses, runs v2's ONNX, labels at
    # v2's threshold and writes the drift records (serving.record): one re-pin switches it all
    assert step == {f"{name}_postprocess": 2}
    post = read_config(repo, f"{name}_postprocess")
    assert list(post.version_policy.specific.versions) == [2]
    params = {k: v.string_value for k, v in post.parameters.items()}
    assert {k: params.pop(k) for k in ("record_dir", "record_max_bytes", "record_keep", "record")}
    assert params == {"threshold.2": repr(V2_THRESHOLD), "labels": "normal,pneumonia",
                      "ood_action": "flag", "classifier": name, "image_size": str(S),
                      "max_bytes": str(triton["cfg"].max_request_bytes),
                      "max_pixels": str(MAX_PIXELS), "frame": "middle"}
    assert read_config(repo, f"{name}_preprocess") is None  # embedded: no model of its own


def test_small_batches_give_the_same_answers(triton, deployed, files):
    info, name = triton["info"], triton["cfg"].model_name
    paths = [files["ct"], files["cr"], files["ct"]]
    progress: list[tuple[int, int]] = []
    one = predict_files(paths, url=info.grpc_url, model_name=name, preprocessing=SPEC, batch_size=1,
                        progress=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 3), (2, 3), (3, 3)]  # one call per answered request
    allb = predict_files(paths, url=info.grpc_url, model_name=name, preprocessing=SPEC)
    assert [p.probability for p in one] == pytest.approx([p.probability for p in allb], abs=1e-6)
    assert one[0].probability == pytest.approx(one[2].probability)


def test_outputs_as_table_and_json_lines(triton, deployed, files):
    preds = predict_files([files["cr"], files["bad"]], url=triton["info"].grpc_url,
                          model_name=triton["cfg"].model_name, preprocessing=SPEC)
    table = format_predictions(preds)
    assert table.splitlines()[0].split() == ["file", "label", "probability", "ood_score", "version",
                                             "note"]
    assert str(files["bad"]) in table and "not_dicom" in table
    rows = [Prediction.model_validate_json(line) for line in to_json_lines(preds).splitlines()]
    assert rows == preds


def test_deploying_the_served_model_again_changes_nothing(triton, deployed):
    # `make demo` run twice: the same export must not pile up identical versions
    base, cfg = triton["base"], triton["cfg"]
    onnx_path = base / "export2" / "model.onnx"
    again = deploy(cfg, onnx=onnx_path, gate=base / "gate2.json",
                   export_result=onnx_path.with_name("export.json"), repository=triton["repo"],
                   url=triton["info"].grpc_url, protocol="grpc", preprocessing=SPEC)
    assert again.unchanged and again.version == deployed[1].version == 2
    assert list_versions(triton["repo"], cfg.model_name) == [1, 2]


def test_medops_deploy_json_reports_the_served_model(triton, deployed, cli_project, capsys):
    code, out = medops_json(capsys, "--project", str(cli_project), "deploy")  # url from params
    assert code == 0
    assert out == json.loads(deployed[1].model_copy(update={"unchanged": True}).model_dump_json())
    assert main(["--project", str(cli_project), "deploy"]) == 0
    assert capsys.readouterr().out == (f"already serving {triton['cfg'].model_name} version 2 "
                                       "(data version dv-test)\n")
    assert list_versions(triton["repo"], triton["cfg"].model_name) == [1, 2]


def test_deploy_refuses_a_failed_gate_and_writes_nothing(triton, deployed):
    base = triton["base"]
    onnx_path = write_tiny_onnx(base / "rejected" / "model.onnx", w=1.0, b=0.0)
    gate = write_gate(base / "gate_failed.json", passed=False)
    with pytest.raises(GateRejectedError) as err:
        deploy(triton["cfg"], onnx=onnx_path, gate=gate, export_result=write_export_result(onnx_path),
               repository=triton["repo"], url=triton["info"].grpc_url, preprocessing=SPEC)
    from medops.config import GateConfig

    assert f"auc 0.610 < min_auc {GateConfig().min_auc:.3f}: fail" in str(err.value)
    assert "sensitivity 0.400 < min_sensitivity 0.700: fail" in str(err.value)
    assert "accuracy" not in str(err.value)  # only the failed checks are listed
    assert list_versions(triton["repo"], triton["cfg"].model_name) == [1, 2]


def test_deploy_refuses_an_onnx_that_is_not_the_exported_one(triton, deployed):
    base = triton["base"]
    onnx_path = write_tiny_onnx(base / "swapped" / "model.onnx", w=1.0, b=0.0)
    export = write_export_result(onnx_path)
    write_tiny_onnx(onnx_path, w=9.0, b=0.0)  # replaced after export
    with pytest.raises(GateRejectedError, match="not the model that was exported"):
        deploy(triton["cfg"], onnx=onnx_path, gate=write_gate(base / "g.json", passed=True),
               export_result=export, repository=triton["repo"], url=triton["info"].grpc_url,
               preprocessing=SPEC)
    assert list_versions(triton["repo"], triton["cfg"].model_name) == [1, 2]


def test_deploy_refuses_a_gate_for_another_data_version(triton, deployed):
    base = triton["base"]
    onnx_path = write_tiny_onnx(base / "other_dv" / "model.onnx", w=1.0, b=0.0)
    gate = write_gate(base / "gate_other.json", passed=True, data_version="dv-older")
    with pytest.raises(GateRejectedError, match="dv-older"):
        deploy(triton["cfg"], onnx=onnx_path, gate=gate, export_result=write_export_result(onnx_path),
               repository=triton["repo"], url=triton["info"].grpc_url, preprocessing=SPEC)
    assert list_versions(triton["repo"], triton["cfg"].model_name) == [1, 2]


def deploy_other(triton, tag: str, *, w: float, b: float, size: int = S,
                 golden: dict | None = None, max_pixels: int = MAX_PIXELS, **kwargs):
    base = triton["base"]
    onnx_path = write_tiny_onnx(base / tag / "model.onnx", w=w, b=b, size=size)
    if size == S:
        write_golden(onnx_path, **(golden or {"w": w, "b": b}))
    else:  # the model cannot take S x S images; its golden file is still S x S as export's is
        write_golden(onnx_path, w=w, b=b)
    cfg = triton["cfg"].model_copy(update={"max_image_pixels": max_pixels})
    return deploy(cfg, onnx=onnx_path, gate=write_gate(base / f"{tag}.json", passed=True),
                  export_result=write_export_result(onnx_path), repository=triton["repo"],
                  url=triton["info"].grpc_url, preprocessing=SPEC, timeout=20, **kwargs)


def assert_v2_serves(triton, files):
    name = triton["cfg"].model_name
    assert list_versions(triton["repo"], name) == [1, 2]
    assert served_version(triton["repo"], name) == 2
    [pred] = predict_files([files["cr"]], url=triton["info"].grpc_url, model_name=name,
                           preprocessing=SPEC)
    assert pred.model_version == "2"
    assert pred.probability == pytest.approx(expected_probability(files["cr"], **V2), abs=1e-5)
    from medops.serving.repository import read_config

    post = read_config(triton["repo"], f"{name}_postprocess")
    # v2's, not the last try's
    assert post.parameters["threshold.2"].string_value == repr(V2_THRESHOLD)
    assert list(post.version_policy.specific.versions) == [2]


def test_a_version_that_fails_to_load_is_removed_and_v2_keeps_serving(triton, deployed, files):
    with pytest.raises(ServingError) as err:
        deploy_other(triton, "wrong_size", w=1.0, b=0.0, size=S + 4)
    msg = str(err.value)
    assert "not serving 'pneumonia_classifier' version 3: candidate check failed" in msg
    assert "item shape [32, 32, 1], config.pbtxt declares [28, 28, 1]" in msg
    assert msg.endswith("version 2 is still served")
    assert_v2_serves(triton, files)


def test_a_version_that_disagrees_with_its_golden_samples_is_not_served(triton, deployed, files):
    with pytest.raises(ServingError, match=r"golden check failed .* > 0\.0001 over 6 golden images"):
        deploy_other(triton, "drifted", w=2.0, b=0.0, golden={"w": 2.0, "b": 0.01})
    assert_v2_serves(triton, files)


def test_a_version_that_fails_once_promoted_is_undone_with_its_settings(triton, deployed, files):
    # Settings that break the ensemble (the smoke DICOM has 28 x 28 pixels): the candidate check
    # passes (it tests the classifier), the check after promotion fails, and everything goes
    # back to what it was: v2, and the preprocessing model's previous limit.
    from medops.serving.repository import read_config

    with pytest.raises(ServingError) as err:
        deploy_other(triton, "too_strict", w=1.0, b=0.0, max_pixels=100)
    msg = str(err.value)
    assert "version 3: it failed once promoted: DICOM check" in msg and "too_large" in msg
    assert msg.endswith("version 2 is still served")
    pre = read_config(triton["repo"], f"{triton['cfg'].model_name}_postprocess")
    assert pre.parameters["max_pixels"].string_value == str(MAX_PIXELS)
    assert not (triton["repo"] / f"{triton['cfg'].model_name}_dicom" / "3").exists()
    # the postprocess version written for it is gone too (not even its __pycache__ is left)
    assert list_versions(triton["repo"], f"{triton['cfg'].model_name}_postprocess") == [1, 2]
    assert_v2_serves(triton, files)
    [ct] = predict_files([files["ct"]], url=triton["info"].grpc_url,
                         model_name=triton["cfg"].model_name, preprocessing=SPEC)
    assert ct.error is None  # 128 x 128 passes the restored limit again


def test_golden_tolerance_is_respected(triton, deployed, files):
    # The same drift passes with a tolerance above it, and the new version then serves; roll back.
    result = deploy_other(triton, "tolerated", w=2.0, b=0.0, golden={"w": 2.0, "b": 0.001},
                          golden_atol=1e-3)
    assert result.version == 3 and result.previous_version == 2
    assert 1e-4 < result.golden_max_abs_diff <= 1e-3
    back = rollback(triton["cfg"], repository=triton["repo"], url=triton["info"].grpc_url,
                    preprocessing=SPEC)
    assert (back.from_version, back.to_version) == (3, 2)
    remove_version(triton["repo"], triton["cfg"].model_name, 3)
    assert_v2_serves(triton, files)


def test_new_preprocessing_settings_reach_the_server_for_the_served_model(triton, deployed, files):
    # The served v2 again, with a pixel limit that lets the 140 x 140 file through: not
    # "unchanged" (its ONNX and threshold are), but a new version served with the new settings.
    from medops.serving.repository import read_config

    base, cfg, repo = triton["base"], triton["cfg"], triton["repo"]
    onnx_path = base / "export2" / "model.onnx"
    again = dict(onnx=onnx_path, gate=base / "gate2.json",
                 export_result=onnx_path.with_name("export.json"), repository=repo,
                 url=triton["info"].grpc_url, protocol="grpc", preprocessing=SPEC)
    wider_cfg = cfg.model_copy(update={"max_image_pixels": 4 * MAX_PIXELS})
    wider = deploy(wider_cfg, **again)
    assert not wider.unchanged and (wider.version, wider.previous_version) == (3, 2)
    pre = read_config(repo, f"{cfg.model_name}_postprocess")
    assert pre.parameters["max_pixels"].string_value == str(4 * MAX_PIXELS)
    [big] = predict_files([files["big"]], url=triton["info"].grpc_url, model_name=cfg.model_name,
                          preprocessing=SPEC)
    assert big.error is None and big.model_version == "3"
    # the same settings again: now it is unchanged
    assert deploy(wider_cfg, **again).unchanged
    back = rollback(cfg, repository=repo, url=triton["info"].grpc_url, preprocessing=SPEC)
    assert (back.from_version, back.to_version) == (3, 2)
    remove_version(repo, cfg.model_name, 3)
    assert_v2_serves(triton, files)


OLD_RECORDER_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "drift_features" data_type: TYPE_STRING dims: [ -1, 1 ] }} ]
output [ {{ name: "recorded" data_type: TYPE_STRING dims: [ -1, 1 ] }} ]
"""
OLD_RECORDER_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
            "recorded", pb_utils.get_input_tensor_by_name(r, "drift_features").as_numpy())])
            for r in requests]
"""


def test_a_switch_retires_the_drift_recorder_model_of_an_older_repository(triton, deployed, files):
    # Repositories written before the postprocessing model recorded had a `<name>_recorder`
    # model; the ensemble deploy writes now no longer calls it, so a switch unloads and removes
    # it rather than loading it again on every deploy.
    import tritonclient.grpc as grpcclient

    cfg, repo, url = triton["cfg"], triton["repo"], triton["info"].grpc_url
    name = f"{cfg.model_name}_recorder"
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(OLD_RECORDER_CONFIG.format(name=name))
    (repo / name / "1" / "model.py").write_text(OLD_RECORDER_MODEL)
    client = grpcclient.InferenceServerClient(url)
    try:
        client.load_model(name)
        assert client.is_model_ready(name)
        back = rollback(cfg, repository=repo, url=url, preprocessing=SPEC)
        assert (back.from_version, back.to_version) == (2, 1)
        assert not (repo / name).exists()
        assert not client.is_model_ready(name)
        forward = rollback(cfg, repository=repo, url=url, preprocessing=SPEC, to_version=2)
        assert (forward.from_version, forward.to_version) == (1, 2)
        assert not (repo / name).exists() and not client.is_model_ready(name)
    finally:
        client.close()
    assert_v2_serves(triton, files)


def test_rollback_serves_the_previous_version_and_forward_again(triton, deployed, files,
                                                               cli_project, capsys):
    cfg, repo, url = triton["cfg"], triton["repo"], triton["info"].http_url
    back = rollback(cfg, repository=repo, url=url, protocol="http", preprocessing=SPEC)
    assert (back.from_version, back.to_version) == (2, 1)
    assert back.golden_max_abs_diff is not None and back.golden_max_abs_diff <= 1e-4
    [pred] = predict_files([files["cr"]], url=url, protocol="http", model_name=cfg.model_name,
                           preprocessing=SPEC)
    assert pred.model_version == "1"
    assert pred.probability == pytest.approx(expected_probability(files["cr"], **V1), abs=1e-5)
    # v1's own threshold (0.5, from its deploy.json) came back with it: p = 0.552 -> pneumonia
    assert back.threshold == 0.5 and pred.label == "pneumonia"
    with pytest.raises(ServingError, match="no version of 'pneumonia_classifier' older than the served version 1"):
        rollback(cfg, repository=repo, url=url, protocol="http", preprocessing=SPEC)
    # forward again with `medops rollback --json`
    code, forward = medops_json(capsys, "--project", str(cli_project), "rollback", "--to", "2",
                                "--url", url, "--protocol", "http")
    assert code == 0
    assert (forward["from_version"], forward["to_version"], forward["threshold"]) == (1, 2, V2_THRESHOLD)
    assert forward["model_name"] == cfg.model_name and forward["golden_max_abs_diff"] <= 1e-4
    assert_v2_serves(triton, files)


def test_unknown_model_is_a_clear_error(triton, files):
    with pytest.raises(ServingError, match="model 'nope_dicom' is not loaded or not ready"):
        predict_files([files["cr"]], url=triton["info"].grpc_url, model_name="nope", preprocessing=SPEC)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_down_is_a_clear_error(files, protocol, free_port):
    url = f"127.0.0.1:{free_port()}"
    with pytest.raises(ServingError, match=f"cannot reach Triton at {url} over {protocol}"):
        predict_files([files["cr"]], url=url, protocol=protocol, model_name="m", preprocessing=SPEC,
                      timeout=5)


def test_triton_exposes_the_metrics_the_autoscaler_reads(triton, deployed, files):
    """deploy/k8s scales on Triton metrics by name: the real server must export them, per model."""
    import urllib.request

    from test_deploy_manifests import triton_metrics_used

    predict_files([files["cr"]], url=triton["info"].grpc_url, model_name=triton["cfg"].model_name,
                  preprocessing=SPEC)
    with urllib.request.urlopen(triton["info"].metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    for metric in triton_metrics_used():
        assert re.search(rf'^{metric}\{{model="{triton["cfg"].model_name}",version="2"\}} \d',
                         text, re.M), f"{metric} missing from Triton's /metrics"


def test_a_second_deploy_at_the_same_time_is_refused(triton, deployed):
    import fcntl

    with open(triton["repo"] / ".deploy.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running deploy holds it
        with pytest.raises(ServingError, match="another deploy or rollback is running"):
            rollback(triton["cfg"], repository=triton["repo"], url=triton["info"].grpc_url,
                     preprocessing=SPEC)
        # the served and available versions are read under the lock, not before it
        with pytest.raises(ServingError, match="another deploy or rollback is running"):
            rollback(triton["cfg"], repository=triton["repo"], url=triton["info"].grpc_url,
                     preprocessing=SPEC, to_version=99)
    assert served_version(triton["repo"], triton["cfg"].model_name) == 2


def test_a_restarted_server_serves_what_was_deployed(triton, deployed, files):
    """Stop and start on the same repository: every model (classifier pinned to v2, ensemble,
    pre/postprocessing) loads at startup, so answers are unchanged. Runs last: it restarts the
    module's server."""
    from medops.serving.server import start_server, stop_server

    assert stop_server(triton["state"])
    info = start_server(triton["cfg"], repository=triton["repo"], state_dir=triton["state"])
    assert info.grpc_url == triton["info"].grpc_url
    preds = predict_files([files["ct"], files["cr"]], url=info.grpc_url,
                          model_name=triton["cfg"].model_name, preprocessing=SPEC)
    assert [p.model_version for p in preds] == ["2", "2"]
    assert preds[1].probability == pytest.approx(expected_probability(files["cr"], **V2), abs=1e-5)
