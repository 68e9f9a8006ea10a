"""medops.serving.client's asyncio API against the real tritonserver: the same answers as the sync client.

One server for the module (free ports), one tiny ONNX version deployed through the gate with the
helpers of test_triton_serving; files answered over gRPC and HTTP, via the DICOM ensemble and
via tensors, several requests in flight at once.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import pydicom_file
from medops.serving.client import apredict_files, predict_files
from medops.config import PreprocessSpec, ServingConfig
from medops.errors import ServingError
from medops.serving.deploy import deploy
from medops.serving.server import endpoint, start_server, stop_server
from test_triton_serving import (
    S,
    SPEC,
    expected_probability,
    write_bundled_dicom,
    write_export_result,
    write_gate,
    write_golden,
    write_tiny_onnx,
)

pytestmark = [pytest.mark.triton, pytest.mark.slow]

COEF = {"w": -3.0, "b": 1.0}


@pytest.fixture(scope="module")
def served(tmp_path_factory, free_port):
    base = tmp_path_factory.mktemp("async")
    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=60)
    state, repo = base / "state", base / "repository"
    info = start_server(cfg, repository=repo, state_dir=state)
    try:
        onnx_path = write_tiny_onnx(base / "export" / "model.onnx", **COEF)
        write_golden(onnx_path, **COEF)
        deploy(cfg, onnx=onnx_path, gate=write_gate(base / "gate.json", passed=True),
               export_result=write_export_result(onnx_path, decision_threshold=0.4),
               repository=repo, url=info.grpc_url, protocol="grpc", preprocessing=SPEC)
        yield {"cfg": cfg, "info": info}
    finally:
        stop_server(state)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    bad = d / "notes.txt"
    bad.write_text("not DICOM\n")
    crs = [write_bundled_dicom(d / f"cr{i}.dcm", index=i) for i in range(5)]
    # interleaved so that answers must be put back in order across requests
    return [crs[0], pydicom_file("CT_small.dcm"), bad, *crs[1:], d / "missing.dcm"]


@pytest.mark.parametrize("via", ["ensemble", "tensor"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_answers_equal_the_sync_ones(served, paths, protocol, via):
    info, name = served["info"], served["cfg"].model_name
    url = endpoint(info, protocol)
    kwargs = dict(url=url, protocol=protocol, model_name=name, preprocessing=SPEC, via=via)
    sync = predict_files(paths, **kwargs)
    # batch_size 2: four requests, three in flight at once
    got = asyncio.run(apredict_files(paths, batch_size=2, concurrency=3, **kwargs))
    assert [p.file for p in got] == [str(p) for p in paths]
    assert [(p.label, p.model_version, p.error) for p in got] == \
        [(p.label, p.model_version, p.error) for p in sync]
    assert [p.probability for p in got] == pytest.approx([p.probability for p in sync], abs=1e-6)
    answered = [(p, path) for p, path in zip(got, paths) if p.error is None]
    assert len(answered) == 6 and {p.model_version for p, _ in answered} == {"1"}
    for pred, path in answered:
        assert pred.probability == pytest.approx(expected_probability(path, **COEF), abs=1e-5)
        assert pred.label == ("pneumonia" if pred.probability >= 0.4 else "normal")
    assert got[2].error.startswith("not_dicom: ") and got[-1].error.startswith("not_dicom: ")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_unknown_model_is_a_clear_error_at_once(served, paths, protocol):
    info = served["info"]
    url = endpoint(info, protocol)
    start = time.monotonic()
    with pytest.raises(ServingError, match="model 'nope_dicom' is not loaded or not ready"):
        asyncio.run(apredict_files(paths[:2], url=url, protocol=protocol, model_name="nope",
                                   preprocessing=SPEC, backoff_s=2.0))
    assert time.monotonic() - start < 2.0  # not retried


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_bad_input_is_an_inference_error_not_retried(served, paths, protocol):
    """Images of the wrong size reach the classifier: Triton refuses them, at once, no retry."""
    info = served["info"]
    url = endpoint(info, protocol)
    start = time.monotonic()
    with pytest.raises(ServingError, match=rf"inference on 'pneumonia_classifier' at {url} failed: .*"
                                           rf"{S + 1}"):
        asyncio.run(apredict_files(paths[:2], url=url, protocol=protocol,
                                   model_name=served["cfg"].model_name,
                                   preprocessing=PreprocessSpec(image_size=S + 1), via="tensor",
                                   backoff_s=2.0))
    assert time.monotonic() - start < 2.0
