"""A Triton whose model-repository API is restricted to a key: deploy needs the key, inference
does not, and the key never lands in the log or the state files."""

from __future__ import annotations

import pytest

from medops.serving.client import predict_files
from medops.config import ServingConfig
from medops.errors import ServingError
from medops.serving.deploy import deploy
from medops.serving.repository import list_versions
from medops.serving.server import ADMIN_KEY_ENV, endpoint, start_server, stop_server
from test_triton_serving import (
    SPEC,
    write_bundled_dicom,
    write_export_result,
    write_gate,
    write_golden,
    write_tiny_onnx,
)

pytestmark = [pytest.mark.triton, pytest.mark.slow]

KEY = "k3y-for-tests-only"


@pytest.fixture(scope="module")
def restricted(tmp_path_factory, free_port):
    base = tmp_path_factory.mktemp("restricted")
    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=60)
    state = base / "state"
    info = start_server(cfg, repository=base / "repo", state_dir=state, admin_key=KEY)
    try:
        yield {"cfg": cfg, "info": info, "state": state, "repo": base / "repo", "base": base}
    finally:
        stop_server(state)


def _deploy(restricted, protocol, **kw):
    base = restricted["base"]
    onnx_path = write_tiny_onnx(base / "export" / "model.onnx", w=2.0, b=-1.0)
    write_golden(onnx_path, w=2.0, b=-1.0)
    info = restricted["info"]
    return deploy(restricted["cfg"], onnx=onnx_path, gate=write_gate(base / "gate.json", passed=True),
                  export_result=write_export_result(onnx_path), repository=restricted["repo"],
                  url=endpoint(info, protocol), protocol=protocol,
                  preprocessing=SPEC, **kw)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_deploy_without_the_key_is_refused_before_writing(restricted, protocol, monkeypatch):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    with pytest.raises(ServingError, match=rf"refused its model-repository API \(set \${ADMIN_KEY_ENV}"):
        _deploy(restricted, protocol)
    with pytest.raises(ServingError, match=r"the model-repository key was refused"):
        _deploy(restricted, protocol, admin_key="wrong")
    assert list_versions(restricted["repo"], restricted["cfg"].model_name) == []


def test_deploy_with_the_key_from_the_environment_and_open_inference(restricted, monkeypatch,
                                                                     tmp_path):
    monkeypatch.setenv(ADMIN_KEY_ENV, KEY)
    result = _deploy(restricted, "http")
    assert result.version == 1
    monkeypatch.delenv(ADMIN_KEY_ENV)
    [pred] = predict_files([write_bundled_dicom(tmp_path / "x.dcm")],
                           url=restricted["info"].grpc_url, model_name=restricted["cfg"].model_name,
                           preprocessing=SPEC)
    assert pred.error is None and pred.model_version == "1"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_right_key_unlocks_the_model_repository_api_on_both_protocols(restricted, protocol):
    from medops.serving.deploy import _Connection

    info = restricted["info"]
    url = endpoint(info, protocol)
    from tritonclient.utils import InferenceServerException

    with _Connection(url, protocol, KEY) as admin:  # enters only if the index call was accepted
        # model control carries the key: the server gets to the request itself
        admin.unload_model("no_such_model")
        with pytest.raises(InferenceServerException, match="failed to load 'no_such_model'"):
            admin.load_model("no_such_model")
        # the same calls without it are refused
        for call in (admin._client.unload_model, admin._client.load_model):
            with pytest.raises(InferenceServerException, match="restricted, expecting header"):
                call("no_such_model")


def test_the_key_is_not_written_down(restricted):
    assert restricted["info"].restricted
    for path in [restricted["state"] / "logs" / "triton.log", *restricted["state"].rglob("*.json"),
                 *restricted["state"].rglob("*.pid")]:
        assert KEY not in path.read_text(errors="replace"), path
