"""The ingest flow: a hospital's export folder in, a de-identified, DVC-versioned dataset out.

1. ``ingest``: medops.stages.ingest.run over the folder into the dataset folder (default
   ``data/deidentified``): de-identified DICOM, array shards, metadata table, quarantine list.
   A progress artifact (``ingest-progress``) and log lines follow it file by file.
   Incremental by content hash: a grown folder costs only its new files; the same folder again
   writes nothing.
2. ``version``: ``dvc add`` the dataset folder and ``dvc push`` it to the default remote; the
   data version (DVC hash) is returned and posted as an artifact. Unchanged data keeps its version.

Only de-identified data is versioned here: the source folder (with its PHI) is read, never added.
Wiring only; the work is medops.stages.ingest and medops.ops.dvc.
"""

import time
from pathlib import Path
from typing import Any, Callable, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from medops.ops import dvc
from medops.config import load_params
from medops.paths import ProjectPaths

from flows.artifacts import field_rows

DEFAULT_DATASET = "data/deidentified"


@task(cache_policy=NO_CACHE)
def ingest(paths: ProjectPaths, source: Path, dataset: Path, manifest: Optional[Path]) -> dict[str, Any]:
    """medops ingest of ``source`` into ``dataset`` (incremental)."""
    from medops.stages import ingest as ingest_stage
    from medops.pipeline import deid_key

    params = load_params(paths.params)
    result = ingest_stage.run(params.ingest, source_dir=source, out_dir=dataset, manifest=manifest,
                              key=deid_key(params, paths), progress=progress_artifact("ingest", "files"))
    get_run_logger().info(ingest_stage.format_summary(result))
    return result.model_dump(mode="json")


def progress_artifact(name: str, unit: str, min_interval_s: float = 1.0) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that moves a progress artifact (created now, at 0 %)
    and logs the count, at most once per ``min_interval_s`` and always at the end."""
    artifact_id = create_progress_artifact(progress=0.0, key=f"{name}-progress", description=f"{name}: starting")
    logger = get_run_logger()
    last = [float("-inf")]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < min_interval_s:
            return
        last[0] = now
        percent = 100.0 * min(done, total) / total if total else 100.0
        update_progress_artifact(artifact_id, percent, description=f"{name}: {done}/{total} {unit}")
        logger.info("%s: %d/%d %s", name, done, total, unit)

    return report


@task(cache_policy=NO_CACHE)
def version(paths: ProjectPaths, dataset: Path) -> str:
    """``dvc add`` + ``dvc push`` of the dataset folder; returns its data version."""
    return dvc.version_dataset(paths.root, dataset, push=True)


@flow(name="ingest-studies")
def ingest_studies(
    source_dir: str,
    dataset: str = DEFAULT_DATASET,
    manifest: Optional[str] = None,
    project_root: Optional[str] = None,
) -> dict[str, Any]:
    """De-identify and prepare every file below ``source_dir``, version the result with DVC.

    Args:
        source_dir: the hospital's export folder (read only; it may grow between runs).
        dataset: the DVC-tracked dataset folder, relative to the project (default data/deidentified).
        manifest: labels CSV/Parquet keyed by SOPInstanceUID or relative path (optional).
        project_root: the medops project (default: $MEDOPS_ROOT or the current folder).

    Returns:
        The ingest summary, the data version, and whether anything changed.
    """
    paths = ProjectPaths(Path(project_root).resolve()) if project_root else ProjectPaths.discover()
    target = paths.root / dataset
    summary = ingest(paths, Path(source_dir).resolve(), target, Path(manifest) if manifest else None)
    data_version = version(paths, target)
    create_table_artifact(
        key="ingest-studies",
        table=[{"field": "source", "value": Path(source_dir).name},
               {"field": "data version", "value": data_version},
               *field_rows({k: summary[k] for k in ("files_seen", "used", "quarantined", "quarantined_by_reason",
                                                    "decoded", "changed") if k in summary})],
        description="de-identified dataset version",
    )
    return {"data_version": data_version, "dataset": str(target.relative_to(paths.root)),
            "changed": summary["changed"], "ingest": summary}
