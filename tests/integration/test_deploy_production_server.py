"""The production flavour's rollout against a real server: the embedded tritonserver (the wheel's,
Python backend only) cannot load an onnxruntime-backend classifier, which is what a candidate
that fails on the server looks like. Deploy must send the production config to the server as
the candidate, see it fail, remove the version, and keep the served one answering: nothing is
served unchecked. (A GPU Triton with the onnxruntime backend does not run here; see
deploy/README.md.)"""

from __future__ import annotations

import numpy as np
import pytest

from medops.config import ServingConfig
from medops.errors import ServingError
from medops.serving.audit import history
from medops.serving.client import infer_images
from medops.serving.deploy import deploy
from medops.serving.repository import list_versions, read_config, served_version
from medops.serving.server import start_server, stop_server
from test_triton_serving import SPEC, write_export_result, write_gate, write_golden, write_tiny_onnx

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_a_production_candidate_the_server_cannot_load_is_removed_and_v1_keeps_serving(tmp_path, free_port):
    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=60)
    state, repo = tmp_path / "state", tmp_path / "repository"
    info = start_server(cfg, repository=repo, state_dir=state)
    try:
        releases = []
        for n, (w, b) in enumerate(((4.0, -2.0), (-3.0, 1.0)), start=1):
            onnx_path = write_tiny_onnx(tmp_path / f"export{n}" / "model.onnx", w=w, b=b)
            golden = write_golden(onnx_path, w=w, b=b)
            releases.append(dict(onnx=onnx_path, gate=write_gate(tmp_path / f"gate{n}.json", passed=True),
                                 export_result=write_export_result(onnx_path), golden=golden))
        v1 = deploy(cfg, **releases[0], repository=repo, url=info.grpc_url, preprocessing=SPEC)
        production = cfg.model_copy(update={"flavor": "production"})
        with pytest.raises(ServingError, match="not serving .* version 2: candidate check failed.*"
                                               "version 1 is still served"):
            deploy(production, **releases[1], repository=repo, url=info.grpc_url, preprocessing=SPEC,
                   timeout=30)
        assert v1.version == 1 and list_versions(repo, cfg.model_name) == [1]
        assert served_version(repo, cfg.model_name) == 1
        assert read_config(repo, cfg.model_name).backend == "python"  # still the embedded v1
        with np.load(releases[0]["golden"]) as data:
            images, expected = data["images"], data["probabilities"].reshape(-1)
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(info.grpc_url)
        try:
            probs, answered, *_ = infer_images(client, images, protocol="grpc", model_name=cfg.model_name)
        finally:
            client.close()
        assert answered == "1" and np.allclose(probs, expected, atol=1e-4)
        assert [e["outcome"] for e in history(repo)] == ["deployed", "failed"]
    finally:
        stop_server(state)
