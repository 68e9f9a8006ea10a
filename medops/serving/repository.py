"""Triton model repositories: the embedded one medops serves from, and the production template.

Layout (Triton's): ``<repo>/<name>/config.pbtxt`` and numbered version folders
``<repo>/<name>/<N>/model.onnx``; the embedded flavour adds ``<N>/model.py`` (the Python-backend
classifier). A new version is ``max(existing) + 1`` and is written beside the old ones, never over
them, so the version a server is answering with stays on disk until it is unloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from medops.atomic import crash_point, write_bytes, write_text
from medops.serving.contract import (
    ONNX_FILENAME,
    POSTPROCESS_BACKEND,
    PREPROCESS_BACKEND,
    PYTHON_FILENAME,
    EnsembleContract,
    Flavour,
    ModelContract,
    render_config,
    render_ensemble_config,
    render_postprocess_config,
    render_preprocess_config,
    version_threshold_param,
)

GOLDEN_FILE = "golden.npz"  # export's golden samples, kept in each version folder
VERSION_INFO = "deploy.json"  # the DeployResult of a version, written once it serves
LOCK_FILE = ".deploy.lock"  # held by a running deploy/rollback (Triton ignores files here)

BACKENDS_DIR = Path(__file__).resolve().parent / "backends"
CLASSIFIER_BACKEND = BACKENDS_DIR / "onnx_classifier.py"

# The committed production template (rendered, never hand-edited; a test compares them).
DEPLOY_REPOSITORY = Path(__file__).resolve().parents[2] / "deploy" / "model_repository"


def list_versions(repository: Path, name: str) -> list[int]:
    """The version numbers present under ``<repository>/<name>``, ascending."""
    model_dir = Path(repository) / name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(repository: Path, name: str) -> int:
    """``max(existing versions) + 1``, or 1 for a new model."""
    versions = list_versions(repository, name)
    return versions[-1] + 1 if versions else 1


def write_config(
    contract: ModelContract, repository: Path, flavour: Flavour, *,
    versions: Sequence[int] | None = None,
) -> Path:
    """Write ``<repository>/<name>/config.pbtxt`` for ``flavour`` (atomically); returns its path.

    ``versions``: serve exactly these (see ``render_config``); None serves the latest.
    """
    model_dir = Path(repository) / contract.name
    model_dir.mkdir(parents=True, exist_ok=True)
    return write_text(model_dir / "config.pbtxt", render_config(contract, flavour, versions=versions))


def read_config(repository: Path, name: str) -> Any:
    """``<repository>/<name>/config.pbtxt`` parsed into Triton's ModelConfig protobuf, or None."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(repository) / name / "config.pbtxt"
    if not path.is_file():
        return None
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def served_version(repository: Path, name: str) -> int | None:
    """The version Triton serves from this repository: the config's ``specific`` policy if it
    names versions, else the latest version folder; None when there is none."""
    config = read_config(repository, name)
    on_disk = list_versions(repository, name)
    if config is not None and config.version_policy.HasField("specific"):
        named = [int(v) for v in config.version_policy.specific.versions if int(v) in on_disk]
        if named:
            return max(named)
    return on_disk[-1] if on_disk else None


def write_version(
    contract: ModelContract,
    repository: Path,
    onnx: Path,
    *,
    flavour: Flavour = "embedded",
    version: int | None = None,
    golden: Path | None = None,
) -> tuple[int, Path]:
    """Copy ``onnx`` into a new version folder; config.pbtxt is left alone (see write_config).

    Args:
        contract: the model contract (its name is the folder name).
        repository: the model repository root.
        onnx: the exported ONNX file.
        flavour: "embedded" also copies the Python-backend model.py into the version folder.
        version: the version number; default ``next_version``. An existing one is refused.
        golden: export's golden.npz, kept beside the model so a later rollback can check it.

    Returns:
        ``(version, version_dir)``.
    """
    onnx = Path(onnx)
    if not onnx.is_file():
        raise FileNotFoundError(f"no ONNX model at {onnx}")
    version = next_version(repository, contract.name) if version is None else version
    version_dir = Path(repository) / contract.name / str(version)
    if version_dir.exists():
        raise FileExistsError(f"model version folder {version_dir} already exists")
    # Write into a hidden folder, then rename: Triton never sees a half-copied version.
    staging = version_dir.with_name(f".{version}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(onnx, staging / ONNX_FILENAME)
    crash_point("deploy.staging")
    if flavour == "embedded":
        shutil.copyfile(CLASSIFIER_BACKEND, staging / PYTHON_FILENAME)
    if golden is not None:
        shutil.copyfile(golden, staging / GOLDEN_FILE)
    staging.rename(version_dir)
    return version, version_dir


def remove_version(repository: Path, name: str, version: int) -> None:
    """Delete one version folder (used when a freshly written version failed to load)."""
    shutil.rmtree(Path(repository) / name / str(version), ignore_errors=True)


def discard_unfinished(repository: Path, name: str) -> list[str]:
    """Remove what a deploy killed half-way left of ``name``: hidden ``.N.partial`` folders, and
    version folders newer than every finished one (with a ``deploy.json``, written once a version
    served and passed its checks) and every one config.pbtxt serves, without a ``deploy.json``
    of their own: a deploy writes its version as ``max + 1``, so nothing else is there. Older
    folders without a record, and every folder under a config without a ``specific`` version
    policy (written by hand), are kept. Run under the deploy lock, before a version number is
    chosen. Returns the folder names removed."""
    model_dir = Path(repository) / name
    if not model_dir.is_dir():
        return []
    config = read_config(repository, name)
    if config is not None and not config.version_policy.HasField("specific"):
        return []
    pinned = {int(v) for v in config.version_policy.specific.versions} if config is not None else set()
    versions = list_versions(repository, name)
    kept = pinned | {v for v in versions if (model_dir / str(v) / VERSION_INFO).is_file()}
    newest_kept = max(kept, default=0)
    removed = []
    for folder in sorted(model_dir.iterdir()):
        stale = folder.name.startswith(".") and folder.name.endswith(".partial")
        unfinished = folder.name.isdigit() and int(folder.name) > newest_kept
        if folder.is_dir() and (stale or unfinished):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    write_bytes(path, data)
    return True


def processing_files(ec: EnsembleContract, flavour: Flavour, *,
                     thresholds: Mapping[int, float] | None = None) -> dict[str, bytes]:
    """The processing models as ``{relative path: content}`` (config + model.py): in
    production the pre- and postprocessing models; embedded the postprocessing model alone,
    which preprocesses, classifies, labels and records (``ec.record``) in one step.

    ``thresholds`` (``{version: threshold}``): the postprocessing model serves exactly these
    versions, ``<N>/model.py`` each, version N labelling at its own threshold
    (``render_postprocess_config``); None: version 1 at ``ec.threshold``.
    """
    files: dict[str, bytes] = {
        f"{ec.postprocess_name}/config.pbtxt":
            render_postprocess_config(ec, flavour, thresholds=thresholds).encode(),
    }
    if flavour == "production":  # embedded, the postprocessing model preprocesses itself
        files[f"{ec.preprocess_name}/config.pbtxt"] = render_preprocess_config(ec, flavour).encode()
        files[f"{ec.preprocess_name}/1/{PYTHON_FILENAME}"] = (BACKENDS_DIR / PREPROCESS_BACKEND).read_bytes()
    postprocess = (BACKENDS_DIR / POSTPROCESS_BACKEND).read_bytes()
    for version in sorted(thresholds) if thresholds is not None else [1]:
        files[f"{ec.postprocess_name}/{version}/{PYTHON_FILENAME}"] = postprocess
    return files


def postprocess_thresholds(config_text: str | bytes | None) -> dict[int, float]:
    """``{version: threshold}`` of a postprocessing config.pbtxt's ``threshold.N`` parameters
    (empty for None or a config without them)."""
    if not config_text:
        return {}
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = config_text.decode() if isinstance(config_text, bytes) else config_text
    params = text_format.Parse(text, model_config_pb2.ModelConfig()).parameters
    prefix = version_threshold_param("")
    return {int(k[len(prefix):]): float(v.string_value) for k, v in params.items()
            if k.startswith(prefix) and k[len(prefix):].isdigit()}


def snapshot_files(repository: Path, rels: Iterable[str]) -> dict[str, bytes | None]:
    """The current content of ``rels`` under ``repository`` (None: absent), for restore_files."""
    out: dict[str, bytes | None] = {}
    for rel in rels:
        path = Path(repository) / rel
        out[rel] = path.read_bytes() if path.is_file() else None
    return out


def restore_files(repository: Path, snapshot: dict[str, bytes | None]) -> None:
    """Put files back as ``snapshot_files`` found them (deleting those that were absent)."""
    for rel, data in snapshot.items():
        path = Path(repository) / rel
        if data is None:
            path.unlink(missing_ok=True)
            # a version folder left behind (empty but for the Python backend's __pycache__)
            # would be "the latest version" to Triton
            folder = path.parent
            if folder.name.isdigit() and folder.is_dir() \
                    and {p.name for p in folder.iterdir()} <= {"__pycache__"}:
                shutil.rmtree(folder)
        else:
            _write_if_changed(path, data)


def write_processing_models(
    ec: EnsembleContract, repository: Path, flavour: Flavour, *,
    thresholds: Mapping[int, float] | None = None, models: Iterable[str] | None = None,
) -> list[str]:
    """Write (only what changed of) the pre- and postprocessing models (``thresholds`` as for
    ``processing_files``; ``models``: only these names); returns the model names whose files
    changed, i.e. those a running Triton must reload."""
    changed = set()
    only = None if models is None else set(models)
    for rel, data in processing_files(ec, flavour, thresholds=thresholds).items():
        if only is not None and rel.split("/", 1)[0] not in only:
            continue
        if _write_if_changed(Path(repository) / rel, data):
            changed.add(rel.split("/", 1)[0])
    return sorted(changed)


def write_ensemble(ec: EnsembleContract, repository: Path, classifier_version: int,
                   flavour: Flavour | None = None) -> Path:
    """Write the ensemble pinned to ``classifier_version`` (classifier and postprocessing model):
    its config and the (empty) version folder of the same number Triton requires. Returns the
    config path."""
    model_dir = Path(repository) / ec.ensemble_name
    (model_dir / str(classifier_version)).mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    _write_if_changed(path, render_ensemble_config(ec, classifier_version=classifier_version,
                                                   flavour=flavour).encode())
    return path


def render_production_repository(ec: EnsembleContract) -> dict[str, str]:
    """The production model repository's text files, ``{relative path: text}``: the classifier
    (onnxruntime, GPU), the pre/postprocessing Python models and the ensemble (latest version).
    The ONNX versions (``<classifier>/<N>/model.onnx``) are added by deployment."""
    files = {f"{ec.classifier.name}/config.pbtxt": render_config(ec.classifier, "production"),
             f"{ec.ensemble_name}/config.pbtxt": render_ensemble_config(ec, classifier_version=None,
                                                                        flavour="production"),
             # Triton needs a version folder for an ensemble too; git needs a file to keep it.
             f"{ec.ensemble_name}/1/.gitkeep": ""}
    files |= {rel: data.decode() for rel, data in processing_files(ec, "production").items()}
    return dict(sorted(files.items()))


def write_production_repository(ec: EnsembleContract, out_dir: Path = DEPLOY_REPOSITORY) -> list[Path]:
    """Render the production repository template into ``out_dir`` (committed under deploy/)."""
    written = []
    for rel, text in render_production_repository(ec).items():
        path = Path(out_dir) / rel
        _write_if_changed(path, text.encode())
        written.append(path)
    return written
