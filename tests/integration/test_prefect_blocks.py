"""medops' Prefect blocks against a real Prefect server (Prefect's test harness).

``prefect block register -m medops.ops.blocks`` registers the block types (with their secret
fields marked secret, as the UI's Blocks page shows them); without documents the flows' tasks fall
back to params.yaml and the environment; with them, the tasks use the block's Triton address and
admin key, the DVC remote (credentials in .dvc/config.local only) and the de-identification key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.prefect, pytest.mark.dvc, pytest.mark.slow]


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def registered(prefect_api):
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.run([str(Path(sys.executable).parent / "prefect"), "block", "register", "-m",
                           "medops.ops.blocks"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def project(tmp_path, repo_root):
    from medops.ops import dvc

    root = tmp_path / "project"
    (root / "data" / "ingested").mkdir(parents=True)
    (root / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    (root / "data" / "ingested" / "metadata.parquet").write_bytes(b"not really parquet, bytes to push")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    dvc.init(root)
    dvc.ensure_remote(root, "local", "dvc-remote")  # the project's own default remote
    return root


def test_register_makes_the_block_types_with_secret_fields(registered):
    import asyncio

    from prefect.client.orchestration import get_client

    assert "medops Triton server" in registered and "medops DVC remote" in registered

    async def schemas():
        async with get_client() as client:
            out = {}
            for slug in ("medops-triton-server", "medops-dvc-remote"):
                block_type = await client.read_block_type_by_slug(slug)
                schema = await client.get_most_recent_block_schema_for_block_type(block_type.id)
                out[slug] = schema.fields
            return out

    fields = asyncio.run(schemas())
    assert fields["medops-triton-server"]["secret_fields"] == ["admin_key"]
    assert fields["medops-dvc-remote"]["secret_fields"] == ["secret_access_key"]
    assert {"url", "grpc_port", "admin_key"} <= set(fields["medops-triton-server"]["properties"])


def test_flows_fall_back_without_blocks_and_use_them_when_present(registered, project, params, monkeypatch):
    from prefect import flow
    from prefect.blocks.system import Secret

    import medops.pipeline
    import medops.serving.deploy
    from flows import ingest as ingest_flow
    from flows import training as training_flow
    from medops.ops import blocks
    from medops.paths import ProjectPaths

    paths = ProjectPaths(project)
    seen: dict = {}
    monkeypatch.setenv("MEDOPS_TRITON_ADMIN_KEY", "admin-key-from-env")

    class Stop(Exception):
        pass

    def fake_deploy(cfg, **kwargs):  # what the deploy task hands medops' deploy, then stop there
        seen["deploy"] = (cfg.host, cfg.http_port, cfg.grpc_port, kwargs["admin_key"])
        raise Stop

    def fake_ingest_export(params, paths, *, progress=None, key=None):
        seen["key"] = key
        raise Stop

    monkeypatch.setattr(medops.serving.deploy, "deploy", fake_deploy)
    monkeypatch.setattr(medops.pipeline, "ingest_export", fake_ingest_export)

    @flow
    def uses_blocks() -> str:
        for call in (lambda: training_flow.deploy_model.with_options(retries=0)(paths, params),
                     lambda: ingest_flow.ingest(paths)):
            with pytest.raises(Stop):
                call()
        return ingest_flow.version(paths)

    # no block documents: params.yaml, the environment and the project's default remote
    uses_blocks()
    assert seen["deploy"] == (params.serving.host, params.serving.http_port, params.serving.grpc_port,
                              "admin-key-from-env")
    assert seen["key"] is None  # ingest_export then resolves $MEDOPS_DEID_KEY or the key file
    assert list((project / "dvc-remote").rglob("*")), "pushed to the project's default remote"

    blocks.TritonServer(url="http://triton.example.internal:18000", grpc_port=18001,
                        admin_key="admin-key-from-block").save(blocks.TRITON_BLOCK, overwrite=True)
    Secret(value="deid-key-from-block").save(blocks.DEID_KEY_SECRET, overwrite=True)
    elsewhere = project.parent / "block-remote"
    blocks.DvcRemote(remote_name="team", url=str(elsewhere)).save(blocks.DVC_REMOTE_BLOCK, overwrite=True)
    (project / "data" / "ingested" / "more.bin").write_bytes(b"a new data version")
    try:
        uses_blocks()
    finally:
        for name in (blocks.TRITON_BLOCK, blocks.DEID_KEY_SECRET, blocks.DVC_REMOTE_BLOCK):
            _delete_document(name)
    assert seen["deploy"] == ("triton.example.internal", 18000, 18001, "admin-key-from-block")
    assert seen["key"] == b"deid-key-from-block"
    assert list(elsewhere.rglob("*")), "pushed to the block's remote"
    assert "remote = team" in (project / ".dvc" / "config").read_text()


def test_a_dvc_remote_block_keeps_credentials_out_of_the_committed_config(project):
    from medops.ops.blocks import DvcRemote

    block = DvcRemote(remote_name="minio", url="s3://medops-bucket/medops", endpoint_url="https://minio.internal:9000",
                      access_key_id="AKIAEXAMPLE", secret_access_key="not-in-dvc-config")
    assert "not-in-dvc-config" not in repr(block)  # a SecretStr: hidden in logs and the UI
    assert block.configure(project) == "minio"
    config, local = (project / ".dvc" / "config").read_text(), (project / ".dvc" / "config.local").read_text()
    assert "s3://medops-bucket/medops" in config and "https://minio.internal:9000" in config
    assert "remote = minio" in config
    assert "not-in-dvc-config" not in config and "AKIAEXAMPLE" not in config
    assert "not-in-dvc-config" in local and "AKIAEXAMPLE" in local
    ignored = subprocess.run(["git", "check-ignore", ".dvc/config.local"], cwd=project, capture_output=True)
    assert ignored.returncode == 0  # git never sees the credentials


def _delete_document(name: str) -> None:
    import asyncio

    from prefect.client.orchestration import get_client

    async def delete():
        async with get_client() as client:
            for doc in await client.read_block_documents(offset=0, limit=200):
                if doc.name == name:
                    await client.delete_block_document(doc.id)

    asyncio.run(delete())
