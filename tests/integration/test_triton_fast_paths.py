"""The fast DICOM path through a live embedded Triton gives the training preprocessing's answers.

Issue 12, item 5: pydicom's test files in every transfer syntax it ships one for (uncompressed
little/big endian, deflate, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000) are sent
as raw bytes to the one-step ensemble (the postprocessing model preprocesses, classifies, labels
and records), alone
and all at once from concurrent clients (so dynamic batching merges them); every answer equals
in-process onnxruntime on the image ingest prepares from the same file, the tensor path agrees,
and a bad file beside them is its own error. The classifier here is a tiny ONNX graph whose answer
depends on every pixel (a seeded weighted sum), with the OOD guard's three outputs.

Runs the Triton Python-backend stub, which imports medops from the venv the server runs in:
run it with a venv that has this tree installed (see the README's Tests section).
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest

from conftest import SYNTAX_FILES, pydicom_file, training_image
from medops.config import PreprocessSpec, ServingConfig
from test_triton_serving import write_export_result, write_gate

pytestmark = [pytest.mark.triton, pytest.mark.slow]

S = 28
SPEC = PreprocessSpec(image_size=S)
BUNDLED = Path(__file__).resolve().parents[2] / "datasets" / "pneumoniamnist" / "pneumoniamnist.npz"


def write_weighted_onnx(path: Path) -> Path:
    """probability = sigmoid(sum(W * image) + b) with seeded W: every pixel moves the answer;
    ood_score = 2 * mean(image), in_distribution = ood_score < 1 (the guard's outputs)."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(12)
    weights = rng.normal(0, 0.05, S * S).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("Mul", ["flat", "w"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axes"], ["sum"], keepdims=1),
        helper.make_node("Add", ["sum", "b"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["mean", "two"], ["ood_score"]),
        helper.make_node("Less", ["ood_score", "one"], ["in_distribution"]),
    ]
    graph = helper.make_graph(
        nodes, "weighted_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", S, S, 1])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("in_distribution", TensorProto.BOOL, ["N", 1])],
        [helper.make_tensor("w", TensorProto.FLOAT, [S * S], weights),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
         helper.make_tensor("b", TensorProto.FLOAT, [1], [0.1]),
         helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0]),
         helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def run_onnx(path: Path, images: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probability", "ood_score", "in_distribution"],
                       {"image": images.astype(np.float32)})


def write_golden(onnx_path: Path, n: int = 6) -> Path:
    images = (np.load(BUNDLED)["val_images"][:n].astype(np.float32) / 255.0)[..., np.newaxis]
    out = onnx_path.with_name("golden.npz")
    np.savez(out, images=images, probabilities=run_onnx(onnx_path, images)[0])
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory, free_port):
    from medops.serving.deploy import deploy
    from medops.serving.server import start_server, stop_server

    base = tmp_path_factory.mktemp("fast")
    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=90)
    state, repo = base / "state", base / "repository"
    info = start_server(cfg, repository=repo, state_dir=state)
    try:
        onnx_path = write_weighted_onnx(base / "export" / "model.onnx")
        write_golden(onnx_path)
        deploy(cfg, onnx=onnx_path, gate=write_gate(base / "gate.json", passed=True),
               export_result=write_export_result(onnx_path), repository=repo, url=info.grpc_url,
               preprocessing=SPEC)
        yield {"cfg": cfg, "info": info, "repo": repo, "onnx": onnx_path, "state": state}
    finally:
        stop_server(state)


def _expected(onnx_path: Path, paths: list[Path]) -> list[np.ndarray]:
    images = np.stack([training_image(p, SPEC) for p in paths])[..., np.newaxis]
    return run_onnx(onnx_path, images)


def test_every_transfer_syntax_is_answered_as_training_prepares_it(served):
    import tritonclient.grpc as grpcclient

    from medops.serving.client import infer_dicom, infer_images
    from medops.serving.contract import ensemble_name

    names = list(SYNTAX_FILES)
    paths = [pydicom_file(SYNTAX_FILES[k]) for k in names]
    probs, ood, inside = _expected(served["onnx"], paths)
    name = served["cfg"].model_name
    client = grpcclient.InferenceServerClient(served["info"].grpc_url)
    try:
        # all files in one request, a bad one among them
        items = [p.read_bytes() for p in paths]
        got, labels, errors, _ = infer_dicom(client, [*items[:3], b"not a dicom file", *items[3:]],
                                             protocol="grpc", model_name=ensemble_name(name))
        assert errors[3].startswith("not_dicom:") and not labels[3]
        del got[3], labels[3], errors[3]
        assert errors == [""] * len(names), dict(zip(names, errors))
        np.testing.assert_allclose(got, probs.reshape(-1), rtol=0, atol=1e-6)
        assert labels == ["pneumonia" if p >= 0.5 else "normal" for p in probs.reshape(-1)]
        # the tensor path, on the images training prepares, answers the same
        images = np.stack([training_image(p, SPEC) for p in paths])[..., np.newaxis]
        tensor_probs, _ = infer_images(client, images, protocol="grpc", model_name=name)
        np.testing.assert_allclose(tensor_probs, probs.reshape(-1), rtol=0, atol=1e-6)
    finally:
        client.close()


def test_concurrent_single_file_requests_are_batched_and_each_answered_as_alone(served):
    """16 clients, one file per request: dynamic batching hands the model several requests at
    once, classified in one call; each answer is that file's, with its guard outputs."""
    import tritonclient.grpc as grpcclient

    from medops.serving.contract import ensemble_name

    paths = [pydicom_file(v) for v in SYNTAX_FILES.values()] * 4
    probs, ood, inside = _expected(served["onnx"], paths)
    url, model = served["info"].grpc_url, ensemble_name(served["cfg"].model_name)

    def one(i: int):
        client = grpcclient.InferenceServerClient(url)
        try:
            inp = grpcclient.InferInput("dicom", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[paths[i].read_bytes()]], dtype=np.object_))
            outs = [grpcclient.InferRequestedOutput(n) for n in
                    ("probability", "ood_score", "in_distribution", "label", "error")]
            r = client.infer(model, [inp], outputs=outs)
            return (float(r.as_numpy("probability")[0, 0]), float(r.as_numpy("ood_score")[0, 0]),
                    bool(r.as_numpy("in_distribution")[0, 0]), r.as_numpy("error")[0, 0])
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(len(paths))))
    assert [a[3] for a in answers] == [b""] * len(paths)
    np.testing.assert_allclose([a[0] for a in answers], probs.reshape(-1), rtol=0, atol=1e-6)
    np.testing.assert_allclose([a[1] for a in answers], ood.reshape(-1), rtol=0, atol=1e-6)
    assert [a[2] for a in answers] == inside.reshape(-1).tolist()


def test_the_embedded_ensemble_is_one_step_with_one_instance_per_core(served):
    import os

    from medops.serving.repository import read_config

    repo, name = served["repo"], served["cfg"].model_name
    ens = read_config(repo, f"{name}_dicom")
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [f"{name}_postprocess"]
    cores = len(os.sched_getaffinity(0))
    for model in (name, f"{name}_postprocess"):
        assert [g.count for g in read_config(repo, model).instance_group] == [cores], model
    # the drift records are written by the postprocessing model: one per answered file
    log = Path(served["state"]) / "drift" / "requests.jsonl"
    assert log.is_file() and log.read_text().count("\n") >= len(SYNTAX_FILES)
