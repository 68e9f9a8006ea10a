"""The ingest flow: a hospital's export folder in, a de-identified, DVC-versioned dataset out.

1. ``ingest``: medops.stages.ingest.run over the folder into the dataset folder (default
   ``data/deidentified``): de-identified DICOM, array shards, metadata table, quarantine list.
   Incremental by content hash: a grown folder costs only its new files; the same folder again
   writes nothing.
2. ``version``: ``dvc add`` the dataset folder and ``dvc push`` it to the default remote; the
   data version (DVC hash) is returned and posted as an artifact. Unchanged data keeps its version.

Only de-identified data is versioned here: the source folder (with its PHI) is read, never added.
Wiring only; the work is medops.stages.ingest and medops.ops.dvc.

On a cluster: ``cluster`` (or ``ingest.cluster`` in params.yaml) sends the per-file work to Dask,
through the same executor as ``medops ingest --cluster``. The flow keeps Prefect's default task
runner, not prefect-dask's ``DaskTaskRunner``: that runs Prefect *tasks* on Dask, and this flow has
two, one after the other; making each file a Prefect task would put a million task runs (states,
logs) through the Prefect API for a million files, where one Dask task per chunk of files costs
the scheduler a few milliseconds.
"""

from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from medops.ops import dvc
from medops.config import load_params
from medops.paths import ProjectPaths

DEFAULT_DATASET = "data/deidentified"


@task(cache_policy=NO_CACHE)
def ingest(paths: ProjectPaths, source: Path, dataset: Path, manifest: Optional[Path],
           cluster: Optional[str] = None) -> dict[str, Any]:
    """medops ingest of ``source`` into ``dataset`` (incremental); ``cluster`` overrides
    ``ingest.cluster``."""
    from medops.config import IngestConfig
    from medops.stages import ingest as ingest_stage
    from medops.pipeline import deid_key

    params = load_params(paths.params)
    cfg = params.ingest
    if cluster is not None:
        cfg = IngestConfig.model_validate({**cfg.model_dump(), "cluster": None if cluster == "none" else cluster})
    result = ingest_stage.run(cfg, source_dir=source, out_dir=dataset, manifest=manifest,
                              key=deid_key(params, paths))
    get_run_logger().info(ingest_stage.format_summary(result))
    return result.model_dump(mode="json")


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
    cluster: Optional[str] = None,
) -> dict[str, Any]:
    """De-identify and prepare every file below ``source_dir``, version the result with DVC.

    Args:
        source_dir: the hospital's export folder (read only; it may grow between runs).
        dataset: the DVC-tracked dataset folder, relative to the project (default data/deidentified).
        manifest: labels CSV/Parquet keyed by SOPInstanceUID or relative path (optional).
        project_root: the medops project (default: $MEDOPS_ROOT or the current folder).
        cluster: where files are decoded: "none" (local pool), "local" (a Dask LocalCluster) or a
            Dask scheduler address; default: params.yaml's ingest.cluster.

    Returns:
        The ingest summary, the data version, and whether anything changed.
    """
    paths = ProjectPaths(Path(project_root).resolve()) if project_root else ProjectPaths.discover()
    target = paths.root / dataset
    summary = ingest(paths, Path(source_dir).resolve(), target, Path(manifest) if manifest else None, cluster)
    data_version = version(paths, target)
    create_markdown_artifact(
        key="ingest-studies",
        markdown=(f"# Ingested `{Path(source_dir).name}`\n\n"
                  f"| | |\n|---|---|\n| data version | `{data_version}` |\n"
                  f"| files seen | {summary['files_seen']} |\n| used | {summary['used']} |\n"
                  f"| quarantined | {summary['quarantined']} {summary['quarantined_by_reason']} |\n"
                  f"| decoded this run | {summary['decoded']} |\n| changed | {summary['changed']} |\n"),
        description="de-identified dataset version",
    )
    return {"data_version": data_version, "dataset": str(target.relative_to(paths.root)),
            "changed": summary["changed"], "ingest": summary}
