"""The embedded Triton runs from an environment of its own (NumPy 1), medops from its own (NumPy 2).

nvidia-pytriton 0.7.0 requires numpy<2 and its Python-backend stub answers with empty outputs under
NumPy 2, so ``make setup`` builds ``.venv-triton`` beside ``.venv`` (requirements-triton.lock) and
``medops.serving.server`` runs tritonserver and every stub from it. Here, against the real server:

- a Python model reports the NumPy and the interpreter its stub runs: NumPy 1, in the Triton
  environment, while this process runs NumPy 2;
- the DICOM ensemble and the tensor path answer pydicom's test files (every decoder: RLE,
  JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, deflate, palette, multi-frame) and
  PneumoniaMNIST chest films exactly (same float32 bits, same flag and label) as the NumPy-1
  setup computes them in-process: medops' training preprocessing and onnxruntime, run by the
  Triton environment's Python; and as this NumPy-2 process computes them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import pydicom_file
from medops.config import PreprocessSpec, ServingConfig
from medops.serving.client import predict_files
from medops.serving.deploy import deploy
from medops.serving.server import start_server, stop_server, triton_env
from test_triton_serving import write_bundled_dicom, write_export_result, write_gate

pytestmark = [pytest.mark.triton, pytest.mark.slow]

S = 28
SPEC = PreprocessSpec(image_size=S)
W, B, M0, K, V = 4.0, -2.0, 0.45, 4.0, 2.0  # the guarded tiny model's constants
THRESHOLD = 0.5  # export wrote no decision threshold: deploy labels at 0.5

# pydicom's test files, one or more per decoder and pixel layout (see the module docstring)
FILES = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm",
         "MR_small_jp2klossless.dcm", "JPEG2000.dcm", "693_J2KI.dcm", "JPEGLSNearLossless_16.dcm",
         "MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm", "SC_rgb_jpeg_dcmtk.dcm",
         "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle_16bit.dcm", "image_dfl.dcm", "examples_palette.dcm",
         "examples_ybr_color.dcm", "rtdose.dcm", "liver_1frame.dcm"]


def write_guarded_onnx(path: Path) -> Path:
    """A guarded classifier as export writes one (outputs probability, ood_score,
    in_distribution): probability = sigmoid(W * mean + B), ood_score = K * |mean - M0| + V * var
    of the image's pixels, in_distribution = ood_score <= 1."""
    import onnx
    from onnx import TensorProto, helper

    def const(name, value):
        return helper.make_tensor(name, TensorProto.FLOAT, [1], [value])

    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["flat", "flat"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["meansq"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["mean", "mean"], ["m2"]),
        helper.make_node("Sub", ["meansq", "m2"], ["var"]),
        helper.make_node("Mul", ["mean", "w"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
        helper.make_node("Sub", ["mean", "m0"], ["centred"]),
        helper.make_node("Abs", ["centred"], ["dist"]),
        helper.make_node("Mul", ["dist", "k"], ["far"]),
        helper.make_node("Mul", ["var", "v"], ["spread"]),
        helper.make_node("Add", ["far", "spread"], ["ood_score"]),
        helper.make_node("LessOrEqual", ["ood_score", "one"], ["in_distribution"]),
    ]
    out = [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1]),
           helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N", 1]),
           helper.make_tensor_value_info("in_distribution", TensorProto.BOOL, ["N", 1])]
    graph = helper.make_graph(
        nodes, "tiny_guarded_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", S, S, 1])], out,
        [const("w", W), const("b", B), const("m0", M0), const("k", K), const("v", V),
         const("one", 1.0)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


# Run by a Python with medops, onnxruntime and numpy: the answers medops' training preprocessing and
# onnxruntime give, item by item, as JSON (float32 values exactly, through float64 reprs).
IN_PROCESS = """
import json, sys
import numpy as np, onnxruntime as ort
from medops.config import PreprocessSpec
from medops.dicom.pixels import preprocess_file
onnx_path, size, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
out = []
for f in files:
    image = preprocess_file(f, PreprocessSpec(image_size=size)).reshape(1, size, size, 1).astype(np.float32)
    p, s, inside = sess.run(["probability", "ood_score", "in_distribution"], {"image": image})
    out.append({"probability": float(p[0, 0]), "ood_score": float(s[0, 0]),
                "in_distribution": bool(inside[0, 0])})
print(json.dumps({"numpy": np.__version__, "answers": out}))
"""


def in_process(python: str, onnx_path: Path, files: list[Path]) -> dict:
    out = subprocess.run([python, "-c", IN_PROCESS, str(onnx_path), str(S), *map(str, files)],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


NUMPY_PROBE = '''
import sys
import numpy as np


class TritonPythonModel:
    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        info = np.array([np.__version__.encode(), sys.prefix.encode()], dtype=np.object_)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("info", info)])
                for _ in requests]
'''

NUMPY_PROBE_CONFIG = '''name: "numpy_probe"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "info" data_type: TYPE_STRING dims: [ 2 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
'''


@pytest.fixture(scope="module")
def triton(tmp_path_factory, free_port):
    base = tmp_path_factory.mktemp("triton-env")
    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=60)
    state, repo = base / "state", base / "repository"
    probe = repo / "numpy_probe"
    (probe / "1").mkdir(parents=True)
    (probe / "config.pbtxt").write_text(NUMPY_PROBE_CONFIG)
    (probe / "1" / "model.py").write_text(NUMPY_PROBE)
    info = start_server(cfg, repository=repo, state_dir=state)
    try:
        yield {"cfg": cfg, "info": info, "repo": repo, "base": base}
    finally:
        stop_server(state)


def test_the_stub_runs_numpy_1_in_the_triton_environment_and_medops_numpy_2(triton):
    import tritonclient.grpc as grpcclient

    env = triton_env()
    client = grpcclient.InferenceServerClient(triton["info"].grpc_url)
    try:
        x = grpcclient.InferInput("x", [1], "INT32")
        x.set_data_from_numpy(np.zeros(1, np.int32))
        answer = client.infer("numpy_probe", [x]).as_numpy("info")
    finally:
        client.close()
    stub_numpy, stub_prefix = (v.decode() for v in answer)
    assert int(np.__version__.split(".")[0]) >= 2  # medops' own process
    assert stub_numpy.startswith("1.") and stub_numpy == env.numpy_version
    assert Path(stub_prefix).resolve() == Path(env.prefix).resolve() != Path(sys.prefix).resolve()


@pytest.fixture(scope="module")
def served(triton, tmp_path_factory):
    """The guarded tiny model deployed through the gate, and the files to ask about."""
    base = triton["base"]
    onnx_path = write_guarded_onnx(base / "export" / "model.onnx")
    d = tmp_path_factory.mktemp("env-files")
    files = [pydicom_file(n) for n in FILES]
    files += [write_bundled_dicom(d / f"chest{i}.dcm", index=i) for i in range(4)]
    # golden samples as export writes them: bundled images and the model's answers (this process)
    import onnxruntime as ort

    images = (np.load(Path(__file__).resolve().parents[2] / "datasets" / "pneumoniamnist"
                      / "pneumoniamnist.npz")["val_images"][:6].astype(np.float32) / 255.0)[..., None]
    p, s = ort.InferenceSession(str(onnx_path)).run(["probability", "ood_score"], {"image": images})
    np.savez(onnx_path.with_name("golden.npz"), images=images, probabilities=p, ood_scores=s)
    write_export_result(onnx_path)
    result = deploy(triton["cfg"], onnx=onnx_path,
                    gate=write_gate(base / "gate.json", passed=True),
                    export_result=onnx_path.with_name("export.json"), repository=triton["repo"],
                    url=triton["info"].grpc_url, protocol="grpc", preprocessing=SPEC)
    assert result.version == 1
    return {"onnx": onnx_path, "files": files}


def _as_recorded(pred) -> dict:
    return {"probability": pred.probability, "ood_score": pred.ood_score,
            "in_distribution": pred.in_distribution, "label": pred.label}


def _with_label(answer: dict) -> dict:
    return {**answer, "label": "pneumonia" if answer["probability"] >= THRESHOLD else "normal"}


def test_the_ensemble_answers_exactly_as_the_numpy_1_setup(triton, served):
    files = served["files"]
    before = in_process(str(Path(triton_env().prefix) / "bin" / "python"), served["onnx"], files)
    now = in_process(sys.executable, served["onnx"], files)
    assert before["numpy"].startswith("1.") and now["numpy"].startswith("2.")
    expected = [_with_label(a) for a in before["answers"]]
    assert [_with_label(a) for a in now["answers"]] == expected  # NumPy 2 prepares the same pixels
    # both sides of the guard and both labels occur, so a swapped output would show
    assert {a["in_distribution"] for a in expected} == {True, False}
    assert {a["label"] for a in expected} == {"normal", "pneumonia"}
    for via in ("ensemble", "tensor"):
        preds = predict_files(files, url=triton["info"].grpc_url, model_name=triton["cfg"].model_name,
                              preprocessing=SPEC, via=via)
        assert [p.error for p in preds] == [None] * len(files), via
        got = [_as_recorded(p) for p in preds]
        for name, g, e in zip(files, got, expected):
            assert g == e, (via, Path(name).name)
            assert math.isfinite(g["probability"]) and g["probability"] == float(np.float32(g["probability"]))
