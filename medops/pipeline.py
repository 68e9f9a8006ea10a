"""The stage registry: stage name -> the one function that runs it, and what it reads and writes.

One name everywhere: the stage name is the medops module, the dvc.yaml stage, the Prefect task and
``medops stage NAME``. The adapters below only map project paths and params sections onto each
stage's ``run()``; they hold no logic. ``deploy`` is not here: it changes a running server, so it
belongs to the CLI and the Prefect flow (with retries), not to ``dvc repro``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from medops.atomic import crash_point, write_text
from medops.ops.dvc import checkpoint_lockfile
from medops.config import Params
from medops.errors import ConfigError
from medops.paths import ProjectPaths


@dataclass(frozen=True)
class Stage:
    """One stage: its name, the module holding its ``run()``, the params sections it reads (its
    dvc.yaml ``params``) and the adapter that calls ``run()`` with the project's paths."""

    name: str
    module: str                # the medops module (or package) holding run()
    sections: tuple[str, ...]  # params.yaml sections it reads (dvc.yaml `params`)
    call: Callable[[Params, ProjectPaths], Any]

    def run(self, params: Params, paths: ProjectPaths) -> Any:
        return self.call(params, paths)


def deid_key(params: Params, paths: ProjectPaths) -> bytes:
    """The de-identification key every ingest entry point uses (the CLI, the stage, the flow)."""
    from medops.dicom.deid import resolve_deid_key

    return resolve_deid_key(params.ingest.deid, state_dir=paths.state)


def _data_version(paths: ProjectPaths) -> str:
    from medops.ops.dvc import data_version

    return data_version(paths.root, paths.ingested)


@dataclass(frozen=True)
class Intake:
    """What :func:`ingest_export` did: the ingest stage's result (its ``quarantine`` is the
    operator's private report) and whether the published dataset changed."""

    result: Any          # medops.stages.ingest.IngestResult
    published: bool      # data/ingested changed (a new data version once DVC adds it)


def ingest_export(params: Params, paths: ProjectPaths, *, progress: Any = None,
                  full: bool = False, key: bytes | None = None) -> Intake:
    """The one data path in: the export folder (``ingest.source``) de-identified incrementally into
    the private ingest folder, then published as the PHI-free dataset that DVC versions.

    Labels come from every manifest in the export folder (``*.csv`` with ``SOPInstanceUID,label``
    and optionally ``split``), merged; without one, from folder names. ``key``: the
    de-identification key (e.g. from a Prefect Secret block); default: :func:`deid_key`.

    Raises:
        IngestError: no export folder, an unusable manifest, or an output that cannot be written.
    """
    from medops.errors import IngestError
    from medops.stages.ingest import find_manifests, run
    from medops.stages.ingest.publish import publish_dataset

    source = paths.export(params.ingest.source)
    if not source.is_dir():
        raise IngestError(f"the export folder {source} does not exist: put the hospital's export "
                          f"there or set ingest.source in params.yaml")
    cfg = params.ingest.model_copy(update={"incremental": False}) if full else params.ingest
    key = key or deid_key(params, paths)
    result = run(cfg, source_dir=source, out_dir=paths.ingest_work,
                 manifest=find_manifests(source) or None, key=key, progress=progress)
    return Intake(result, publish_dataset(paths.ingest_work, paths.ingested, key))


# The adapters: project paths and params sections onto each stage's run(), nothing else (the long
# ones also get progress reporters, medops.ops.progress). Each imports its stage when called, so
# `medops --help` does not import TensorFlow. The stages start from the de-identified dataset
# (data/ingested, versioned by DVC); ingest_export above feeds it.


def quality(p: Params, pp: ProjectPaths) -> Any:
    from medops.stages.quality import run

    return run(p.quality, ingested_dir=pp.ingested, out_dir=pp.quality_dir, gx_root=pp.root)


def split(p: Params, pp: ProjectPaths) -> Any:
    from medops.stages.split import run

    return run(p.split, metadata=pp.metadata, out=pp.split)


def train(p: Params, pp: ProjectPaths) -> Any:
    from medops.ops.progress import keras_progress
    from medops.stages.train import pin_numerics
    from medops.stages.train import run

    pin_numerics(p.train)  # before keras_progress imports TensorFlow
    return run(p.train, p.augment, ingested_dir=pp.ingested, split=pp.split,
               model_out=pp.keras_model, result_out=pp.train_result,
               data_version=_data_version(pp), log_dir=pp.tensorboard,
               backup_root=pp.train_backup, live_dir=pp.dvclive,
               extra_callbacks=[keras_progress("train", p.train.epochs)])


def ood(p: Params, pp: ProjectPaths) -> Any:
    from medops.stages.ood import run

    return run(p.ood, model=pp.keras_model, ingested_dir=pp.ingested, split=pp.split,
               train_result=pp.train_result, out_dir=pp.ood_dir)


def evaluate(p: Params, pp: ProjectPaths) -> Any:
    from medops.stages.evaluate import run

    return run(p.evaluate, model=pp.keras_model, ingested_dir=pp.ingested, split=pp.split,
               metrics_out=pp.metrics, plots_dir=pp.plots, train_result=pp.train_result)


def explain(p: Params, pp: ProjectPaths) -> Any:
    from medops.stages.explain import run

    return run(p.evaluate, model=pp.keras_model, ingested_dir=pp.ingested, split=pp.split,
               out_dir=pp.explain_dir, train_result=pp.train_result)


def gate(p: Params, pp: ProjectPaths) -> Any:
    from medops.stages.gate import run

    # champion/challenger: the served model (read from the Triton repository at run time, not a
    # DVC dependency: it changes when deploy runs) scored on the same test split
    return run(p.gate, metrics=pp.metrics, train_result=pp.train_result, out=pp.gate,
               ood_result=pp.ood_dir / "ood.json", predictions=pp.plots / "predictions.csv", ingested_dir=pp.ingested, split=pp.split,
               repository=p.serving.repository_path(pp.root), model_name=p.serving.model_name,
               quantize_result=pp.models / "int8" / "quantize.json")


def export(p: Params, pp: ProjectPaths) -> Any:
    from medops.stages.export import run

    return run(p.export, model=pp.keras_model, ingested_dir=pp.ingested, split=pp.split,
               train_result=pp.train_result, onnx_out=pp.onnx_model, result_out=pp.export_result,
               ood_dir=pp.ood_dir)


def quantize(p: Params, pp: ProjectPaths) -> Any:
    from medops.stages.quantize import run

    return run(p.quantize, p.evaluate, onnx=pp.onnx_model, export_result=pp.export_result,
               train_result=pp.train_result, ingested_dir=pp.ingested, split=pp.split,
               out_dir=pp.models / "int8")


def reference(p: Params, pp: ProjectPaths) -> Any:
    from medops.stages.reference import run
    return run(p.reference, ingested_dir=pp.ingested, split=pp.split, onnx=pp.onnx_model,
               out=pp.drift_reference)


# The table of contents: name, module, params sections, adapter, in pipeline order.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("quality", "medops.stages.quality", ("quality",), quality),
        Stage("split", "medops.stages.split", ("split",), split),
        Stage("train", "medops.stages.train", ("train", "augment"), train),
        Stage("ood", "medops.stages.ood", ("ood",), ood),
        Stage("evaluate", "medops.stages.evaluate", ("evaluate",), evaluate),
        Stage("explain", "medops.stages.explain", ("evaluate",), explain),
        Stage("export", "medops.stages.export", ("export",), export),
        # after export: the optional INT8 copy, which the gate decides to serve or not
        Stage("quantize", "medops.stages.quantize", ("quantize", "evaluate"), quantize),
        Stage("gate", "medops.stages.gate", ("gate",), gate),
        Stage("reference", "medops.stages.reference", ("reference",), reference),
    )
}


def serving_kwargs(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """What deploy and rollback take from params and the project, the same for the CLI and flow."""
    from medops.serving.server import resolve_admin_key

    cfg = params.serving
    return {
        "repository": cfg.repository_path(paths.root),
        "preprocessing": params.ingest.preprocessing,
        "admin_key": resolve_admin_key(cfg, state_dir=paths.state),
    }


def run_stage(name: str, params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Run one stage and write its result as JSON to ``paths.stage_result(name)``."""
    try:
        stage = STAGES[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None
    # DVC has just read dvc.lock whole: keep a copy, in case a crash cuts its next write short
    checkpoint_lockfile(paths.root)
    result = stage.run(params, paths)
    payload = result.model_dump(mode="json") if hasattr(result, "model_dump") else dict(result)
    crash_point(f"{name}.done")  # (medops.atomic.CRASH_POINTS lists each stage's)
    write_text(paths.stage_result(name), json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return payload


def read_stage_result(name: str, paths: ProjectPaths) -> dict[str, Any]:
    path: Path = paths.stage_result(name)
    return json.loads(path.read_text())
