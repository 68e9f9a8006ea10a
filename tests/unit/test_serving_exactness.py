"""The serving fast paths give the training preprocessing's answers (issue 12, item 5).

The preprocessing model reads each file once (values parsed when used, as ingest reads them) and
the embedded postprocessing model classifies every request of a dynamic batch with one
onnxruntime call: here, without Triton, on pydicom's own test files in every transfer syntax
pydicom ships one for. tests/integration/test_triton_fast_paths.py does the same through a live
Triton.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SYNTAX_FILES, pydicom_file, training_image
from medops.config import PreprocessSpec

BUNDLED = Path(__file__).resolve().parents[2] / "datasets" / "pneumoniamnist" / "pneumoniamnist.npz"
SPECS = [PreprocessSpec(image_size=28), PreprocessSpec(image_size=64, frame="first")]


@pytest.mark.parametrize("spec", SPECS, ids=["28", "64-first"])
def test_served_images_are_the_training_images_in_every_transfer_syntax(spec):
    from medops.dicom.pixels import preprocess_file
    from medops.serving.backends.dicom_preprocess import Limits, preprocess_items

    paths = {k: pydicom_file(v) for k, v in SYNTAX_FILES.items()}
    items = [p.read_bytes() for p in paths.values()]
    headers: list = []
    images, errors = preprocess_items(items, spec, Limits(64 << 20, 64 << 20), headers)
    assert errors == [""] * len(items), dict(zip(paths, errors))
    for i, (syntax, path) in enumerate(paths.items()):
        expected = training_image(path, spec)
        np.testing.assert_array_equal(images[i, ..., 0], expected, err_msg=syntax)
        # and the client's own preprocessing (every value parsed up front) agrees
        np.testing.assert_array_equal(images[i, ..., 0], preprocess_file(path, spec), err_msg=syntax)
        assert headers[i] is not None and headers[i]["rows"] > 0  # its drift record's fields
    # none is blank, and the lossless encodings of pydicom's MR_small give one and the same image
    assert all(images[i].std() > 0.01 for i in range(len(items)))
    mr = [i for i, k in enumerate(paths) if k in ("implicit_le", "explicit_be", "rle",
                                                   "jpeg_ls_lossless", "jpeg2000_lossless")]
    assert len({images[i].tobytes() for i in mr}) == 1
    rgb = [i for i, k in enumerate(paths) if k in ("rle_rgb", "jpeg_lossless")]  # SC_rgb, lossless
    assert len({images[i].tobytes() for i in rgb}) == 1
    assert len({images[i].tobytes() for i in range(len(items))}) == len(items) - len(mr) - len(rgb) + 2


def test_a_bad_file_beside_good_ones_is_its_own_error_and_the_header_is_read_once(monkeypatch):
    import pydicom

    from medops.serving.backends.dicom_preprocess import Limits, preprocess_items

    ct = pydicom_file("CT_small.dcm").read_bytes()
    reads = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: reads.append(1) or real(*a, **k))
    images, errors = preprocess_items([ct, b"\x00" * 500, ct[:400], ct], PreprocessSpec(image_size=28),
                                      Limits(64 << 20, 64 << 20))
    assert errors[0] == errors[3] == ""
    assert errors[1].startswith("not_dicom:") and errors[2].split(":")[0] in {"truncated", "no_pixel_data"}
    assert not images[1].any() and not images[2].any()
    np.testing.assert_array_equal(images[0], images[3])
    reads.clear()
    preprocess_items([ct, ct], PreprocessSpec(image_size=28), Limits(64 << 20, 64 << 20))
    assert len(reads) == 2  # one read per file: limits, header and pixels


def _run(batch: np.ndarray) -> tuple[np.ndarray, ...]:
    """A stand-in classifier whose answer depends on every pixel."""
    weights = np.linspace(-1, 1, batch[0].size, dtype=np.float32)
    logit = (batch.reshape(len(batch), -1) * weights).sum(axis=1)  # row by row, as alone
    prob = (1 / (1 + np.exp(-logit))).astype(np.float32).reshape(-1, 1)
    return prob, (logit.reshape(-1, 1) ** 2).astype(np.float32), (np.abs(logit) < 1).reshape(-1, 1)


def test_the_postprocess_classifies_all_requests_at_once_and_answers_each_its_own():
    """Dynamic batching hands the model a list of requests: one classifier call for all of them,
    answers split back per request exactly as if each were classified alone; a malformed request
    gets its own error; the drift records come out in request order."""
    from medops.serving.backends import postprocess

    rng = np.random.default_rng(0)
    sizes = [1, 3, 2]
    images = [rng.random((n, 28, 28, 1), dtype=np.float32) for n in sizes]
    requests: list = [{"image": img, "error": np.array([[b""]] * len(img), dtype=np.object_),
                       "drift_features": np.array([[json.dumps({"n": i, "error": None}).encode()]
                                                   for i in range(len(img))], dtype=np.object_)}
                      for img in images]
    requests.insert(1, {"image": np.zeros((1, 27, 28, 1), np.float32)})  # a wrong shape
    calls = []
    postprocess.classify_requests(lambda b: calls.append(len(b)) or _run(b), requests, (28, 28, 1))
    assert calls == [sum(sizes)]
    assert isinstance(requests[1], str) and "shape" in requests[1]
    for img, r in zip(images, [requests[0], *requests[2:]]):
        alone = _run(img)
        for name, expected in zip(postprocess.ANSWERS, alone):
            np.testing.assert_array_equal(r[name], expected)
    records = postprocess.drift_records(requests)
    assert [r["n"] for r in records] == [0, 0, 1, 2, 0, 1]
    assert [r["probability"] for r in records] == pytest.approx(
        np.concatenate([_run(i)[0] for i in images]).reshape(-1).tolist(), abs=1e-6)


def test_the_embedded_dicom_path_answers_several_requests_in_one_pass_as_each_alone():
    """The one-model DICOM path (embedded ensemble): the files of every request preprocessed,
    one classifier call for all, labelled, each request answered with its own rows exactly as
    when sent alone; a request that could not be read (None) stays unanswered, a bad file is
    its own error; the drift records follow the answered files in order."""
    from medops.serving.backends.dicom_preprocess import Limits
    from medops.serving.backends.postprocess import answer_files

    spec, limits = PreprocessSpec(image_size=28), Limits(64 << 20, 64 << 20)
    ct, mr = (pydicom_file(SYNTAX_FILES[k]).read_bytes() for k in ("explicit_le", "rle"))
    files = [[ct], None, [mr, b"not dicom", ct]]
    calls = []
    kwargs = dict(threshold=0.5, labels=("normal", "pneumonia"))
    answers, records = answer_files(files, spec, limits, lambda b: calls.append(len(b)) or _run(b),
                                    record=True, **kwargs)
    assert calls == [4] and answers[1] is None
    alone = [answer_files([[d]], spec, limits, _run, **kwargs)[0][0] for d in (ct, mr, b"x", ct)]
    rows = [answers[0]] + [{k: v[i:i + 1] for k, v in answers[2].items()} for i in range(3)]
    for got, expected in zip(rows, alone):
        assert set(got) == {"probability", "ood_score", "in_distribution", "label", "error"}
        for name in ("probability", "ood_score", "in_distribution"):
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert answers[2]["error"][1, 0].startswith(b"not_dicom:") and answers[2]["label"][1, 0] == b""
    assert [r["rows"] for r in records] == [128, 64, None, 128]
    assert records[2]["error"] == "not_dicom" and records[2]["probability"] is None
    assert records[0]["probability"] == pytest.approx(float(answers[0]["probability"][0, 0]), abs=1e-6)
    images = np.stack([training_image(pydicom_file(SYNTAX_FILES["explicit_le"]), spec)])[..., None]
    np.testing.assert_array_equal(answers[0]["probability"], _run(images)[0])


def test_batched_image_statistics_are_those_of_one_image_at_a_time():
    """The drift records' image statistics, computed for a whole batch at once on the serving
    path, are exactly image_features of each image (the reference stage's numbers): on the
    bundled test split, on noisy copies and on odd sizes."""
    from medops.drift import image_features, image_features_batch

    films = np.load(BUNDLED)["test_images"][:300].astype(np.float32) / 255
    rng = np.random.default_rng(3)
    noisy = np.clip(films[:100] + rng.normal(0, 0.1, films[:100].shape), 0, 1).astype(np.float32)
    for batch in (films, noisy, rng.random((20, 27, 31), dtype=np.float32), films[:0]):
        got = image_features_batch(batch[..., None])
        assert got == [image_features(img) for img in batch]


def _mean_model(path: Path, batch: int | str) -> Path:
    """probability = sigmoid(mean(image)); its batch dimension ``batch`` (an int: fixed)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
         helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
         helper.make_node("Sigmoid", ["mean"], ["probability"])],
        "mean", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 28, 28, 1])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [batch, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_the_classifier_runs_a_full_batch_when_it_loads(tmp_path):
    # Warmed up at max_batch_size (onnxruntime's arena at full size from the start; see
    # benchmarks/soak): a model that cannot take the batches Triton forms fails its load, so
    # Triton keeps the version it serves, instead of failing requests once batches grow.
    import onnxruntime

    from medops.serving.backends.onnx_classifier import Classifier

    dynamic = Classifier(str(_mean_model(tmp_path / "dynamic.onnx", "batch")), {"max_batch_size": 64})
    probs, _, inside = dynamic.run(np.full((3, 28, 28, 1), 0.5, np.float32))
    assert probs.shape == (3, 1) and np.allclose(probs, 1 / (1 + np.exp(-0.5))) and inside.all()
    fixed = str(_mean_model(tmp_path / "fixed.onnx", 1))
    Classifier(fixed, {})  # no batching declared: nothing to warm up, loads as before
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument,
                       match="dimensions"):
        Classifier(fixed, {"max_batch_size": 64})
