"""The OOD guard: its arithmetic worked out by hand, the ood stage on real chest films (a CT from
pydicom's corpus scores far above the threshold, val chest films mostly below), the exported
graph answering the same as the reference, and the gate refusing a detector off its target."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from _ingested import build_trained
from conftest import pydicom_file
from medops.config import ExportConfig, GateConfig, OodConfig, PreprocessSpec
from medops.errors import MedopsError
from medops.learn import ood
from medops.stages import export, gate
from medops.stages import ood as ood_stage


def test_mahalanobis_of_a_point_is_worked_out_by_hand():
    # two classes at (0,0) and (4,0), shared covariance diag(1, 4) (no shrinkage)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((20000, 2)) * [1.0, 2.0]
    labels = np.repeat([0, 1], 10000)
    feats = base + np.where(labels[:, None] == 1, [4.0, 0.0], [0.0, 0.0])
    whiten, means_w = ood.fit_mahalanobis(feats, labels, shrinkage=0.0)
    # the point (1, 2): to class 0 d^2 = 1/1 + 4/4 = 2; to class 1 d^2 = 9 + 1 = 10 -> min 2
    got = np.exp(ood.mahalanobis_log(np.array([[1.0, 2.0]]), whiten, means_w))[0]
    assert got == pytest.approx(2.0, rel=0.03)


def test_combined_score_takes_the_larger_and_the_reconstruction_both_ways():
    mean, std = np.array([1.0, 10.0]), np.array([0.5, 2.0])
    scores = np.array([[2.0, 10.0],    # z = (2, 0)  -> 2
                       [0.0, 12.0],    # z = (-2, 1) -> |-2| = 2 (reconstructed too well: blur)
                       [1.0, 16.0]])   # z = (0, 3)  -> 3
    assert ood.combine(scores, mean, std).tolist() == [2.0, 2.0, 3.0]
    det = ood.Detector(np.eye(1), np.zeros((1, 1)), mean, std, threshold=2.5)
    assert ood.ood_scores(scores, det).tolist() == pytest.approx([0.8, 0.8, 1.2])


def test_threshold_gives_the_stated_false_alarm_rate_and_must_be_positive():
    combined = np.arange(1, 101, dtype=float)  # 1..100
    t = ood.choose_threshold(combined, 0.05)
    assert (combined > t).mean() == pytest.approx(0.05, abs=0.011)
    with pytest.raises(MedopsError, match="not positive"):
        ood.choose_threshold(-combined, 0.05)


def test_auroc_counts_pairs_and_ties():
    assert ood.auroc([0, 1], [2, 3]) == 1.0
    assert ood.auroc([2, 3], [0, 1]) == 0.0
    assert ood.auroc([1, 1], [1, 1]) == 0.5


@pytest.mark.parametrize("kind", ood.CORRUPTIONS)
def test_corruptions_change_the_image_and_keep_its_shape_and_range(kind):
    x = np.random.default_rng(1).random((3, 28, 28, 1)).astype(np.float32)
    y = ood.corrupt(x, kind, seed=0)
    assert y.shape == x.shape and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
    assert not np.allclose(x, y)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    trained = build_trained(tmp_path_factory.mktemp("ood"),
                            n_per_split={"train": 600, "val": 200, "test": 40}, epochs=2)
    out = trained["model"].parent
    cfg = OodConfig(ae_epochs=4)
    result = ood_stage.run(cfg, model=trained["model"], ingested_dir=trained["ingested"],
                           split=trained["split"], train_result=trained["train_result"],
                           out_dir=out / "ood")
    exported = export.run(ExportConfig(), model=trained["model"], ingested_dir=trained["ingested"],
                          split=trained["split"], train_result=trained["train_result"],
                          onnx_out=out / "model.onnx", result_out=out / "export.json",
                          ood_dir=out / "ood")
    return trained, result, exported


@pytest.mark.slow
def test_the_stage_calibrates_on_val_and_records_its_check(guarded):
    trained, result, _ = guarded
    record = json.loads((trained["model"].parent / "ood" / "ood.json").read_text())
    assert record["threshold"] == result.threshold > 0
    assert record["n_train"] == result.n_train and result.n_val > 100
    # in sample the threshold flags the stated share of val; out of sample it stays near it
    assert result.val_false_alarm_rate_in_sample == pytest.approx(0.05, abs=0.01)
    assert abs(result.val_false_alarm_rate - 0.05) < 0.04
    assert result.near_ood_val_auroc["inverted"] > 0.9 and result.near_ood_val_auroc["noise"] > 0.9


@pytest.mark.slow
def test_exported_graph_flags_a_ct_and_passes_chest_films(guarded):
    import onnxruntime as ort

    from medops.data import load_split_images
    from medops.dicom.pixels import preprocess_file

    trained, _, exported = guarded
    assert [o.name for o in exported.outputs] == ["probability", "ood_score", "in_distribution"]
    assert [o.dtype for o in exported.outputs] == ["float32", "float32", "bool"]
    assert exported.ood is not None and exported.ood.parity_max_abs_diff <= 1e-3
    model = onnx.load(exported.onnx_path)
    meta = {p.key: p.value for p in model.metadata_props}
    assert float(meta["ood_threshold"]) == pytest.approx(exported.ood.threshold)
    session = ort.InferenceSession(exported.onnx_path, providers=["CPUExecutionProvider"])
    ct = preprocess_file(pydicom_file("CT_small.dcm"), PreprocessSpec(image_size=28))[None, :, :, None]
    val, _, _ = load_split_images(trained["ingested"], trained["split"], "val")
    _, ct_score, ct_in = session.run(None, {"image": ct.astype(np.float32)})
    _, val_scores, val_in = session.run(None, {"image": val})
    assert ct_score[0, 0] > 1.0 and not ct_in[0, 0]
    assert val_in.mean() >= 0.9 and np.array_equal(val_in, val_scores <= 1.0)
    golden = np.load(exported.golden_path)
    assert golden["in_distribution"].shape == golden["ood_scores"].shape == (len(golden["images"]), 1)
    assert not golden["in_distribution"][-2:].all()  # the inverted films among the golden samples


def _gate(tmp_path, record):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"auc": 0.95, "accuracy": 0.9, "sensitivity": 0.9, "specificity": 0.9}))
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"data_version": "dv"}))
    ood_json = tmp_path / "ood.json"
    if record is not None:
        ood_json.write_text(json.dumps(record))
    return gate.run(GateConfig(compare_with_serving=False), metrics=metrics, train_result=train,
                    out=tmp_path / "gate.json", ood_result=ood_json)


def test_gate_refuses_a_detector_off_its_false_alarm_target_and_says_why(tmp_path):
    bad = _gate(tmp_path, {"val_false_alarm_rate": 0.21, "false_alarm_rate_target": 0.05})
    assert not bad.passed
    written = json.loads((tmp_path / "gate.json").read_text())
    assert written["passed"] is False
    assert any(r.startswith("ood val false-alarm rate 0.210 is 0.160 off its target 0.050")
               and r.endswith("fail") for r in written["reasons"])
    good = _gate(tmp_path, {"val_false_alarm_rate": 0.06, "false_alarm_rate_target": 0.05})
    assert good.passed and any(r.startswith("ood val") and r.endswith("pass") for r in good.reasons)


def test_gate_refuses_a_model_whose_guard_was_never_fitted(tmp_path):
    decision = _gate(tmp_path, None)
    assert not decision.passed and "ood guard record missing (run the ood stage): fail" in decision.reasons


@pytest.mark.slow
def test_gate_refuses_a_real_detector_whose_threshold_misses_on_held_out_val(guarded, tmp_path):
    # the stage's own record passes; the same guard with a target it was not calibrated for fails
    trained, result, _ = guarded
    record = json.loads((trained["model"].parent / "ood" / "ood.json").read_text())
    assert _gate(tmp_path, record).passed
    assert not _gate(tmp_path, {**record, "false_alarm_rate_target": 0.20}).passed
