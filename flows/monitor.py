"""The drift-monitor flow: the last N served images against the training reference.

1. ``check``: ``medops.ops.monitor.monitor`` over the drift log (``serving.record_dir``, written
   by the DICOM ensemble's recorder) and ``models/reference.json`` (the reference stage).
2. The report as a markdown artifact (``drift-report``: the tests, their statistics and
   Holm-corrected p-values, reference vs recent histograms) and each plot as an image artifact.
3. When a test fires, the event ``medops.drift.detected`` (resource: the served model; payload:
   the tests that fired with their evidence), which an automation can turn into retraining.

Served as the ``drift-monitor/<name>`` deployment (flows/serve.py) on ``prefect.monitor_schedule``
(off by default). Too few recorded answers is not a failure: the run says so and ends.
Wiring only; the work is medops.ops.monitor.
"""

from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from medops.config import load_params
from medops.errors import MonitorDataError
from medops.paths import ProjectPaths

from flows.artifacts import artifact_key
from flows.events import DRIFT_DETECTED, emit


@task(cache_policy=NO_CACHE)
def check(paths: ProjectPaths, window: Optional[int]) -> Optional[dict[str, Any]]:
    """Run the tests and post the report; None when there is too little to test."""
    from medops.ops.monitor import monitor, report, to_json

    params = load_params(paths.params)
    try:
        result, ref, records = monitor(params.monitor, log_dir=params.serving.record_path(paths.state),
                                       reference=paths.drift_reference, window=window)
    except MonitorDataError as exc:
        get_run_logger().warning("drift monitor: nothing to test: %s", exc)
        return None
    get_run_logger().info(result.summary())
    markdown, plots = report(result, ref, records)
    create_markdown_artifact(markdown, key="drift-report",
                             description=f"drift over the last {result.n} served images")
    for name, url in plots.items():
        create_image_artifact(image_url=url, key=artifact_key("drift", name),
                              description=f"{name}: reference vs the last {result.n} served images")
    return {**to_json(result), "evidence": result.evidence(), "model": params.serving.model_name}


@flow(name="drift-monitor")
def drift_monitor(project_root: Optional[str] = None, window: Optional[int] = None) -> dict[str, Any]:
    """Compare the last ``window`` served images (default: params monitor.window) with the
    training reference; emit ``medops.drift.detected`` when a test fires.

    Returns:
        ``{"drift", "n", "tests", ...}`` as ``medops monitor --json`` prints it, or
        ``{"drift": False, "skipped": True}`` when there was too little to test.
    """
    paths = ProjectPaths(Path(project_root).resolve()) if project_root else ProjectPaths.discover()
    result = check(paths, window)
    if result is None:
        return {"drift": False, "skipped": True}
    if result["drift"]:
        emit(DRIFT_DETECTED, f"medops.model.{result['model']}", result["evidence"])
    return result
