"""Prefect blocks for what a medops user configures once, edited in the Prefect UI's Blocks page.

Register the block types once per Prefect server (or Prefect Cloud workspace)::

    prefect block register -m medops.ops.blocks

then create one document of each in the UI (Blocks -> +), or in Python::

    from prefect.blocks.system import Secret
    from medops.ops.blocks import DvcRemote, TritonServer

    TritonServer(url="http://triton.internal:8000", admin_key="...").save("medops-triton")
    DvcRemote(url="s3://bucket/medops", endpoint_url="https://minio.internal:9000",
              access_key_id="...", secret_access_key="...").save("medops-dvc-remote")
    Secret(value="...").save("medops-deid-key")

The flows look each one up by those names (TRITON_BLOCK, DVC_REMOTE_BLOCK, DEID_KEY_SECRET) and
fall back to params.yaml and the environment when there is none, as before:

- ``medops-triton`` (TritonServer): where the training flow's deploy task reaches Triton (instead of
  ``serving.host`` and the ports) and the model-repository admin key (instead of
  ``$MEDOPS_TRITON_ADMIN_KEY`` / ``.medops/secrets/triton-admin.key``);
- ``medops-dvc-remote`` (DvcRemote): the DVC remote the flows push data and outputs to, written into
  the project's DVC config before each push (credentials into ``.dvc/config.local``, which git
  ignores, never into ``.dvc/config``);
- ``medops-deid-key`` (Prefect's own ``Secret``): the de-identification key (instead of
  ``$MEDOPS_DEID_KEY`` / ``.medops/secrets/deid.key``).

Secret fields are Prefect's ``SecretStr``: stored encrypted by the server, shown as ``********`` in
the UI and logs. Nothing here is read at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, TypeVar
from urllib.parse import urlsplit

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

TRITON_BLOCK = "medops-triton"
DVC_REMOTE_BLOCK = "medops-dvc-remote"
DEID_KEY_SECRET = "medops-deid-key"

B = TypeVar("B", bound=Block)


class TritonServer(Block):
    """A running Triton server that medops deploys models to, and its model-repository admin key."""

    _block_type_name = "medops Triton server"
    _block_type_slug = "medops-triton-server"
    _description = ("The Triton Inference Server medops deploys to: its HTTP and gRPC addresses and "
                    "the key of its restricted model-repository API (load/unload).")
    _documentation_url = "https://github.com/triton-inference-server/server"

    url: str = Field(default="http://127.0.0.1:8000", description="Triton's HTTP endpoint.")
    grpc_port: int = Field(default=8001, ge=1, le=65535, description="Triton's gRPC port, same host.")
    admin_key: Optional[SecretStr] = Field(
        default=None, description="Key of the restricted model-repository API (header medops-admin-key).")

    def serving_config(self, cfg: Any) -> Any:
        """``cfg`` (params.yaml's ``serving`` section) pointed at this server."""
        parts = urlsplit(self.url if "://" in self.url else f"http://{self.url}")
        if not parts.hostname:
            raise ValueError(f"TritonServer.url {self.url!r} names no host")
        return cfg.model_copy(update={"host": parts.hostname, "http_port": parts.port or 80,
                                      "grpc_port": self.grpc_port})

    def key(self) -> Optional[str]:
        return self.admin_key.get_secret_value() if self.admin_key is not None else None


class DvcRemote(Block):
    """A DVC remote (local folder, S3 or S3-compatible store, ...) that medops pushes data to."""

    _block_type_name = "medops DVC remote"
    _block_type_slug = "medops-dvc-remote"
    _description = ("The DVC remote medops pushes datasets and pipeline outputs to. Credentials go "
                    "to the project's .dvc/config.local (ignored by git), never to .dvc/config.")
    _documentation_url = "https://dvc.org/doc/command-reference/remote"

    remote_name: str = Field(default="storage", description="The remote's name in the DVC config.")
    url: str = Field(description="e.g. s3://bucket/medops, or a folder.")
    endpoint_url: Optional[str] = Field(default=None, description="S3-compatible store (MinIO, Ceph).")
    access_key_id: Optional[str] = Field(default=None)
    secret_access_key: Optional[SecretStr] = Field(default=None)

    def configure(self, root: Path | str) -> str:
        """Write this remote into the project at ``root`` as its default remote; returns its name."""
        from medops.ops import dvc

        dvc.ensure_remote(root, self.remote_name, self.url, default=True)
        if self.endpoint_url:
            dvc.configure_remote(root, self.remote_name, endpointurl=self.endpoint_url)
        local = {"access_key_id": self.access_key_id,
                 "secret_access_key": self.secret_access_key.get_secret_value() if self.secret_access_key else None}
        for key, value in local.items():
            if value:
                dvc.run_dvc(root, "remote", "modify", "--local", self.remote_name, key, value)
        return self.remote_name


def load_block(cls: type[B], name: str) -> Optional[B]:
    """The block document ``name`` of type ``cls``, or None when there is none (or its type was
    never registered). A Prefect API that cannot be reached is an error, not "none"."""
    try:
        return cls.load(name)  # type: ignore[return-value]
    except ValueError:
        return None


def triton_server() -> Optional[TritonServer]:
    return load_block(TritonServer, TRITON_BLOCK)


def dvc_remote() -> Optional[DvcRemote]:
    return load_block(DvcRemote, DVC_REMOTE_BLOCK)


def deid_key() -> Optional[bytes]:
    """The de-identification key from the Secret block ``medops-deid-key``, or None."""
    from prefect.blocks.system import Secret

    secret = load_block(Secret, DEID_KEY_SECRET)
    if secret is None:
        return None
    value = secret.get()
    return str(value).encode() if value else None
