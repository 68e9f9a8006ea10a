"""export: ONNX with the contract names, parity with Keras, metadata, golden samples; a tampered
model trips the parity check."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from _ingested import build_trained
from medops.stages import export
from medops.config import ExportConfig
from medops.errors import ExportParityError
from medops.data import load_split_images


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    trained = build_trained(tmp_path_factory.mktemp("export"), n_per_split={"train": 200, "val": 80, "test": 40}, epochs=1)
    out = trained["model"].parent
    result = export.run(
        ExportConfig(), model=trained["model"], ingested_dir=trained["ingested"], split=trained["split"],
        train_result=trained["train_result"], onnx_out=out / "model.onnx", result_out=out / "export.json",
    )
    return trained, result


@pytest.mark.slow
def test_onnx_has_contract_names_shapes_and_metadata(exported):
    trained, result = exported
    model = onnx.load(result.onnx_path)
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["probability"]
    assert result.input.shape == ["batch", 28, 28, 1] and result.output.shape == ["batch", 1]
    assert model.opset_import[0].version == 17
    props = {p.key: p.value for p in model.metadata_props}
    assert props["data_version"] == "test-data-version"
    assert props["model"] == "simple_cnn" and props["input_size"] == "28"
    threshold = json.loads(trained["train_result"].read_text())["decision_threshold"]
    assert float(props["decision_threshold"]) == pytest.approx(threshold) == result.decision_threshold
    assert json.loads(props["train_params"])["train"]["filters"] == [16, 32, 64]
    record = json.loads((trained["model"].parent / "export.json").read_text())
    assert record["sha256"] == export.sha256_file(trained["model"].parent / "model.onnx")
    assert record["data_version"] == "test-data-version"


@pytest.mark.slow
def test_onnx_matches_keras_on_every_val_image(exported):
    trained, result = exported
    assert result.n_parity_samples == 64 and result.parity_max_abs_diff <= 1e-4
    x, _, _ = load_split_images(trained["ingested"], trained["split"], "val")
    keras_out = keras.saving.load_model(trained["model"], compile=False).predict(x, verbose=0)
    onnx_out = export.run_onnx(Path(result.onnx_path), x)
    assert onnx_out.shape == (80, 1)
    np.testing.assert_allclose(onnx_out, keras_out, atol=1e-4)


@pytest.mark.slow
def test_golden_samples_hold_both_classes_and_keras_outputs(exported):
    trained, result = exported
    golden = np.load(result.golden_path)
    assert golden["images"].shape == (8, 28, 28, 1) and golden["images"].dtype == np.float32
    assert sorted(golden["labels"].tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    keras_out = keras.saving.load_model(trained["model"], compile=False).predict(golden["images"], verbose=0)
    np.testing.assert_allclose(golden["probabilities"], keras_out, atol=1e-6)
    x, _, rows = load_split_images(trained["ingested"], trained["split"], "val")
    by_uid = dict(zip(rows["sop_instance_uid"], x))
    for uid, img in zip(golden["sop_instance_uids"], golden["images"]):
        np.testing.assert_array_equal(by_uid[str(uid)], img)


@pytest.mark.slow
def test_a_tampered_weight_trips_the_parity_check(exported):
    trained, result = exported
    model = onnx.load(result.onnx_path)
    # Nudge the largest initializer (a conv/dense kernel) by 5%: still a valid model, wrong outputs.
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(init) * 1.05
    init.CopyFrom(numpy_helper.from_array(weights.astype(np.float32), init.name))
    x, _, _ = load_split_images(trained["ingested"], trained["split"], "val")
    keras_out = keras.saving.load_model(trained["model"], compile=False).predict(x[:32], verbose=0)
    tampered = export.run_onnx(model.SerializeToString(), x[:32])
    with pytest.raises(ExportParityError, match=r"max \|keras - onnx\| = .* > parity_atol 0.0001 on 32 samples"):
        export.check_parity(keras_out, tampered, 1e-4)
    # The untampered model passes the same check.
    assert export.check_parity(keras_out, export.run_onnx(onnx.load(result.onnx_path).SerializeToString(), x[:32]), 1e-4) <= 1e-4


@pytest.mark.slow
def test_failed_parity_leaves_no_onnx_file(exported, tmp_path, monkeypatch):
    trained, _ = exported
    real = export.run_onnx
    monkeypatch.setattr(export, "run_onnx", lambda m, x: real(m, x) + 0.01)  # a converter bug
    with pytest.raises(ExportParityError, match="0.01"):
        export.run(
            ExportConfig(), model=trained["model"], ingested_dir=trained["ingested"], split=trained["split"],
            train_result=trained["train_result"], onnx_out=tmp_path / "model.onnx", result_out=tmp_path / "export.json",
        )
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "export.json").exists()


# EfficientNetB0 converts too (checked by hand: max diff 6e-8) but takes ~45 s on 2 cores.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["simple_cnn", "resnet", "vit"])
def test_every_fast_architecture_converts_with_parity(name):
    from medops.config import TrainConfig
    from medops.models import build_model

    model = build_model(name, TrainConfig(model=name, filters=[8, 16, 32], dense_units=16), (28, 28, 1))
    proto = export.convert_to_onnx(model, 28, 17, {"data_version": "v"})
    x = np.random.default_rng(0).random((16, 28, 28, 1), dtype=np.float32)
    assert export.check_parity(model.predict(x, verbose=0), export.run_onnx(proto.SerializeToString(), x), 1e-4) <= 1e-4


def test_a_model_onnxruntime_cannot_load_is_a_parity_error():
    with pytest.raises(ExportParityError, match="does not load in onnxruntime"):
        export.run_onnx(b"not an onnx model", np.zeros((1, 28, 28, 1), np.float32))
