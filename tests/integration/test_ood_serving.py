"""The OOD guard through the real embedded tritonserver, on real data.

A small simple_cnn trained on the bundled PneumoniaMNIST, its guard fitted by the ood stage and
exported into one ONNX graph. Served beside an older model exported without a guard:

- the old model still serves (``ood_score`` null in every answer);
- a CT from pydicom's test files is flagged out of distribution and a chest film (a test-split
  image as a CR file) is not, through the DICOM ensemble and the tensor path, in ``medops
  predict``'s table and JSON;
- a rollout to a version whose detector has another threshold moves classifier and detector
  together, and a rollback restores both;
- ``serving.ood_action: withhold`` leaves the CT without a label, with the reason.

Runs the Triton Python-backend stub, which imports medops from the Triton environment
(``.venv-triton``, see medops.serving.server): run it with one that has this tree installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import pydicom_file
from medops.cli import main
from medops.config import ExportConfig, OodConfig, PreprocessSpec, ServingConfig, update_params_file
from medops.learn.ood import Detector
from medops.serving.client import predict_files
from medops.serving.deploy import deploy, rollback
from medops.serving.server import start_server, stop_server
from test_triton_serving import (
    write_bundled_dicom,
    write_export_result,
    write_gate,
    write_golden,
    write_tiny_onnx,
)

pytestmark = [pytest.mark.triton, pytest.mark.slow]

S = 28
SPEC = PreprocessSpec(image_size=S)


def _export_guarded(trained: dict, out: Path, ood_dir: Path) -> Path:
    from medops.stages import export

    result = export.run(ExportConfig(), model=trained["model"], ingested_dir=trained["ingested"],
                        split=trained["split"], train_result=trained["train_result"],
                        onnx_out=out / "model.onnx", result_out=out / "export.json", ood_dir=ood_dir)
    assert result.ood is not None
    # deploy checks the gate judged the exported data version
    record = json.loads((out / "export.json").read_text())
    assert record["data_version"] == "test-data-version"
    return out / "model.onnx"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two guarded exports of one classifier: ``a`` as the ood stage fitted it, ``b`` with its
    detector's threshold halved (every ood_score doubled), and an old unguarded one."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from _ingested import build_trained
    from medops.stages import ood as ood_stage

    base = tmp_path_factory.mktemp("ood-models")
    trained = build_trained(base, n_per_split={"train": 900, "val": 240, "test": 60}, epochs=2)
    ood_a = base / "ood-a"
    ood_stage.run(OodConfig(ae_epochs=5), model=trained["model"], ingested_dir=trained["ingested"],
                  split=trained["split"], train_result=trained["train_result"], out_dir=ood_a)
    ood_b = base / "ood-b"
    shutil.copytree(ood_a, ood_b)
    det = Detector.load(ood_a / "detector.npz")
    Detector(det.whiten, det.class_means_w, det.mean, det.std, det.threshold / 2).save(
        ood_b / "detector.npz")
    old = write_tiny_onnx(base / "old" / "model.onnx", w=4.0, b=-2.0)
    write_golden(old, w=4.0, b=-2.0)
    write_export_result(old, data_version="test-data-version")
    return {"old": old, "a": _export_guarded(trained, base / "a", ood_a),
            "b": _export_guarded(trained, base / "b", ood_b), "base": base}


@pytest.fixture(scope="module")
def triton(tmp_path_factory, free_port):
    base = tmp_path_factory.mktemp("triton-ood")
    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=60)
    state, repo = base / "state", base / "repository"
    info = start_server(cfg, repository=repo, state_dir=state)
    try:
        yield {"cfg": cfg, "info": info, "state": state, "repo": repo, "base": base}
    finally:
        stop_server(state)


N_CHEST = 10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The CT, and ten chest films of the test split as CR files: one in twenty in-distribution
    films is flagged by design (the 5 % false-alarm rate), so a test about "a chest film" asks
    that most of ten pass, which holds whatever CPU trained the model."""
    import pydicom

    d = tmp_path_factory.mktemp("ood-files")
    chests = []
    for i in range(N_CHEST):
        path = write_bundled_dicom(d / f"chest{i}.dcm", index=i)
        # the full-range VOI window medops synth writes: served pixels are x/255, as in training
        ds = pydicom.dcmread(path)
        ds.WindowCenter, ds.WindowWidth = "128", "256"
        ds.save_as(path, enforce_file_format=True)
        chests.append(path)
    return {"ct": pydicom_file("CT_small.dcm"), "chests": chests}


def _deploy(triton, onnx: Path, cfg: ServingConfig | None = None):
    return deploy(cfg or triton["cfg"], onnx=onnx,
                  gate=write_gate(onnx.with_name("gate.json"), passed=True, data_version="test-data-version"),
                  export_result=onnx.with_name("export.json"), repository=triton["repo"],
                  url=triton["info"].grpc_url, protocol="grpc", preprocessing=SPEC)


def _ask(triton, files, via="ensemble", **kw):
    """``[ct, chest films ...]`` answered."""
    return predict_files([files["ct"], *files["chests"]], url=triton["info"].grpc_url,
                         model_name=triton["cfg"].model_name, preprocessing=SPEC, via=via, **kw)


@pytest.fixture(scope="module")
def served(triton, models, files):
    """The history the tests read: v1 old (unguarded), v2 guard a, v3 guard b."""
    history = {}
    assert _deploy(triton, models["old"]).version == 1
    history["old"] = {via: _ask(triton, files, via) for via in ("ensemble", "tensor")}
    assert _deploy(triton, models["a"]).version == 2
    history["a"] = {via: _ask(triton, files, via) for via in ("ensemble", "tensor")}
    assert _deploy(triton, models["b"]).version == 3
    history["b"] = _ask(triton, files)
    back = rollback(triton["cfg"], repository=triton["repo"], url=triton["info"].grpc_url,
                    protocol="grpc", preprocessing=SPEC)
    assert (back.from_version, back.to_version) == (3, 2)
    history["back"] = _ask(triton, files)
    return history


def test_a_model_exported_before_the_guard_is_still_served_without_scores(served):
    for via, (ct, chest, *_) in served["old"].items():
        assert ct.error is None and chest.error is None, via
        assert ct.model_version == chest.model_version == "1"
        assert ct.label in ("normal", "pneumonia") and 0 <= ct.probability <= 1
        assert ct.ood_score is None and ct.in_distribution is None and ct.reason is None


@pytest.mark.parametrize("via", ["ensemble", "tensor"])
def test_a_ct_is_flagged_and_a_chest_film_is_not(served, via):
    ct, *chests = served["a"][via]
    assert {p.model_version for p in [ct, *chests]} == {"2"}
    assert ct.in_distribution is False and ct.ood_score > 1.0
    passed = [p for p in chests if p.in_distribution]
    assert len(passed) >= N_CHEST - 2, [p.ood_score for p in chests]
    assert all(p.ood_score <= 1.0 for p in passed) and all(p.ood_score > 1.0 for p in chests
                                                            if p.in_distribution is False)
    # flag, the default action: the label is kept
    assert ct.label in ("normal", "pneumonia") and ct.reason is None


def test_both_paths_give_the_same_scores(served):
    ens, ten = served["a"]["ensemble"], served["a"]["tensor"]
    for e, t in zip(ens, ten):
        assert e.ood_score == pytest.approx(t.ood_score, abs=1e-5)
        assert e.probability == pytest.approx(t.probability, abs=1e-6)


def test_rollout_and_rollback_switch_classifier_and_detector_together(served):
    a, b, back = served["a"]["ensemble"], served["b"], served["back"]
    for before, after, restored in zip(a, b, back):
        assert after.model_version == "3" and restored.model_version == "2"
        # same classifier, detector threshold halved: each score doubles, probability the same
        assert after.ood_score == pytest.approx(2 * before.ood_score, rel=1e-4)
        assert after.probability == pytest.approx(before.probability, abs=1e-6)
        assert (restored.ood_score, restored.in_distribution, restored.probability) == \
            pytest.approx((before.ood_score, before.in_distribution, before.probability), abs=1e-6)


def test_medops_predict_says_it_plainly_and_json_carries_the_fields(served, triton, files,
                                                                   tmp_path, repo_root, capsys):
    cfg = triton["cfg"]
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    update_params_file(tmp_path / "params.yaml", {"serving": {
        "repository": str(triton["repo"]), "http_port": cfg.http_port, "grpc_port": cfg.grpc_port,
        "metrics_port": cfg.metrics_port}})
    chest = next(f for f, p in zip(files["chests"], served["back"][1:]) if p.in_distribution)
    assert main(["--project", str(tmp_path), "predict", str(files["ct"]), str(chest)]) == 0
    table = capsys.readouterr().out.splitlines()
    [ct_line] = [line for line in table if "CT_small" in line]
    [chest_line] = [line for line in table if chest.name in line]
    assert "OUT OF DISTRIBUTION (ood_score " in ct_line and ct_line.endswith(" > 1)")
    assert "OUT OF DISTRIBUTION" not in chest_line
    with capsys.disabled():
        print("\n" + "\n".join(table))  # the README's example (pytest -s)
    assert main(["--project", str(tmp_path), "predict", str(files["ct"]), "--json"]) == 0
    [pred] = json.loads(capsys.readouterr().out)["predictions"]
    assert pred["in_distribution"] is False and pred["ood_score"] > 1.0


def test_withhold_gives_an_out_of_distribution_answer_no_label_and_the_reason(served, triton, models, files):
    cfg = triton["cfg"].model_copy(update={"ood_action": "withhold"})
    try:
        assert _deploy(triton, models["a"], cfg).version == 4
        for via in ("ensemble", "tensor"):
            ct, *chests = _ask(triton, files, via, ood_action="withhold")
            assert ct.label is None and ct.error is None and ct.probability is not None, via
            assert ct.reason.startswith("out of distribution (ood_score ") and "withheld" in ct.reason
            for chest in chests:  # exactly the flagged ones lose their label
                assert (chest.label is None) == (chest.in_distribution is False), via
                assert (chest.reason is None) == (chest.in_distribution is True), via
    finally:
        rollback(triton["cfg"], repository=triton["repo"], url=triton["info"].grpc_url,
                 protocol="grpc", preprocessing=SPEC, to_version=2)
    ct, *_ = _ask(triton, files)
    assert ct.label is not None and ct.in_distribution is False  # flag again
