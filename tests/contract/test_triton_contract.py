"""The Triton contract: both config.pbtxt flavours parse with Triton's own protobuf and agree on
everything a client sees; the committed production template is the rendering; the Python-backend
batching logic answers one response per request; the serving/client path imports no TensorFlow."""

from __future__ import annotations

import json

import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from medops.config import PreprocessSpec, ServingConfig
from medops.serving.backends.onnx_classifier import classify_batch
from medops.serving.contract import (
    build_contract,
    build_ensemble_contract,
    render_config,
    render_ensemble_config,
    render_postprocess_config,
    render_preprocess_config,
)
from medops.serving.repository import DEPLOY_REPOSITORY, render_production_repository


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def client_view(cfg: mc.ModelConfig) -> dict:
    """Everything a client can observe: name, tensors (name, dtype, dims), batching."""
    return {
        "name": cfg.name,
        "max_batch_size": cfg.max_batch_size,
        "inputs": [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input],
        "outputs": [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in cfg.output],
        "preferred": list(cfg.dynamic_batching.preferred_batch_size),
        "delay_us": cfg.dynamic_batching.max_queue_delay_microseconds,
        "labels": cfg.parameters["labels"].string_value,
    }


@pytest.fixture
def contract(params):
    return build_contract(params.serving, image_size=params.ingest.image_size)


def test_both_flavours_parse_and_agree_on_the_client_view(contract, params):
    prod = parse(render_config(contract, "production"))
    emb = parse(render_config(contract, "embedded"))
    assert client_view(prod) == client_view(emb)
    s = params.ingest.image_size
    assert client_view(prod) == {
        "name": params.serving.model_name,
        "max_batch_size": params.serving.max_batch_size,
        "inputs": [("image", "TYPE_FP32", [s, s, 1])],
        "outputs": [("probability", "TYPE_FP32", [1]), ("ood_score", "TYPE_FP32", [1]),
                    ("in_distribution", "TYPE_BOOL", [1])],
        "preferred": sorted(params.serving.preferred_batch_sizes),
        "delay_us": params.serving.max_queue_delay_us,
        "labels": "normal,pneumonia",
    }


def test_flavours_differ_only_in_backend_and_device(contract):
    prod = parse(render_config(contract, "production"))
    emb = parse(render_config(contract, "embedded"))
    assert (prod.platform, prod.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert (emb.platform, emb.backend) == ("", "python")
    assert [g.kind for g in prod.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert [g.kind for g in emb.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]


def test_committed_production_repository_is_the_rendering(params):
    ec = build_ensemble_contract(params.serving, params.ingest.preprocessing,
                                 threshold=params.evaluate.threshold)
    expected = render_production_repository(ec)
    committed = {p.relative_to(DEPLOY_REPOSITORY).as_posix(): p.read_text()
                 for p in DEPLOY_REPOSITORY.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    hint = ("deploy/model_repository is out of date with the contract: re-render it with "
            "medops.serving.repository.write_production_repository(ec)")
    assert sorted(committed) == sorted(expected), hint
    for rel, text in expected.items():
        assert committed[rel] == text, f"{rel}: {hint}"


def test_contract_follows_settings():
    cfg = ServingConfig(model_name="other", max_batch_size=4, preferred_batch_sizes=[4, 2],
                        max_queue_delay_us=0)
    view = client_view(parse(render_config(build_contract(cfg, image_size=64), "embedded")))
    assert view["name"] == "other"
    assert view["inputs"] == [("image", "TYPE_FP32", [64, 64, 1])]
    assert view["preferred"] == [2, 4]
    assert view["max_batch_size"] == 4


def test_preferred_batch_larger_than_max_is_refused():
    too_big = r"preferred_batch_sizes \[16\].*max_batch_size \(8\)"
    with pytest.raises(ValueError, match=too_big):  # when params load, before any contract
        ServingConfig(max_batch_size=8, preferred_batch_sizes=[8, 16])


def test_unknown_flavour_is_refused(contract):
    with pytest.raises(ValueError, match="unknown config flavour 'gpu'"):
        render_config(contract, "gpu")  # type: ignore[arg-type]


# -- the Python-backend model: one session.run per batch, one answer per request ------------------

def mean_model(batch: np.ndarray) -> np.ndarray:
    return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True)


def test_classify_batch_runs_all_requests_at_once_and_splits_answers():
    calls = []

    def run(batch):
        calls.append(batch.shape)
        return mean_model(batch)

    reqs = [np.full((2, 4, 4, 1), 0.25, np.float32), np.full((1, 4, 4, 1), 0.75, np.float32),
            np.full((3, 4, 4, 1), 1.0, np.float32)]
    answers = classify_batch(run, reqs, (4, 4, 1))
    assert calls == [(6, 4, 4, 1)]
    assert [a.shape for a in answers] == [(2, 1), (1, 1), (3, 1)]
    np.testing.assert_allclose(answers[0], 0.25)
    np.testing.assert_allclose(answers[1], 0.75)
    np.testing.assert_allclose(answers[2], 1.0)


def test_classify_batch_answers_a_bad_request_with_an_error_and_the_rest_normally():
    reqs = [np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 5, 5, 1), np.float32),
            np.full((1, 4, 4, 1), np.nan, np.float32), np.ones((2, 4, 4, 1), np.float32)]
    answers = classify_batch(mean_model, reqs, (4, 4, 1))
    assert len(answers) == 4
    assert "shape [1, 5, 5, 1], expected [-1, 4, 4, 1]" in answers[1]
    assert "NaN" in answers[2]
    np.testing.assert_allclose(answers[0], [[0.0]])
    np.testing.assert_allclose(answers[3], [[1.0], [1.0]])


def test_classify_batch_turns_a_failing_run_into_errors_not_an_exception():
    def broken(batch):
        raise RuntimeError("onnxruntime exploded")

    answers = classify_batch(broken, [np.zeros((1, 4, 4, 1), np.float32)] * 2, (4, 4, 1))
    assert answers == ["inference failed: RuntimeError: onnxruntime exploded"] * 2


def test_classify_batch_splits_every_output_of_a_guarded_model_per_request():
    def guarded(batch):
        p = mean_model(batch)
        return p, 2 * p, 2 * p <= 1.0

    reqs = [np.full((2, 4, 4, 1), 0.25, np.float32), np.full((1, 4, 4, 1), 0.75, np.float32)]
    (p0, s0, in0), (p1, s1, in1) = classify_batch(guarded, reqs, (4, 4, 1))
    assert p0.dtype == np.float32 and p0.shape == s0.shape == in0.shape == (2, 1)
    np.testing.assert_allclose(s0, 0.5)
    np.testing.assert_allclose(s1, 1.5)
    assert in0.all() and not in1.any()


def test_a_model_without_the_guard_answers_nan_scores_and_in_distribution():
    from medops.serving.backends.onnx_classifier import unguarded

    probs, scores, inside = unguarded(np.array([[0.2], [0.9]], np.float32))
    np.testing.assert_allclose(probs, [[0.2], [0.9]])
    assert np.isnan(scores).all() and scores.shape == (2, 1) and inside.dtype == bool and inside.all()


def test_postprocess_withholds_labels_of_out_of_distribution_items_only_when_asked():
    from medops.serving.backends.postprocess import label_items

    probs = np.array([[0.9], [0.1], [0.9]], np.float32)
    errors = [b"", b"", b"not_dicom: x"]
    inside = np.array([[False], [True], [True]])
    labels = ("normal", "pneumonia")
    flag = label_items(probs, errors, threshold=0.5, labels=labels, in_distribution=inside)
    withhold = label_items(probs, errors, threshold=0.5, labels=labels, in_distribution=inside,
                           withhold=True)
    assert flag.reshape(-1).tolist() == [b"pneumonia", b"normal", b""]
    assert withhold.reshape(-1).tolist() == [b"", b"normal", b""]


def test_postprocess_config_carries_the_ood_action():
    ec = build_ensemble_contract(ServingConfig(ood_action="withhold"), PreprocessSpec(image_size=28))
    params = parse(render_postprocess_config(ec, "embedded")).parameters
    assert params["ood_action"].string_value == "withhold"
    inputs = [t.name for t in parse(render_postprocess_config(ec, "production")).input]
    assert inputs == ["probability", "ood_score", "in_distribution", "error", "drift_features"]
    # embedded, it runs the classifier itself: the prepared image in, the classifier's answers out
    # embedded, it is the whole DICOM path: the ensemble's input and outputs, the preprocessing
    # settings beside its own
    embedded = parse(render_postprocess_config(ec, "embedded"))
    assert [t.name for t in embedded.input] == ["dicom"]
    assert [t.name for t in embedded.output] == ["probability", "ood_score", "in_distribution",
                                                 "label", "error"]
    assert embedded.parameters["classifier"].string_value == ec.classifier.name
    pre = parse(render_preprocess_config(ec, "production")).parameters
    assert {k: embedded.parameters[k].string_value for k in pre} == {
        k: v.string_value for k, v in pre.items()}


# -- import weight ----------------------------------------------------------------------------------

def test_serving_contract_and_client_import_without_tensorflow_or_tritonclient():
    code = (
        "import sys\n"
        "import medops.serving.contract, medops.serving.client, medops.serving.backends.onnx_classifier\n"
        "import medops.serving.backends.dicom_preprocess, medops.serving.backends.postprocess\n"
        "import medops.serving.backends.drift_recorder, medops.drift\n"
        "bad = [m for m in ('tensorflow', 'keras', 'tritonclient') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pinned_versions_render_a_specific_policy_and_nothing_else_changes(contract):
    pinned = parse(render_config(contract, "embedded", versions=[3]))
    assert list(pinned.version_policy.specific.versions) == [3]
    assert client_view(pinned) == client_view(parse(render_config(contract, "embedded")))
    # production serves the latest version unless deploy pins some (issue 4: a version policy)
    assert parse(render_config(contract, "production")).version_policy.latest.num_versions == 1
    assert list(parse(render_config(contract, "production", versions=[3])).version_policy.specific.versions) == [3]


# -- the DICOM ensemble ----------------------------------------------------------------------------

@pytest.fixture
def ensemble(params):
    return build_ensemble_contract(params.serving, params.ingest.preprocessing,
                                   threshold=params.evaluate.threshold)


def tensors(cfg: mc.ModelConfig, kind: str) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in getattr(cfg, kind)}


@pytest.mark.parametrize("record", [True, False])
@pytest.mark.parametrize("flavour", ["production", "embedded"])
def test_ensemble_steps_wire_matching_tensors(params, flavour, record):
    """Every step's input_map/output_map names a tensor of that model, and every ensemble tensor
    is produced and consumed with the same dtype and dims (what Triton checks at load time);
    every tensor produced is used (Triton refuses an unused one); embedded, the postprocessing
    model is the whole path (one step), in production preprocessing and the classifier are
    steps of their own (three); with recording on, the postprocessing model records (in
    production from the drift features) and the ensemble's outputs are the same."""
    cfg = params.serving.model_copy(update={"record": record})
    ensemble = build_ensemble_contract(cfg, params.ingest.preprocessing,
                                       threshold=params.evaluate.threshold)
    models = {
        ensemble.preprocess_name: parse(render_preprocess_config(ensemble, flavour)),
        ensemble.classifier.name: parse(render_config(ensemble.classifier, flavour)),
        ensemble.postprocess_name: parse(render_postprocess_config(ensemble, flavour)),
    }
    ens = parse(render_ensemble_config(ensemble, classifier_version=7, flavour=flavour))
    assert ens.platform == "ensemble" and list(ens.version_policy.specific.versions) == [7]
    produced = {name: spec for name, spec in tensors(ens, "input").items()}
    used = set(tensors(ens, "output"))
    for step in ens.ensemble_scheduling.step:
        model = models[step.model_name]
        assert model.max_batch_size == ens.max_batch_size
        for key, value in step.input_map.items():
            assert produced[value] == tensors(model, "input")[key], (step.model_name, key)
            used.add(value)
        for key, value in step.output_map.items():
            produced[value] = tensors(model, "output")[key]
    for name, spec in tensors(ens, "output").items():
        assert produced[name] == spec
    assert set(produced) == used
    steps = ens.ensemble_scheduling.step
    assert [s.model_version for s in steps] == ([-1, 7, 7] if flavour == "production" else [7])
    assert [s.model_name for s in steps][-1] == ensemble.postprocess_name
    if flavour == "production" and record:  # the drift features and the answer's OOD score
        assert {"drift_features", "error", "ood_score"} <= set(steps[-1].input_map)
    elif flavour == "production":
        assert "drift_features" not in set(steps[-1].input_map)
    recording = {"record_dir", "record_max_bytes", "record_keep"}
    assert (recording <= set(models[ensemble.postprocess_name].parameters)) is record
    assert tensors(ens, "output") == {"probability": ("TYPE_FP32", [1]),
                                      "ood_score": ("TYPE_FP32", [1]),
                                      "in_distribution": ("TYPE_BOOL", [1]),
                                      "label": ("TYPE_STRING", [1]), "error": ("TYPE_STRING", [1])}


def test_processing_parameters_carry_the_settings(params):
    from medops.config import Window

    spec = PreprocessSpec(image_size=64, window=Window(center=40, width=400), frame="max",
                          pixel_spacing=0.7)
    cfg = params.serving.model_copy(update={"max_request_bytes": 2000, "max_image_pixels": 500})
    ec = build_ensemble_contract(cfg, spec, threshold=0.3)
    pre = parse(render_preprocess_config(ec, "embedded")).parameters
    assert {k: v.string_value for k, v in pre.items()} == {
        "image_size": "64", "max_bytes": "2000", "max_pixels": "500", "frame": "max",
        "window_center": "40.0", "window_width": "400.0", "pixel_spacing": "0.7", "record": "true"}
    # what the preprocessing model reads back from them: the settings ingest used
    from medops.serving.backends.dicom_preprocess import TritonPythonModel

    model = TritonPythonModel()
    model.initialize({"model_config": json.dumps(
        {"parameters": {k: {"string_value": v.string_value} for k, v in pre.items()}})})
    assert model.spec == spec and (model.limits.max_bytes, model.limits.max_pixels) == (2000, 500)
    post = parse(render_postprocess_config(ec, "embedded")).parameters
    assert post["threshold"].string_value == "0.3"
    assert post["labels"].string_value == "normal,pneumonia"


def test_preprocess_items_uses_medops_preprocessing_and_reports_per_item():
    from conftest import pydicom_file
    from medops.dicom.pixels import preprocess_file
    from medops.serving.backends.dicom_preprocess import Limits, preprocess_items

    ct = pydicom_file("CT_small.dcm")
    data = ct.read_bytes()
    images, errors = preprocess_items([data, b"not dicom", data[:300]], PreprocessSpec(image_size=28),
                                      Limits(10**7, 10**7))
    assert images.shape == (3, 28, 28, 1) and images.dtype == np.float32
    np.testing.assert_array_equal(images[0, ..., 0], preprocess_file(ct, PreprocessSpec(image_size=28)))
    assert errors[0] == ""
    assert errors[1].startswith("not_dicom: ")
    assert errors[2] and not errors[2].startswith("too_large")
    assert not images[1].any() and not images[2].any()  # unusable items get blank images


def test_preprocess_limits_refuse_before_decoding():
    from conftest import pydicom_file
    from medops.serving.backends.dicom_preprocess import Limits, preprocess_items

    data = pydicom_file("CT_small.dcm").read_bytes()  # 128 x 128, one frame, one sample
    _, [err] = preprocess_items([data], PreprocessSpec(image_size=28), Limits(len(data) - 1, 10**7))
    assert err == f"too_large: {len(data)} bytes, over the limit of {len(data) - 1} bytes"
    _, [err] = preprocess_items([data], PreprocessSpec(image_size=28), Limits(10**7, 128 * 128 - 1))
    assert err == f"too_large: 128x128 pixels x 1 frames x 1 samples = 16384 values, over the limit of {128 * 128 - 1}"
    _, [err] = preprocess_items([data], PreprocessSpec(image_size=28), Limits(len(data), 128 * 128))
    assert err == ""


def test_postprocess_labels_at_the_threshold_and_blanks_errors():
    from medops.serving.backends.postprocess import label_items

    out = label_items(np.array([[0.2], [0.5], [0.9], [0.99]], np.float32),
                      [b"", b"", b"", b"not_dicom: x"], threshold=0.5, labels=("normal", "pneumonia"))
    assert out.shape == (4, 1)
    assert out.reshape(-1).tolist() == [b"normal", b"pneumonia", b"pneumonia", b""]


def test_production_config_has_warmup_version_policy_and_optional_tensorrt_fp16(params):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    def parse_text(text):
        return text_format.Parse(text, model_config_pb2.ModelConfig())

    contract = build_contract(params.serving, image_size=params.ingest.image_size)
    prod = parse_text(render_config(contract, "production"))
    assert prod.version_policy.latest.num_versions == 1
    sizes = sorted(w.batch_size for w in prod.model_warmup)
    assert sizes == sorted({1, *params.serving.preferred_batch_sizes, params.serving.max_batch_size})
    warm = prod.model_warmup[0].inputs["image"]
    assert warm.zero_data and list(warm.dims) == [params.ingest.image_size, params.ingest.image_size, 1]
    assert not prod.optimization.execution_accelerators.gpu_execution_accelerator  # off by default
    fp16 = parse_text(render_config(
        build_contract(params.serving.model_copy(update={"tensorrt_fp16": True}),
                       image_size=params.ingest.image_size), "production"))
    [trt] = fp16.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    # the embedded server (Python backend, CPU) gets none of these
    emb = parse_text(render_config(contract, "embedded"))
    assert not emb.model_warmup and not emb.HasField("version_policy")


def test_endpoint_is_the_url_of_the_protocol_for_settings_and_started_servers():
    from medops.serving.server import ServerInfo, endpoint

    cfg = ServingConfig(host="10.0.0.5", http_port=8100, grpc_port=8101)
    assert (endpoint(cfg, "grpc"), endpoint(cfg, "http")) == ("10.0.0.5:8101", "10.0.0.5:8100")
    info = ServerInfo(pid=1, host="0.0.0.0", http_port=8100, grpc_port=8101, metrics_port=8102,
                      repository="r", log_file="l", started_at="")
    assert (endpoint(info, "grpc"), endpoint(info, "http")) == ("127.0.0.1:8101", "127.0.0.1:8100")
    with pytest.raises(ValueError, match="protocol must be 'grpc' or 'http'"):
        endpoint(cfg, "tcp")


def test_preprocess_items_answers_a_decoder_panic_and_a_deflate_bomb_per_item():
    """What the fuzzer found: the RLE file that makes the Rust decoder panic and a deflate bomb
    are each one item's error; the good item beside them is answered (before the fix the panic,
    no Exception, escaped and failed every request of the call)."""
    from conftest import deflate_bomb, fuzz_file, pydicom_file
    from medops.dicom.pixels import preprocess_file
    from medops.serving.backends.dicom_preprocess import Limits, preprocess_items

    ct = pydicom_file("CT_small.dcm")
    bomb = deflate_bomb(256 << 20)  # under ingest's ceiling, over this server's byte limit
    images, errors = preprocess_items(
        [fuzz_file("rle_panic.dcm").read_bytes(), ct.read_bytes(), bomb], PreprocessSpec(image_size=28),
        Limits(64 << 20, 10**7))
    assert errors[0].startswith("decode_error: the RLE Lossless (1.2.840.10008.1.2.5) decoder "
                                "crashed on this file")
    assert errors[1] == ""
    np.testing.assert_array_equal(images[1, ..., 0], preprocess_file(ct, PreprocessSpec(image_size=28)))
    assert errors[2] == ("too_large: the deflated data set inflates to more than 67108864 bytes: "
                         "refused before inflating it")


def test_preprocess_items_turns_any_base_exception_into_that_items_error(monkeypatch):
    from conftest import pydicom_file
    from medops.dicom import pixels
    from medops.serving.backends.dicom_preprocess import Limits, preprocess_items

    class Panic(BaseException):  # as pyo3_runtime.PanicException
        pass

    data = pydicom_file("CT_small.dcm").read_bytes()
    real = pixels.prepare_image
    calls = iter([Panic("index out of bounds\n  at src/lib.rs"), None])

    def flaky(*args, **kwargs):
        exc = next(calls)
        if exc is not None:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(pixels, "prepare_image", flaky)
    _, errors = preprocess_items([data, data], PreprocessSpec(image_size=28), Limits(10**7, 10**7))
    assert errors == ["decode_error: Panic: index out of bounds", ""]
    monkeypatch.setattr(pixels, "prepare_image", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        preprocess_items([data], PreprocessSpec(image_size=28), Limits(10**7, 10**7))


def test_the_postprocess_records_ood_score_once_the_classifier_declares_it(params):
    """A classifier without the OOD guard's outputs has only ``probability`` recorded; the guarded
    classifier (the default contract) has its ``ood_score`` recorded too, wired by name."""
    import dataclasses

    from medops.serving.backends.drift_recorder import build_records

    guarded = build_ensemble_contract(params.serving, PreprocessSpec(image_size=28))
    plain = dataclasses.replace(guarded, classifier=dataclasses.replace(guarded.classifier, outputs=tuple(
        o for o in guarded.classifier.outputs if o.name not in ("ood_score", "in_distribution"))))
    assert set(tensors(parse(render_postprocess_config(plain, "production")), "input")) == {
        "drift_features", "error", "probability"}
    assert tensors(parse(render_postprocess_config(guarded, "production")), "input")["ood_score"] == (
        "TYPE_FP32", [1])
    ens = parse(render_ensemble_config(guarded, classifier_version=3, flavour="production"))
    assert dict(ens.ensemble_scheduling.step[2].input_map)["ood_score"] == "ood_score"
    features = np.array([[b'{"modality":"CR","error":null}'], [b'{"error":"not_dicom"}']],
                        dtype=np.object_)
    probs, ood = np.array([[0.25], [0.5]], np.float32), np.array([[1.5], [9.0]], np.float32)
    good, bad = build_records(features, probs, ood)
    assert (good["probability"], good["ood_score"], good["modality"]) == (0.25, 1.5, "CR")
    assert bad["probability"] is None and bad["ood_score"] is None  # a blank image's answer
    assert build_records(features[:1], probs[:1], None)[0]["ood_score"] is None
