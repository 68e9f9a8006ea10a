"""The ingest flow: the hospital's export folder in, a de-identified, DVC-versioned dataset out.

1. ``ingest``: medops.pipeline.ingest_export: the export folder (``ingest.source``, labels from the
   ``*.csv`` manifests in it) de-identified incrementally into the private ingest folder
   (``.medops/ingest``), then published as the PHI-free dataset ``data/ingested`` (no path of the
   export in it). A grown export costs only its new files; the same export again writes nothing.
2. ``version``: ``dvc add data/ingested`` and ``dvc push``; the data version (DVC hash) is posted
   as an artifact. Unchanged data keeps its version.
3. When the data version changed, the event ``medops.dataset.versioned`` (resource: the data
   version; payload: counts of new, quarantined and used files, never a path or a value of the
   export), which a deployment trigger turns into a training run.
   A progress artifact (``ingest-progress``) and log lines follow it file by file.

Only de-identified data is versioned: the export (with its PHI) is read, never added.
Wiring only; the work is medops.pipeline.ingest_export, medops.stages.ingest and medops.ops.dvc.

On a cluster: ``cluster`` (or ``ingest.cluster`` in params.yaml) sends the per-file work to Dask,
through the same executor as ``medops ingest --cluster``. The flow keeps Prefect's default task
runner, not prefect-dask's ``DaskTaskRunner``: that runs Prefect *tasks* on Dask, and this flow's
tasks run one after the other; making each file a Prefect task would put a million task runs
(states, logs) through the Prefect API for a million files, where one Dask task per chunk of
files costs the scheduler a few milliseconds.
"""

from pathlib import Path
from typing import Any, Callable, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from medops.config import load_params
from medops.ops import dvc
from medops.paths import ProjectPaths

from flows.artifacts import field_rows

from flows.events import DATASET_VERSIONED


@task(cache_policy=NO_CACHE)
def ingest(paths: ProjectPaths, cluster: Optional[str] = None) -> dict[str, Any]:
    """medops.pipeline.ingest_export: the export folder into the published dataset (incremental);
    ``cluster`` overrides ``ingest.cluster`` ("none": the local pool)."""
    from medops.config import with_cluster
    from medops.ops.blocks import deid_key
    from medops.pipeline import ingest_export
    from medops.stages.ingest import format_summary

    # the medops-deid-key Secret block when there is one, else $MEDOPS_DEID_KEY or the key file
    intake = ingest_export(with_cluster(load_params(paths.params), cluster), paths,
                           progress=progress_artifact("ingest", "files"), key=deid_key())
    # the summary names the operator's private report by its location, never an export path
    get_run_logger().info(format_summary(intake.result))
    return {**intake.result.model_dump(mode="json"), "published": intake.published}


def progress_artifact(name: str, unit: str, min_interval_s: float = 1.0) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that moves a progress artifact (created now, at 0 %)
    and logs the count, at most once per ``min_interval_s`` and always at the end."""
    from medops.ops.progress import throttled

    artifact_id = create_progress_artifact(progress=0.0, key=f"{name}-progress", description=f"{name}: starting")
    logger = get_run_logger()

    def report(done: int, total: int) -> None:
        percent = 100.0 * min(done, total) / total if total else 100.0
        update_progress_artifact(artifact_id, percent, description=f"{name}: {done}/{total} {unit}")
        logger.info("%s: %d/%d %s", name, done, total, unit)

    return throttled(report, min_interval_s)


@task(cache_policy=NO_CACHE)
def version(paths: ProjectPaths) -> str:
    """``dvc add`` + ``dvc push`` of the dataset folder (to the medops-dvc-remote block's remote when
    there is one, else the default remote); returns its data version."""
    from medops.ops.blocks import dvc_remote

    remote = dvc_remote()
    if remote is None:
        return dvc.version_dataset(paths.root, paths.ingested, push=True)
    data_version = dvc.version_dataset(paths.root, paths.ingested, push=False)
    dvc.push(paths.root, [paths.ingested], remote=remote.configure(paths.root))
    return data_version


def emit_versioned(data_version: str, summary: dict[str, Any], previous: Optional[str]) -> Any:
    """``medops.dataset.versioned`` for ``data_version``, with counts only (no PHI)."""
    from prefect.events import emit_event

    return emit_event(
        event=DATASET_VERSIONED,
        resource={"prefect.resource.id": f"medops.dataset.{data_version}",
                  "prefect.resource.name": "data/ingested", "medops.data_version": data_version},
        payload={"data_version": data_version, "previous_version": previous,
                 "files_seen": summary["files_seen"], "used": summary["used"],
                 "new_or_changed": summary["decoded"], "quarantined": summary["quarantined"],
                 "quarantined_by_reason": summary["quarantined_by_reason"]},
    )


@flow(name="ingest-studies")
def ingest_studies(project_root: Optional[str] = None, cluster: Optional[str] = None) -> dict[str, Any]:
    """De-identify the project's export folder (params ``ingest.source``) into the dataset and
    version it with DVC; announce a new data version as a Prefect event.

    Args:
        project_root: the medops project (default: $MEDOPS_ROOT or the current folder).
        cluster: where files are decoded: "none" (local pool), "local" (a Dask LocalCluster) or a
            Dask scheduler address; default: params.yaml's ingest.cluster.

    Returns:
        The ingest summary, the data version, and whether it changed.
    """
    paths = ProjectPaths(Path(project_root).resolve()) if project_root else ProjectPaths.discover()
    before = dvc.data_version_or_none(paths.root, paths.ingested)
    summary = ingest(paths, cluster)
    data_version = version(paths)
    changed = data_version != before
    if changed:
        emit_versioned(data_version, summary, before)
    create_table_artifact(
        key="ingest-studies",
        table=[{"field": "data version", "value": data_version},
               {"field": "new version", "value": changed},
               *field_rows({k: summary[k] for k in ("files_seen", "used", "quarantined", "quarantined_by_reason",
                                                    "decoded", "changed") if k in summary})],
        description="de-identified dataset version",
    )
    return {"data_version": data_version, "previous_version": before, "changed": changed,
            "dataset": str(paths.ingested.relative_to(paths.root)),
            "ingest": {k: v for k, v in summary.items()
                       if k not in ("out_dir", "dicom_dir", "arrays_dir", "metadata", "quarantine")}}
