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


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_model_repository_api_needs_the_key_on_both_protocols(restricted, protocol):
    """Plain tritonclient, no medops wrapper: the repository index, load and unload are refused
    without the header (or with a wrong key) and answered with it; health and metadata stay open."""
    from tritonclient.utils import InferenceServerException

    from medops.serving.server import admin_headers

    info, name = restricted["info"], restricted["cfg"].model_name
    if protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    client = tc.InferenceServerClient(endpoint(info, protocol))
    try:
        for headers in (None, admin_headers("wrong-key", protocol)):
            for call in (client.get_model_repository_index, lambda **kw: client.load_model(name, **kw),
                         lambda **kw: client.unload_model(name, **kw)):
                with pytest.raises(InferenceServerException, match="restricted|expecting header"):
                    call(headers=headers)
        index = client.get_model_repository_index(headers=admin_headers(KEY, protocol))
        listed = [m.name for m in index.models] if protocol == "grpc" else [m["name"] for m in index]
        assert name in listed
        assert client.is_server_live() and client.is_server_ready()  # no key needed
        client.get_server_metadata()
    finally:
        client.close()


@pytest.mark.long  # a server restart; the audit records themselves: tests/unit/test_deploy_audit.py
def test_every_deploy_and_rollback_is_in_the_audit_log_across_a_restart(restricted, monkeypatch, tmp_path):
    """After the tests above (two refusals per protocol, one deploy): a second version deployed by
    someone named, a rollback with a reason; the log survives a restart of Triton."""
    from medops.serving.audit import history
    from medops.serving.deploy import rollback

    monkeypatch.setenv(ADMIN_KEY_ENV, KEY)
    base, cfg, repo = restricted["base"], restricted["cfg"], restricted["repo"]
    onnx_path = write_tiny_onnx(base / "export2" / "model.onnx", w=-2.0, b=1.0)
    write_golden(onnx_path, w=-2.0, b=1.0)
    url = endpoint(restricted["info"], "grpc")
    v2 = deploy(cfg, onnx=onnx_path, gate=write_gate(base / "gate2.json", passed=True),
                export_result=write_export_result(onnx_path), repository=repo, url=url,
                preprocessing=SPEC, by="dr.okafor", reason="CHG-77 retrained on site B")
    back = rollback(cfg, repository=repo, url=url, preprocessing=SPEC, reason="site B sensitivity dropped")
    assert (v2.version, back.to_version) == (2, 1)

    stop_server(restricted["state"])
    start_server(cfg, repository=repo, state_dir=restricted["state"], admin_key=KEY)
    entries = history(repo)
    assert [(e["action"], e["outcome"]) for e in entries] == (
        [("deploy", "failed")] * 4 + [("deploy", "deployed")] * 2 + [("rollback", "rolled_back")])
    first, second, back_entry = entries[-3:]
    assert first["version"] == 1 and first.get("previous_version") is None
    assert (second["version"], second["previous_version"], second["by"], second["reason"]) == (
        2, 1, "dr.okafor", "CHG-77 retrained on site B")
    assert second["sha256"] == v2.sha256 and second["data_version"] == v2.data_version
    assert (back_entry["version"], back_entry["previous_version"]) == (1, 2)
    assert back_entry["by"] == back_entry["os_user"] and back_entry["reason"] == "site B sensitivity dropped"
    assert all("refused its model-repository API" in e["error"] or "key was refused" in e["error"]
               for e in entries[:4])
    assert KEY not in (repo / ".deploy-audit.jsonl").read_text()
