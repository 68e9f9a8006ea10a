"""Deploy: put a gated, exported model into the running Triton as a new version.

Inputs: the exported ONNX file, the gate decision (``reports/gate.json``), the export result
(``models/export.json``: ``sha256`` of the ONNX file and ``data_version``), a running Triton.
Outputs: a new version folder in the model repository, loaded and answering; a DeployResult.
Params: ``serving`` (model name, batching), and the model input size (``ingest.image_size``).

Order of checks (TFX's "pusher reads the blessing"): the gate must have passed, for the same
data version the model was exported from, and the ONNX file must be the one that was exported
(its sha256). Only then is a version written, loaded with Triton's model-control API, waited for
and asked a real inference. A version that fails to load or answer is removed again, and Triton
keeps serving what it served before.

Not a DVC stage: it changes a running server. The CLI and the Prefect flow call ``deploy()``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from medops.config import ServingConfig
from medops.errors import GateRejectedError, ServingError
from medops.serving.contract import build_contract
from medops.serving.repository import remove_version, write_version


class DeployResult(BaseModel):
    model_name: str
    version: int
    data_version: str
    sha256: str
    url: str
    protocol: str
    repository: str
    smoke_probability: float


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_gate(gate: Path) -> str:
    """The gate decision must exist and have passed (``medops.gate.require_passed``).

    Returns:
        The data version the gate judged.

    Raises:
        GateRejectedError: missing, invalid or failed decision; the message lists the failed checks.
    """
    from medops.gate import require_passed

    return require_passed(Path(gate)).data_version


def check_export(onnx: Path, export_result: Path, gate_data_version: str | None) -> tuple[str, str]:
    """The ONNX file must be the exported one, exported from the data version the gate judged.

    Returns:
        ``(sha256, data_version)``.
    """
    onnx, export_result = Path(onnx), Path(export_result)
    if not onnx.is_file():
        raise ServingError(f"no ONNX model at {onnx}: run the export stage before deploying")
    try:
        exported = json.loads(export_result.read_text())
    except (OSError, ValueError) as exc:
        raise ServingError(f"cannot read export result {export_result}: {exc}") from exc
    digest = sha256_file(onnx)
    if exported.get("sha256") != digest:
        raise GateRejectedError(
            f"{onnx} has sha256 {digest[:12]}…, but {export_result} recorded "
            f"{str(exported.get('sha256'))[:12]}…: this is not the model that was exported and gated"
        )
    data_version = str(exported.get("data_version") or "")
    if gate_data_version and data_version and gate_data_version != data_version:
        raise GateRejectedError(
            f"gate judged data version {gate_data_version}, but the model was exported from "
            f"{data_version}; re-run the gate for this model"
        )
    return digest, data_version


def _control_client(url: str, protocol: str) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(url)
    if protocol == "http":
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(url, network_timeout=120.0)
    raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")


def wait_version_ready(client: Any, name: str, version: int, timeout: float) -> None:
    """Poll until ``name`` version ``version`` reports ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.is_model_ready(name, str(version)):
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        time.sleep(0.2)
    raise ServingError(f"model {name!r} version {version} not ready after {timeout:g} s")


def smoke_infer(client: Any, *, protocol: str, name: str, version: int, image_size: int) -> float:
    """One real inference on ``version`` (a mid-grey image); its probability must be in [0, 1]."""
    from medops.client import infer_images

    image = np.full((1, image_size, image_size, 1), 0.5, dtype=np.float32)
    probs, answered = infer_images(client, image, protocol=protocol, model_name=name,
                                   model_version=str(version))
    prob = float(probs[0])
    if not 0.0 <= prob <= 1.0 or answered != str(version):
        raise ServingError(
            f"smoke inference on {name!r} v{version} answered probability {prob} from version "
            f"{answered!r}; expected a value in [0, 1] from version {version}"
        )
    return prob


def deploy(
    cfg: ServingConfig,
    *,
    onnx: Path,
    gate: Path,
    export_result: Path,
    repository: Path,
    url: str | None = None,
    protocol: Literal["grpc", "http"] = "grpc",
    image_size: int,
    timeout: float = 120.0,
) -> DeployResult:
    """Write ``onnx`` as the next version of ``cfg.model_name``, load it and check it answers.

    Raises:
        GateRejectedError: the gate did not pass (its reasons are in the message), or the ONNX
            file / data version is not the one the gate judged. Nothing is written.
        ServingError: Triton unreachable, or the new version failed to load or answer (the
            version is removed again and the previous one stays served).
    """
    gate_data_version = check_gate(gate)
    digest, data_version = check_export(onnx, export_result, gate_data_version)
    url = url or (cfg.grpc_url if protocol == "grpc" else cfg.http_url)
    contract = build_contract(cfg, image_size=image_size)
    client = _control_client(url, protocol)
    try:
        try:
            client.is_server_live()
        except Exception as exc:  # noqa: BLE001
            raise ServingError(f"cannot reach Triton at {url} over {protocol}: {exc}") from None
        version, _ = write_version(contract, Path(repository), Path(onnx), flavour="embedded")
        try:
            client.load_model(contract.name)
            wait_version_ready(client, contract.name, version, timeout)
            prob = smoke_infer(client, protocol=protocol, name=contract.name, version=version,
                               image_size=image_size)
        except Exception as exc:
            remove_version(Path(repository), contract.name, version)
            _reload_quietly(client, contract.name)
            if isinstance(exc, ServingError):
                raise
            raise ServingError(
                f"Triton at {url} could not load {contract.name!r} version {version}: {exc}"
            ) from None
    finally:
        client.close()
    return DeployResult(
        model_name=contract.name, version=version, data_version=data_version, sha256=digest,
        url=url, protocol=protocol, repository=str(Path(repository).resolve()),
        smoke_probability=prob,
    )


def _reload_quietly(client: Any, name: str) -> None:
    # After removing a bad version, reload so Triton's view matches the repository again.
    try:
        client.load_model(name)
    except Exception:  # noqa: BLE001 - best effort; the caller reports the original failure
        pass
