"""Deploy: put a gated, exported model into the running Triton as a new version, safely.

Inputs: the exported ONNX file and ``golden.npz`` beside it, the gate decision
(``reports/gate.json``), the export result (``models/export.json``: ``sha256``, ``data_version``,
``parity_atol``), a running Triton.
Outputs: a new version folder ``<repo>/<name>/<N>/`` (model, golden samples, ``deploy.json``),
served by the classifier and by the DICOM ensemble ``<name>_dicom`` (preprocess -> classifier ->
postprocess); a DeployResult.
Params: ``serving`` (model name, batching, byte and pixel limits for uploads);
``ingest.preprocessing`` (the PreprocessSpec ingest prepared the training data with); the
decision threshold (export.json's ``decision_threshold``, chosen on val in training, unless given).

Order (TFX's "pusher reads the blessing"): the gate must have passed, for the data version the
model was exported from, and the ONNX file must be the exported one (sha256). Only then is a
version written, beside the served one, which stays pinned. The new version is loaded as a
separate candidate model and must reproduce export's golden probabilities (and, for a model
exported with the OOD guard, its golden ood_scores: classifier and detector are one ONNX file, so
they are written, checked, served and rolled back together); only then is it served
(classifier and ensemble re-pinned without a gap) and checked again. Any failure removes the new
version and leaves (or restores) the previous one; ``rollback`` serves an earlier version again.

Not a DVC stage: it changes a running server. The CLI and the Prefect flow call ``deploy()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel

from medops.atomic import crash_point, write_text
from medops.config import PreprocessSpec, ServingConfig
from medops.errors import GateRejectedError, ServerUnreachableError, ServingError, first_line
from medops.hashing import sha256_file
from medops.serving.contract import (
    ONNX_FILENAME,
    PYTHON_FILENAME,
    EnsembleContract,
    Flavour,
    ModelContract,
    build_ensemble_contract,
    render_config,
    render_ensemble_config,
)
from medops.serving.audit import audited
from medops.serving.server import ADMIN_KEY_ENV, admin_headers, admin_key_from_env, endpoint
from medops.serving.repository import (
    GOLDEN_FILE,
    LOCK_FILE,
    VERSION_INFO,
    discard_unfinished,
    list_versions,
    postprocess_thresholds,
    processing_files,
    remove_version,
    restore_files,
    snapshot_files,
    served_version,
    write_config,
    write_ensemble,
    write_processing_models,
    write_version,
)


class DeployResult(BaseModel):
    """What was deployed, from what, and how it was checked; also kept as ``<N>/deploy.json``."""

    model_name: str
    version: int
    previous_version: int | None
    data_version: str
    sha256: str
    url: str
    protocol: str
    repository: str
    golden_max_abs_diff: float
    golden_atol: float
    n_golden: int
    threshold: float  # the ensemble labels "pneumonia" at probability >= this
    unchanged: bool = False  # this very model (same ONNX, same threshold) was already served
    flavour: str = "embedded"  # serving.flavor: what was written for the classifier
    precision: str = "fp32"    # "int8": the gate chose the quantize stage's model
    # "triton": a server loaded it as a candidate and it reproduced the golden outputs, then
    # served it; "none" (deploy --no-verify): written and pinned with no server's check (its
    # file was checked against the golden outputs in onnxruntime here, on the CPU)
    verified_by: str = "triton"


def check_gate(gate: Path) -> str:
    """The gate decision must exist and have passed (``medops.results.require_passed``).

    Returns:
        The data version the gate judged.

    Raises:
        GateRejectedError: missing, invalid or failed decision; the message lists the failed checks.
    """
    from medops.results import require_passed

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


def read_golden(path: Path, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n,S,S,1) float32, probabilities (n,) float32)`` from export's golden.npz; for a
    model exported with the OOD guard the second is ``(n, 2)``: probabilities and ood_scores."""
    path = Path(path)
    try:
        with np.load(path) as data:
            images = np.asarray(data["images"], dtype=np.float32)
            probs = np.asarray(data["probabilities"], dtype=np.float32).reshape(-1)
            if "ood_scores" in data.files:
                probs = np.stack([probs, np.asarray(data["ood_scores"], dtype=np.float32).reshape(-1)], 1)
    except (OSError, KeyError, ValueError) as exc:
        raise ServingError(
            f"cannot read golden samples {path} (written by export beside model.onnx): {exc}"
        ) from None
    if images.shape[1:] != (image_size, image_size, 1) or len(images) != len(probs) or not len(probs):
        raise ServingError(
            f"golden samples {path} have images {list(images.shape)} and {len(probs)} "
            f"probabilities; expected [n, {image_size}, {image_size}, 1] with n >= 1 of each"
        )
    return images, probs


def _export_atol(export_result: Path, default: float = 1e-4) -> float:
    try:
        return float(json.loads(Path(export_result).read_text()).get("parity_atol", default))
    except (OSError, ValueError, TypeError):
        return default


class _AdminClient:
    """A tritonclient whose model-control calls carry the admin header (restricted servers)."""

    def __init__(self, client: Any, headers: dict[str, str] | None) -> None:
        self._client, self._headers = client, headers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def load_model(self, name: str, **kwargs: Any) -> Any:
        return self._client.load_model(name, headers=self._headers, **kwargs)

    def unload_model(self, name: str, **kwargs: Any) -> Any:
        return self._client.unload_model(name, headers=self._headers, **kwargs)


class _Connection:
    """A tritonclient for ``url`` that is always closed (open clients hold Triton's shutdown),
    checked on entry: reachable, and its model-repository API usable with ``admin_key``."""

    def __init__(self, url: str, protocol: str, admin_key: str | None = None) -> None:
        if protocol == "grpc":
            import tritonclient.grpc as grpcclient

            self.client = grpcclient.InferenceServerClient(url)
        elif protocol == "http":
            import tritonclient.http as httpclient

            self.client = httpclient.InferenceServerClient(url, network_timeout=300.0)
        else:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url, self.protocol = url, protocol
        self.headers = admin_headers(admin_key or admin_key_from_env(), protocol)

    def __enter__(self) -> Any:
        try:
            self.client.is_server_live()
        except Exception as exc:  # noqa: BLE001 - any transport failure
            self.client.close()
            raise ServerUnreachableError(f"cannot reach Triton at {self.url} over {self.protocol}: "
                               f"{first_line(exc)}") from None
        try:
            self.client.get_model_repository_index(headers=self.headers)
        except Exception as exc:  # noqa: BLE001
            self.client.close()
            hint = ("the model-repository key was refused" if self.headers else
                    f"set ${ADMIN_KEY_ENV} to the key the server was started with")
            raise ServingError(
                f"Triton at {self.url} refused its model-repository API ({hint}): {first_line(exc)}"
            ) from None
        return _AdminClient(self.client, self.headers)

    def __exit__(self, *exc: object) -> None:
        self.client.close()


@contextlib.contextmanager
def _exclusive(repository: Path) -> Iterator[None]:
    """One deploy or rollback at a time per repository (a Prefect retry racing a CLI deploy
    would otherwise pick the same version number or re-pin under each other)."""
    repository.mkdir(parents=True, exist_ok=True)
    with open(repository / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ServingError(
                f"another deploy or rollback is running on {repository}; try again when it is done"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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


# served vs exported ood_score of the golden images (export's own ood_parity_atol default)
GOLDEN_OOD_ATOL = 1e-3
# the production flavour with serving.tensorrt_fp16 computes in FP16 (about 3 decimal digits):
# its golden tolerance is at least this
FP16_GOLDEN_ATOL = 1e-2


def check_golden(
    client: Any, *, protocol: str, name: str, images: np.ndarray, expected: np.ndarray,
    atol: float, expect_version: str | None = None,
) -> float:
    """Infer the golden images on ``name`` (whichever version Triton serves); every probability
    within ``atol`` of export's, and for a guarded model (``expected`` (n, 2)) every ood_score
    within GOLDEN_OOD_ATOL and in_distribution ``ood_score <= 1``: the detector that serves is
    the one exported with this classifier. ``expect_version``: the version that must answer.
    Returns the largest absolute probability difference.
    """
    from medops.serving.client import infer_images

    guarded = expected.ndim == 2
    probs, answered, *ood = infer_images(client, images, protocol=protocol, model_name=name,
                                         with_ood=guarded)
    diff = float(np.max(np.abs(probs.astype(np.float64) - (expected[:, 0] if guarded else expected))))
    if not diff <= atol:
        raise ServingError(
            f"golden check failed on {name!r}: max |served - exported| = {diff:.3g} > {atol:g} "
            f"over {len(expected)} golden images"
        )
    if guarded:
        scores, inside = ood[0]
        ood_diff = float(np.max(np.abs(scores - expected[:, 1])))
        ood_atol = max(GOLDEN_OOD_ATOL, atol)  # FP16 serving widens both (FP16_GOLDEN_ATOL)
        if not ood_diff <= ood_atol or not np.array_equal(inside, scores <= 1.0):
            raise ServingError(
                f"golden check failed on {name!r}: the served OOD guard is not the exported one "
                f"(max |ood_score served - exported| = {ood_diff:.3g} > {ood_atol:g}, or "
                "in_distribution is not ood_score <= 1)")
    if expect_version is not None and answered != expect_version:
        raise ServingError(f"{name!r} answered from version {answered!r}, expected {expect_version}")
    return diff


def candidate_name(name: str) -> str:
    return f"{name}__candidate"


def check_candidate(
    client: Any, *, protocol: str, contract: ModelContract, version_dir: Path,
    images: np.ndarray, expected: np.ndarray, atol: float, timeout: float,
    flavour: Flavour = "embedded",
) -> float:
    """Load ``version_dir`` on the running Triton as a separate candidate model (config and files
    sent through the model-control API, nothing added to the repository), check it against the
    golden samples, unload it. Traffic for the real model never reaches it."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    cand = candidate_name(contract.name)
    config = text_format.Parse(render_config(contract, flavour), model_config_pb2.ModelConfig())
    config.name = cand
    names = (ONNX_FILENAME, PYTHON_FILENAME) if flavour == "embedded" else (ONNX_FILENAME,)
    files = {f"file:1/{f}": (Path(version_dir) / f).read_bytes() for f in names}
    try:
        client.load_model(cand, config=json_format.MessageToJson(config, preserving_proto_field_name=True),
                          files=files)
        wait_version_ready(client, cand, 1, timeout)
        return check_golden(client, protocol=protocol, name=cand, images=images, expected=expected,
                            atol=atol)
    finally:
        try:
            client.unload_model(cand)
        except Exception:  # noqa: BLE001 - never loaded
            pass


def _switch(client: Any, ec: EnsembleContract, repository: Path, old: int | None,
            new: int | None, timeout: float, *,
            restore: dict[str, bytes | None] | None = None) -> None:
    """Serve classifier version ``new`` (and the ensemble pinned to it) instead of ``old``.

    No gap, and no answer labelled with another version's threshold: postprocess version N
    holds version N's threshold, so first the postprocessing model serves ``old`` and ``new``
    (each at its own threshold), then the classifier serves both (a tensor client labels with
    the threshold of the version that answered, read from the postprocessing config), then the
    ensemble is re-pinned to classifier ``new`` and postprocess ``new`` in one load (Triton
    keeps the old ensemble answering until the new one is ready); then ``old`` is unloaded from
    both. ``new`` None unloads the classifier and the ensemble (nothing was served before).
    The preprocessing model is rendered from ``ec``, or, when undoing a failed deploy, put back
    as ``restore`` (a ``snapshot_files`` taken before); so is the postprocessing model, once
    the ensemble no longer uses the versions it leaves out.
    """
    c, repository = ec.classifier, Path(repository)
    pre, post = ec.preprocess_name, ec.postprocess_name
    if new is None:
        if restore is not None:
            restore_files(repository, restore)
        for name in (ec.ensemble_name, c.name, *((pre, post) if restore is not None else ())):
            (repository / name / "config.pbtxt").unlink(missing_ok=True)
            try:
                client.unload_model(name)
            except Exception:  # noqa: BLE001 - was not loaded
                pass
        return
    on_disk = list_versions(repository, c.name)
    both = sorted({v for v in (old, new) if v is not None and v in on_disk})
    post_config = f"{post}/config.pbtxt"
    served = postprocess_thresholds(_read_or_none(repository / post_config))
    if restore is not None:
        # keep whatever the ensemble may still pin until it is re-pinned; trimmed below
        target = postprocess_thresholds(restore.get(post_config))
        thresholds = served | {new: _threshold_of_version(repository, c.name, new, target,
                                                          ec.threshold)}
        restore_files(repository, {k: v for k, v in restore.items()
                                   if k.split("/", 1)[0] == pre})
        changed = [pre]
    else:
        thresholds = {v: _threshold_of_version(repository, c.name, v, served, ec.threshold)
                      for v in both if v != new} | {new: ec.threshold}
        changed = write_processing_models(ec, repository, ec.flavour, thresholds=thresholds,
                                          models=[pre])
    changed += write_processing_models(ec, repository, ec.flavour, thresholds=thresholds,
                                       models=[post])
    for name in (pre, post):
        if not (repository / name / "config.pbtxt").is_file():
            continue  # not part of this flavour's repository
        if name in changed or not client.is_model_ready(name):
            client.load_model(name)
    wait_version_ready(client, post, new, timeout)
    write_config(c, repository, ec.flavour, versions=both)
    client.load_model(c.name)
    wait_version_ready(client, c.name, new, timeout)
    crash_point("deploy.switching")
    write_ensemble(ec, repository, new)
    client.load_model(ec.ensemble_name)
    wait_version_ready(client, ec.ensemble_name, new, timeout)
    _retire_recorder(client, ec, repository)
    if both != [new]:
        write_config(c, repository, ec.flavour, versions=[new])
        client.load_model(c.name)
        wait_version_ready(client, c.name, new, timeout)
    before = snapshot_files(repository, [post_config])
    if restore is not None:
        restore_files(repository, {k: v for k, v in restore.items() if k.startswith(f"{post}/")})
    else:
        write_processing_models(ec, repository, ec.flavour, thresholds={new: ec.threshold},
                                models=[post])
    if snapshot_files(repository, [post_config]) != before:
        client.load_model(post)
        wait_version_ready(client, post, new, timeout)


def _retire_recorder(client: Any, ec: EnsembleContract, repository: Path) -> None:
    """Unload and remove the drift recorder model a repository written before the
    postprocessing model recorded may still hold: the ensemble just loaded no longer calls it
    (its records now come from the postprocessing model)."""
    folder = Path(repository) / ec.recorder_name
    if not folder.is_dir():
        return
    try:
        client.unload_model(ec.recorder_name)
    except Exception:  # noqa: BLE001 - it was not loaded
        pass
    shutil.rmtree(folder, ignore_errors=True)


def _read_or_none(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _threshold_of_version(repository: Path, name: str, version: int, served: dict[int, float],
                          default: float) -> float:
    """The threshold classifier ``version`` is served with: the postprocessing model's, else the
    one its deploy.json recorded, else ``default``."""
    if version in served:
        return served[version]
    return _recorded_threshold(Path(repository) / name / str(version) / VERSION_INFO, "threshold",
                               default)


def smoke_dicom(image: np.ndarray) -> bytes:
    """A minimal 8-bit MONOCHROME2 DICOM file (bytes) of a [0, 1] image, for the ensemble check."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.clip(np.rint(np.asarray(image, dtype=np.float64).squeeze() * 255), 0, 255)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def check_ensemble(client: Any, *, protocol: str, ec: EnsembleContract, image: np.ndarray,
                   expect_version: int) -> None:
    """One DICOM through the ensemble: answered, no error, a label (none only if withheld as out
    of distribution), from ``expect_version``."""
    from medops.serving.client import infer_dicom

    [prob], [label], [error], answered, (_, [inside]) = infer_dicom(
        client, [smoke_dicom(image)], protocol=protocol, model_name=ec.ensemble_name,
        with_ood=True)
    # serving.ood_action: withhold leaves an image the guard calls out of distribution unlabelled
    withheld = label == "" and not inside and ec.classifier.ood_action == "withhold"
    if error or (label not in ec.classifier.labels and not withheld) or not 0.0 <= prob <= 1.0 \
            or answered != str(expect_version):
        raise ServingError(
            f"DICOM check on {ec.ensemble_name!r} answered probability {prob}, label {label!r}, "
            f"error {error!r} from version {answered!r}; expected a label from version "
            f"{expect_version}"
        )


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


@audited("deploy")  # who, when, what, why and the outcome: medops.serving.audit
def deploy(
    cfg: ServingConfig,
    *,
    onnx: Path,
    gate: Path,
    export_result: Path,
    repository: Path,
    url: str | None = None,
    protocol: Literal["grpc", "http"] = "grpc",
    preprocessing: PreprocessSpec,
    threshold: float | None = None,
    golden: Path | None = None,
    golden_atol: float | None = None,
    admin_key: str | None = None,
    timeout: float = 120.0,
    verify: bool = True,
) -> DeployResult:
    """Deploy ``onnx`` as the next version of ``cfg.model_name`` on the running Triton.

    1. The gate decision must have passed, for the data version export recorded, and ``onnx``
       must be the exported file (sha256); nothing is written otherwise. When the gate chose
       INT8 (``gated_int8``), the quantize stage's model is deployed instead.
    2. The new version is written beside the served one; config.pbtxt keeps the served version
       pinned, so a reload or restart cannot serve it early.
    3. It is loaded as a separate candidate model and must reproduce export's golden
       probabilities (``golden.npz`` beside the ONNX file) within ``golden_atol`` (default:
       export's ``parity_atol``).
    4. Only then is it served: pinned in the classifier's config and in the DICOM ensemble's
       (``<name>_dicom``: ``preprocessing`` within ``cfg``'s byte and pixel limits ->
       classifier -> labels at ``threshold``, default export.json's ``decision_threshold``,
       else 0.5), and checked again through both.
       A failure at 3 or 4 removes the new version and keeps (or restores) the previous one.

    ``admin_key`` (default ``$MEDOPS_TRITON_ADMIN_KEY``) unlocks a restricted model-repository API.
    ``repository`` must be the server's own model repository (the same folder, e.g. a shared
    volume mounted here): files are written here and the server is only asked to load models
    by name, so a remote server with a repository of its own never sees them. The classifier
    is written in ``cfg.flavor`` (embedded: Python-backend model.py; production: onnxruntime
    backend on a GPU, as deploy/model_repository/); ``verify`` False: ``_deploy_unverified``.

    Raises:
        GateRejectedError: gate not passed (its failed checks are in the message), or the ONNX
            file / data version is not what the gate judged.
        ServerUnreachableError: Triton does not answer at ``url`` (with the production flavour
            the message names ``--no-verify``); nothing is written.
        ServingError: the new version failed to load or to match the golden samples; the
            message says which version is still served.
    """
    release = _check_release(onnx, gate=gate, export_result=export_result,
                             image_size=preprocessing.image_size, golden=golden,
                             golden_atol=golden_atol, threshold=threshold)
    ec, url = _contract_and_url(cfg, url, protocol, preprocessing, release.threshold)
    if ec.flavour == "production" and ec.classifier.tensorrt_fp16:
        release = release._replace(atol=max(release.atol, FP16_GOLDEN_ATOL))
    repository = Path(repository)
    if not verify:
        return _deploy_unverified(ec, repository, release, url=url, protocol=protocol)
    with _exclusive(repository), _verifying(ec, url, protocol, admin_key) as client:
        discard_unfinished(repository, ec.classifier.name)  # what a deploy killed half-way left
        previous = served_version(repository, ec.classifier.name)
        already = already_served(client, repository, ec, previous, release.sha256)
        if already is not None:
            return already
        version, version_dir = _add_candidate(client, protocol=protocol, contract=ec.classifier,
                                              repository=repository, release=release,
                                              previous=previous, timeout=timeout,
                                              flavour=ec.flavour)
        diff = _promote(client, protocol=protocol, ec=ec, repository=repository, release=release,
                        previous=previous, version=version, timeout=timeout)
        result = DeployResult(
            model_name=ec.classifier.name, version=version, previous_version=previous,
            data_version=release.data_version, sha256=release.sha256, url=url, protocol=protocol,
            repository=str(repository.resolve()), golden_max_abs_diff=diff, golden_atol=release.atol,
            n_golden=len(release.expected), threshold=ec.threshold, flavour=ec.flavour,
            precision=release.precision,
        )
        crash_point("deploy.served")
        # the version's record, under the lock: it marks the version as finished
        write_text(version_dir / VERSION_INFO, result.model_dump_json(indent=2) + "\n")
    return result


class _Release(NamedTuple):
    """What deploy's step 1 established: the gated, exported model and the golden samples it must
    reproduce."""

    onnx: Path
    sha256: str
    data_version: str
    golden: Path
    images: np.ndarray
    expected: np.ndarray
    atol: float
    threshold: float
    precision: str = "fp32"  # "int8": the gate chose the quantize stage's model (models/int8)


def _check_release(onnx: Path, *, gate: Path, export_result: Path, image_size: int,
                   golden: Path | None, golden_atol: float | None,
                   threshold: float | None) -> _Release:
    """Deploy's step 1, before anything is written: the gate passed for the data version export
    recorded, ``onnx`` is the exported file, its golden samples can be read; the tolerance and
    the threshold default to the ones export recorded."""
    gate_data_version = check_gate(gate)
    digest, data_version = check_export(onnx, export_result, gate_data_version)
    int8 = gated_int8(gate, Path(onnx), digest)
    if int8 is not None:  # the gate chose INT8: its own file, golden outputs and tolerance
        onnx, digest, golden, golden_atol = int8
    golden = Path(golden) if golden else Path(onnx).with_name(GOLDEN_FILE)
    images, expected = read_golden(golden, image_size)
    return _Release(
        onnx=Path(onnx), sha256=digest, data_version=data_version, golden=golden, images=images,
        expected=expected,
        atol=golden_atol if golden_atol is not None else _export_atol(export_result),
        threshold=(threshold if threshold is not None
                   else _recorded_threshold(export_result, "decision_threshold")),
        precision="fp32" if int8 is None else "int8",
    )


INT8_DIR = "int8"  # the quantize stage's folder beside model.onnx (models/int8)


def gated_int8(gate: Path, onnx: Path, fp32_sha256: str) -> tuple[Path, str, Path, float] | None:
    """``(model, sha256, golden, golden atol)`` of the INT8 model when the gate decided to serve
    it (``int8.serve`` in gate.json), else None (FP32). The file must be the one the gate judged
    (sha256), made from this very FP32 export; otherwise GateRejectedError, nothing is written."""
    from medops.results import read_decision

    decision = read_decision(gate).int8
    if decision is None or not decision.serve:
        return None
    model = Path(onnx).parent / INT8_DIR / ONNX_FILENAME
    digest = sha256_file(model) if model.is_file() else None
    if digest is None or digest != decision.sha256:
        raise GateRejectedError(f"the gate chose the INT8 model {model}, but it is "
                                f"{'missing' if digest is None else 'another file (sha256)'}: "
                                "re-run the quantize and gate stages")
    if decision.source_sha256 != fp32_sha256:
        raise GateRejectedError(f"the INT8 model the gate chose was made from another export "
                                f"than {onnx}: re-run the quantize and gate stages")
    return model, digest, model.with_name(GOLDEN_FILE), float(decision.golden_atol or 1e-3)


def _kept(previous: int | None) -> str:
    return f"version {previous} is still served" if previous else "nothing was served before"


def _add_candidate(client: Any, *, protocol: str, contract: ModelContract, repository: Path,
                   release: _Release, previous: int | None, timeout: float,
                   flavour: Flavour = "embedded") -> tuple[int, Path]:
    """Deploy's steps 2 and 3: write the new version beside the served one (``previous`` stays
    pinned), load it as a separate candidate model and check it against the golden samples;
    if that fails, remove it. Returns ``(version, its folder)``."""
    version, version_dir = write_version(contract, repository, release.onnx, flavour=flavour,
                                         golden=release.golden)
    config = snapshot_files(repository, [f"{contract.name}/config.pbtxt"])  # its flavour, too
    if previous is not None:
        write_config(contract, repository, flavour, versions=[previous])
    crash_point("deploy.written")
    try:
        check_candidate(client, protocol=protocol, contract=contract, version_dir=version_dir,
                        images=release.images, expected=release.expected, atol=release.atol,
                        timeout=timeout, flavour=flavour)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not serve it
        remove_version(repository, contract.name, version)
        restore_files(repository, config)
        raise ServingError(
            f"not serving {contract.name!r} version {version}: candidate check failed: "
            f"{_why(exc)}; {_kept(previous)}"
        ) from None
    return version, version_dir


def _promote(client: Any, *, protocol: str, ec: EnsembleContract, repository: Path,
             release: _Release, previous: int | None, version: int, timeout: float) -> float:
    """Deploy's step 4: serve ``version`` instead of ``previous`` and check it again, through the
    classifier (golden samples) and the DICOM ensemble; if that fails, remove it and serve
    ``previous`` again. Returns the largest golden difference."""
    name = ec.classifier.name
    before = snapshot_files(repository, _processing_rels(ec, previous, version))
    try:
        _switch(client, ec, repository, previous, version, timeout)
        diff = check_golden(client, protocol=protocol, name=name, images=release.images,
                            expected=release.expected, atol=release.atol,
                            expect_version=str(version))
        check_ensemble(client, protocol=protocol, ec=ec, image=release.images[0],
                       expect_version=version)
    except Exception as exc:  # noqa: BLE001
        remove_version(repository, name, version)
        kept = _kept(previous)
        try:
            _switch(client, ec, repository, None, previous, timeout, restore=before)
        except Exception as again:  # noqa: BLE001
            kept = f"restoring version {previous} failed too: {_why(again)}"
        remove_version(repository, ec.ensemble_name, version)
        raise ServingError(
            f"not serving {name!r} version {version}: it failed once promoted: "
            f"{_why(exc)}; {kept}"
        ) from None
    return diff


def already_served(client: Any, repository: Path, ec: EnsembleContract, version: int | None,
                   digest: str) -> DeployResult | None:
    """The served version's record if it holds this very ONNX file, is ready, and every served
    config is what deploying it with ``ec`` would write (threshold, batching, and the
    preprocessing settings: limits, window, frame, pixel spacing): deploying it again would only
    add an identical version (``make demo`` run twice). Any difference deploys as usual, so new
    settings reach the server."""
    if version is None:
        return None
    name = ec.classifier.name
    try:
        record = DeployResult.model_validate_json(
            (Path(repository) / name / str(version) / VERSION_INFO).read_text())
        ready = client.is_model_ready(name, str(version))
    except Exception:  # noqa: BLE001 - no record, or unreadable: deploy as usual
        return None
    if record.sha256 != digest or record.threshold != ec.threshold or not ready:
        return None
    expected = _served_files(ec, version)
    if snapshot_files(repository, expected) != expected:
        return None
    return record.model_copy(update={"unchanged": True})


def _served_files(ec: EnsembleContract, version: int) -> dict[str, bytes]:
    """What a deploy (or rollback) serving classifier ``version`` with ``ec`` leaves in the
    repository's configs and processing models, ``{relative path: content}``."""
    files = processing_files(ec, ec.flavour, thresholds={version: ec.threshold})
    files[f"{ec.classifier.name}/config.pbtxt"] = render_config(
        ec.classifier, ec.flavour, versions=[version]).encode()
    files[f"{ec.ensemble_name}/config.pbtxt"] = render_ensemble_config(
        ec, classifier_version=version).encode()
    return files


class RollbackResult(BaseModel):
    model_name: str
    from_version: int | None
    to_version: int
    golden_max_abs_diff: float | None = None
    threshold: float
    flavour: str = "embedded"
    verified_by: str = "triton"  # or "none": rollback --no-verify (see DeployResult)


@audited("rollback")
def rollback(
    cfg: ServingConfig,
    *,
    repository: Path,
    url: str | None = None,
    protocol: Literal["grpc", "http"] = "grpc",
    preprocessing: PreprocessSpec,
    to_version: int | None = None,
    threshold: float | None = None,
    admin_key: str | None = None,
    timeout: float = 120.0,
    verify: bool = True,
) -> RollbackResult:
    """Serve an earlier version again: ``to_version``, or the newest one below the served one.

    The target was gated when it was deployed; it is checked against the golden samples kept in
    its version folder (directly and through the DICOM ensemble, re-pinned to it) before the
    rollback counts as done. The newer version stays on disk. ``preprocessing`` as for
    ``deploy``; ``threshold`` defaults to the one the target version was deployed with.
    ``repository`` must be the server's own model repository, as for ``deploy``; ``verify``
    False re-pins the configs with no server's check, as ``deploy(verify=False)`` does.

    Raises:
        ServerUnreachableError: Triton does not answer at ``url``.
        ServingError: no earlier version, or the target failed to load or
            answer (the previously served version is then restored).
    """
    name, repository = cfg.model_name, Path(repository)
    with _exclusive(repository):
        discard_unfinished(repository, name)  # what a deploy killed half-way left
        # read what is served only under the lock: a deploy finishing meanwhile changes it
        current, to_version = _rollback_target(repository, name, to_version)
        if threshold is None:
            threshold = _recorded_threshold(repository / name / str(to_version) / VERSION_INFO,
                                            "threshold")
        ec, url = _contract_and_url(cfg, url, protocol, preprocessing, threshold)
        contract, image_size = ec.classifier, preprocessing.image_size
        golden = repository / contract.name / str(to_version) / GOLDEN_FILE
        if not verify:
            return _rollback_unverified(ec, repository, current, to_version, image_size)
        with _verifying(ec, url, protocol, admin_key) as client:
            before = snapshot_files(repository, _processing_rels(ec, current, to_version))
            try:
                _switch(client, ec, repository, current, to_version, timeout)
                diff = None
                image = np.full((image_size, image_size, 1), 0.5, dtype=np.float32)
                if golden.is_file():
                    images, expected = read_golden(golden, image_size)
                    diff = check_golden(client, protocol=protocol, name=contract.name,
                                        images=images, expected=expected,
                                        atol=_golden_atol_of(golden),
                                        expect_version=str(to_version))
                    image = images[0]
                check_ensemble(client, protocol=protocol, ec=ec, image=image,
                               expect_version=to_version)
            except Exception as exc:  # noqa: BLE001
                served = f"version {current} is served"
                try:
                    _switch(client, ec, repository, to_version, current, timeout, restore=before)
                except Exception as again:  # noqa: BLE001
                    served = f"restoring version {current} failed too: {_why(again)}"
                raise ServingError(
                    f"rollback of {contract.name!r} to version {to_version} failed: "
                    f"{_why(exc)}; {served}"
                ) from None
    return RollbackResult(model_name=contract.name, from_version=current, to_version=to_version,
                          golden_max_abs_diff=diff, threshold=ec.threshold, flavour=ec.flavour)


def _rollback_target(repository: Path, name: str, to_version: int | None) -> tuple[int | None, int]:
    """``(served version, version to serve)``: ``to_version``, or the newest below the served one."""
    current = served_version(repository, name)
    versions = list_versions(repository, name)
    if to_version is None:
        older = [v for v in versions if current is None or v < current]
        if not older:
            raise ServingError(
                f"no version of {name!r} older than the served version {current} in "
                f"{repository} (versions on disk: {versions or 'none'})"
            )
        return current, older[-1]
    if to_version not in versions:
        raise ServingError(f"{name!r} has no version {to_version} in {repository} "
                           f"(versions on disk: {versions or 'none'})")
    return current, to_version


def _contract_and_url(cfg: ServingConfig, url: str | None, protocol: str,
                      preprocessing: PreprocessSpec, threshold: float) -> tuple[EnsembleContract, str]:
    """The ensemble contract deploy and rollback serve, and ``url`` or ``cfg``'s endpoint for
    ``protocol``."""
    ec = build_ensemble_contract(cfg, preprocessing, threshold=threshold)
    return dataclasses.replace(ec, flavour=cfg.flavor), url or endpoint(cfg, protocol)


def _processing_rels(ec: EnsembleContract, *versions: int | None) -> list[str]:
    """The pre/postprocessing files a switch between ``versions`` may write (to snapshot)."""
    return list(processing_files(ec, ec.flavour,
                                 thresholds={v: ec.threshold for v in versions if v is not None}))


def _recorded_threshold(path: Path, key: str, default: float = 0.5) -> float:
    """A decision threshold recorded in a JSON file (export.json, deploy.json), else ``default``."""
    try:
        value = json.loads(Path(path).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return default
    return float(value) if isinstance(value, (int, float)) and 0 < value < 1 else default


def _golden_atol_of(golden: Path) -> float:
    # write_version stores the tolerance the version was deployed with next to its golden file.
    try:
        return float(json.loads(golden.with_name(VERSION_INFO).read_text())["golden_atol"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1e-4


# -- the golden check, pluggable: a server (the default) or none (--no-verify) --------------------

NO_VERIFY_HINT = ("the production flavour serves a version only once a server has loaded it and "
                  "checked it against export's golden outputs: start the GPU Triton that serves "
                  "this repository (deploy/README.md), or pass --no-verify to write and pin it "
                  "unchecked, for a server that loads it when it starts")


@contextlib.contextmanager
def _verifying(ec: EnsembleContract, url: str, protocol: str,
               admin_key: str | None) -> Iterator[Any]:
    """The server that checks the candidate (``_Connection``). With the production flavour an
    unreachable server is refused with the way out (``--no-verify``) in the message."""
    try:
        connection = _Connection(url, protocol, admin_key)
        client = connection.__enter__()
    except ServerUnreachableError as exc:
        if ec.flavour != "production":
            raise
        raise ServerUnreachableError(f"{exc}; {NO_VERIFY_HINT}") from None
    try:
        yield client
    finally:
        connection.__exit__(None, None, None)


def check_file_golden(onnx: Path, images: np.ndarray, expected: np.ndarray, atol: float) -> float:
    """The ONNX file at ``onnx`` run in onnxruntime here (CPU) on the golden images: every
    probability within ``atol`` of ``expected`` (and, for a guarded model, every ood_score within
    GOLDEN_OOD_ATOL). Not a server's check: it proves the file written is the one exported.
    Returns the largest probability difference."""
    import onnxruntime as ort

    from medops.serving.contract import GUARDED_OUTPUTS, INPUT_NAME

    guarded = expected.ndim == 2
    try:
        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        outs = session.run(list(GUARDED_OUTPUTS[:2] if guarded else GUARDED_OUTPUTS[:1]),
                           {INPUT_NAME: np.asarray(images, dtype=np.float32)})
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own untyped errors
        raise ServingError(f"{onnx} does not run in onnxruntime: {first_line(exc)}") from None
    diff = float(np.max(np.abs(outs[0].reshape(-1) - (expected[:, 0] if guarded else expected))))
    ood = float(np.max(np.abs(outs[1].reshape(-1) - expected[:, 1]))) if guarded else 0.0
    if not diff <= atol or not ood <= GOLDEN_OOD_ATOL:
        raise ServingError(f"golden check of {onnx} failed: max |probability - golden| = "
                           f"{diff:.3g} (atol {atol:g}), max |ood_score - golden| = {ood:.3g}")
    return diff


def _pin(ec: EnsembleContract, repository: Path, version: int) -> None:
    """Write every config and processing model as a deploy serving ``version`` leaves them:
    processing models first, the classifier's config next, the ensemble last."""
    files = _served_files(ec, version)
    ordered = sorted(files, key=lambda rel: (rel.split("/", 1)[0] == ec.ensemble_name,
                                             rel.split("/", 1)[0] == ec.classifier.name, rel))
    (Path(repository) / ec.ensemble_name / str(version)).mkdir(parents=True, exist_ok=True)
    restore_files(repository, {rel: files[rel] for rel in ordered})  # only what changed


def _deploy_unverified(ec: EnsembleContract, repository: Path, release: _Release, *, url: str,
                       protocol: str) -> DeployResult:
    """``deploy(verify=False)``: the new version written (hidden name, then renamed), its file
    checked here in onnxruntime against the golden outputs, then pinned in every config; no
    server is asked. A failure removes the version and puts the configs back."""
    name = ec.classifier.name
    with _exclusive(repository):
        discard_unfinished(repository, name)
        previous = served_version(repository, name)
        record = _record_of(repository, name, previous)
        if record is not None and record.sha256 == release.sha256 \
                and record.threshold == ec.threshold and record.flavour == ec.flavour \
                and snapshot_files(repository, _served_files(ec, previous)) == _served_files(ec, previous):
            return record.model_copy(update={"unchanged": True})
        version, version_dir = write_version(ec.classifier, repository, release.onnx,
                                             flavour=ec.flavour, golden=release.golden)
        before = snapshot_files(repository, [*_served_files(ec, version), *_processing_rels(ec, previous)])
        try:
            diff = check_file_golden(version_dir / ONNX_FILENAME, release.images, release.expected,
                                     release.atol)
            _pin(ec, repository, version)
        except Exception as exc:  # noqa: BLE001 - nothing of it may stay
            restore_files(repository, before)
            remove_version(repository, name, version)
            remove_version(repository, ec.ensemble_name, version)
            raise ServingError(f"not serving {name!r} version {version}: {_why(exc)}; "
                               f"{_kept(previous)}") from None
        result = DeployResult(
            model_name=name, version=version, previous_version=previous,
            data_version=release.data_version, sha256=release.sha256, url=url, protocol=protocol,
            repository=str(repository.resolve()), golden_max_abs_diff=diff,
            golden_atol=release.atol, n_golden=len(release.expected), threshold=ec.threshold,
            flavour=ec.flavour, verified_by="none", precision=release.precision)
        write_text(version_dir / VERSION_INFO, result.model_dump_json(indent=2) + "\n")
    return result


def _record_of(repository: Path, name: str, version: int | None) -> DeployResult | None:
    """The deploy.json of ``version``, or None (no version, no record, unreadable)."""
    if version is None:
        return None
    try:
        return DeployResult.model_validate_json(
            (Path(repository) / name / str(version) / VERSION_INFO).read_text())
    except (OSError, ValueError):
        return None


def _rollback_unverified(ec: EnsembleContract, repository: Path, current: int | None,
                         to_version: int, image_size: int) -> RollbackResult:
    """``rollback(verify=False)`` (under the deploy lock): the target's file checked against
    its own golden outputs here in onnxruntime, then every config pinned to it as its deploy
    left them; no server is asked. A failure puts the configs back."""
    folder = Path(repository) / ec.classifier.name / str(to_version)
    before = snapshot_files(repository, [*_served_files(ec, to_version),
                                         *_processing_rels(ec, current)])
    try:
        diff = None
        if (folder / GOLDEN_FILE).is_file():
            images, expected = read_golden(folder / GOLDEN_FILE, image_size)
            diff = check_file_golden(folder / ONNX_FILENAME, images, expected,
                                     _golden_atol_of(folder / GOLDEN_FILE))
        _pin(ec, repository, to_version)
    except Exception as exc:  # noqa: BLE001
        restore_files(repository, before)
        raise ServingError(f"rollback of {ec.classifier.name!r} to version {to_version} failed: "
                           f"{_why(exc)}; version {current} is served") from None
    return RollbackResult(model_name=ec.classifier.name, from_version=current,
                          to_version=to_version, golden_max_abs_diff=diff, threshold=ec.threshold,
                          flavour=ec.flavour, verified_by="none")
