"""Serve medops' flows as Prefect deployments: ``python -m flows.serve [--project DIR]``.

Three deployments, started from the UI or by the platform itself:

- ``ingest-studies/<name>``: the export folder into a new data version; started by the event
  ``medops.export.changed`` (``medops watch``: studies landed in the export folder), on a cron
  schedule when ``prefect.ingest_schedule`` is set (off by default), or by hand.
- ``training-pipeline/<name>``: reproduce, gate and deploy; a deployment trigger on the event
  ``medops.dataset.versioned`` (emitted by ingest-studies only when the data version changed)
  starts it with that ``data_version`` (``prefect.train_on_new_data``).
- ``drift-monitor/<name>``: the last served images against the training reference; on a cron
  schedule when ``prefect.monitor_schedule`` is set (off by default), or by hand; emits
  ``medops.drift.detected`` when a test fires.

``flow.serve`` / ``prefect.serve`` rather than a work pool and worker: one process runs both
deployments with ``limit=1``, so two runs never write the project's files (DVC's lock, params.yaml,
Triton's repository) at once; a work pool would need its own concurrency limit to promise that.
"""

import argparse
from pathlib import Path
from typing import Any, Sequence

from medops.config import load_params
from medops.paths import ProjectPaths


def describe(params_path: Path) -> str:
    """The training deployment's description: what it does, and params.yaml's values when served."""
    from flows.training import UI_PARAMETERS

    values = load_params(params_path).model_dump()
    current = ", ".join(f"{d.split('.')[1]}={values[d.split('.')[0]][d.split('.')[1]]}" for d in UI_PARAMETERS)
    return (
        "Reproduce every stage from the de-identified dataset (dvc repro --single-item), deploy to "
        "Triton if the gate passes. Started by each new data version (medops.dataset.versioned). "
        f"Empty parameters keep params.yaml's values; when served: {current}."
    )


def deployments(paths: ProjectPaths) -> list[Any]:
    """The deployments (not yet served), with their triggers and schedules from params.yaml."""
    from prefect.events import DeploymentEventTrigger

    from flows.ingest import DATASET_VERSIONED, ingest_studies
    from flows.monitor import drift_monitor
    from flows.training import training_pipeline
    from medops.ops.watch import EXPORT_CHANGED

    params = load_params(paths.params)
    cfg = params.prefect
    root = {"project_root": str(paths.root)}
    triggers = [DeploymentEventTrigger(
        name="train-on-new-data-version",
        expect={DATASET_VERSIONED},
        parameters={**root, "data_version": "{{ event.payload.data_version }}"},
    )] if cfg.train_on_new_data else []
    training = training_pipeline.to_deployment(
        name=cfg.deployment_name, parameters=root, description=describe(paths.params),
        tags=["medops"], triggers=triggers)
    ingest = ingest_studies.to_deployment(
        name=cfg.deployment_name, parameters=root, tags=["medops"], cron=cfg.ingest_schedule,
        # studies landing in the export folder (medops watch, one event per delivery)
        triggers=[DeploymentEventTrigger(name="ingest-on-new-studies", expect={EXPORT_CHANGED},
                                         parameters=root)],
        description="De-identify the export folder (ingest.source) into data/ingested and version "
                    "it with DVC; a new data version starts training-pipeline.")
    monitor = drift_monitor.to_deployment(
        name=cfg.deployment_name, parameters=root, tags=["medops"], cron=cfg.monitor_schedule,
        description="Compare the last served images (the DICOM ensemble's drift log) with the "
                    "training reference; emits medops.drift.detected when a test fires.")
    return [ingest, training, monitor]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--project", help="project root (default: $MEDOPS_ROOT or the nearest params.yaml)")
    args = parser.parse_args(argv)

    from prefect import serve

    paths = ProjectPaths.discover(Path(args.project) if args.project else None)
    serve(*deployments(paths), limit=1)


if __name__ == "__main__":
    main()
