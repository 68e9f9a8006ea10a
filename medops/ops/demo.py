"""What ``make demo`` and ``make down`` do: the demo's hospital export, the supervised servers
(Prefect server, Triton, the deployments, the export folder watcher; see medops.ops.supervise),
and the first ingest, training and deploy driven by Prefect events, not by the demo.

The chain the demo sets off and then watches: studies land in the export folder -> the watcher
emits ``medops.export.changed`` -> the ingest-studies deployment's trigger starts an ingest -> a
new data version emits ``medops.dataset.versioned`` -> the training-pipeline deployment's trigger
starts training -> the gate passes and deploy serves the model on Triton. ``run_demo`` returns
once that model answers (a prediction on a test image), or raises with the step that failed.

Orchestration only: every step calls the one implementation elsewhere in medops. Run twice, it
reuses the running servers, the export and DVC's cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medops.config import Params
from medops.errors import MedopsError
from medops.ops.supervise import service_env, start_supervisor, stop_supervisor, stop_unsupervised
from medops.paths import BUNDLED_DATASET, ProjectPaths

# how long the first ingest, training and deploy may take (2 cores: a few minutes); env overrides
DEMO_TIMEOUT_S = 1800.0
FLOWS = ("ingest-studies", "training-pipeline")


def _service_env(paths: ProjectPaths, params: Params) -> dict[str, str]:
    """The environment of the demo's processes (kept for callers of the earlier name)."""
    return service_env(paths, params)


def ensure_export(paths: ProjectPaths, params: Params) -> bool:
    """Generate the demo's hospital export (``ingest.source``, synthetic PHI on purpose) from the
    bundled dataset if it is missing."""
    export = paths.export(params.ingest.source)
    if (export / "labels.csv").is_file() and (export / "dicom").is_dir():
        return False
    from medops.dicom import synth

    synth.run(params.synth, source_npz=BUNDLED_DATASET, out_dir=export)
    return True


def start_services(paths: ProjectPaths, params: Params) -> list[str]:
    """Start (or reuse) the supervised Prefect server and Triton; returns what it did."""
    return start_supervisor(paths, params, ("prefect", "triton"))


def run_flow(paths: ProjectPaths, params: Params, name: str) -> None:
    """Run one flow (``python -m flows.run NAME``) once, recorded by the running Prefect server."""
    proc = subprocess.run([sys.executable, "-m", "flows.run", name, "--project", str(paths.root)],
                          cwd=paths.root, env=_service_env(paths, params))
    if proc.returncode != 0:
        raise MedopsError(f"the {name} flow failed (exit {proc.returncode}); see its output above "
                          f"and the run in the Prefect UI at {params.prefect.ui_url}")


def sample_dicom(paths: ProjectPaths, params: Params) -> Path | None:
    """A file from the official test split, for the `medops predict` line the demo prints."""
    import csv

    export = paths.export(params.ingest.source)
    try:
        with (export / "labels.csv").open() as fh:
            for row in csv.DictReader(fh):
                if row.get("split") == "test":
                    return export / "dicom" / row["path"]
    except OSError:
        return None
    return None


# --- the demo: set the loop off, then watch it ---------------------------------------------------

def _flow_runs(since: Any) -> list[tuple[str, Any]]:
    """(flow name, FlowRun) of the two flows' runs expected to start after ``since``, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterExpectedStartTime)
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))), limit=100,
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=since)))
        for flow_id in {r.flow_id for r in runs} - _FLOW_NAMES.keys():
            _FLOW_NAMES[flow_id] = client.read_flow(flow_id).name
    return [(_FLOW_NAMES[r.flow_id], r) for r in runs]


_FLOW_NAMES: dict[Any, str] = {}  # flow id -> name (a flow's id never changes)


def wait_for_deployments(params: Params, timeout: float = 300.0) -> None:
    """Until both deployments (and so their triggers) are registered with the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        for flow_name in FLOWS:
            name = f"{flow_name}/{params.prefect.deployment_name}"
            while True:
                try:
                    client.read_deployment_by_name(name)
                    break
                except ObjectNotFound:
                    if time.monotonic() > deadline:
                        raise MedopsError(f"the deployment {name} is not registered after "
                                          f"{timeout:g} s; see .medops/logs/flow-serve.log") from None
                    time.sleep(1.0)


def served_version(paths: ProjectPaths, params: Params) -> int | None:
    """The classifier version Triton serves and reports ready, with the DICOM ensemble ready
    too, or None."""
    from medops.serving.contract import ensemble_name
    from medops.serving.repository import served_version as pinned
    from medops.serving.server import server_status

    cfg = params.serving
    version = pinned(cfg.repository_path(paths.root), cfg.model_name)
    status = server_status(paths.state)
    if version is None or not status.ready or status.info is None:
        return None
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(status.info.http_url, connection_timeout=5,
                                              network_timeout=5)
    try:
        ready = (client.is_model_ready(cfg.model_name, str(version))
                 and client.is_model_ready(ensemble_name(cfg.model_name)))
        return version if ready else None
    except Exception:  # noqa: BLE001 - not loaded (yet)
        return None
    finally:
        client.close()


def announce_export(paths: ProjectPaths, params: Params, why: str) -> str:
    """The watcher's event, sent by the demo (an export that was there before the watcher)."""
    from medops.ops.watch import Delivery, emit_export_changed

    now = time.monotonic()
    emit_export_changed(Delivery(events=0, first_s=now, last_s=now), paths.export(params.ingest.source))
    return f"{why}: emitted medops.export.changed as the watcher would"


class _Loop:
    """What the demo has seen of the loop so far; ``step`` names what it waits for."""

    def __init__(self, ui_url: str) -> None:
        self.ui_url = ui_url
        self.states: dict[Any, str] = {}
        self.step = "the watcher's event medops.export.changed to start an ingest-studies run"
        self.ingest_done: float | None = None
        self.training_done: float | None = None

    def see(self, runs: list[tuple[str, Any]], log: Any) -> None:
        """Log each run's state changes; MedopsError at the first run that failed."""
        for flow, run in runs:
            state = run.state_name or str(run.state_type)
            link = f"{self.ui_url}/runs/flow-run/{run.id}"
            if self.states.get(run.id) != state:
                self.states[run.id] = state
                log(f"  {flow}: flow run '{run.name}' {state}  ({link})")
            kind = str(getattr(run.state_type, "value", run.state_type))
            if kind in ("FAILED", "CRASHED", "CANCELLED"):
                message = run.state.message if run.state is not None else ""
                raise MedopsError(f"the demo stopped at {flow}: flow run '{run.name}' ended {state}"
                                  f": {message}; its logs: {link}")
        done = {f: any(str(getattr(r.state_type, "value", "")) == "COMPLETED" for g, r in runs if g == f)
                for f in FLOWS}
        started = {f: any(g == f for g, _ in runs) for f in FLOWS}
        now = time.monotonic()
        if done["ingest-studies"] and self.ingest_done is None:
            self.ingest_done = now
        if done["training-pipeline"] and self.training_done is None:
            self.training_done = now
        if done["training-pipeline"]:
            self.step = "deploy to serve the new model on Triton"
        elif started["training-pipeline"]:
            self.step = "the training-pipeline run (reproduce, gate, deploy)"
        elif done["ingest-studies"]:
            self.step = "medops.dataset.versioned to start a training-pipeline run"
        elif started["ingest-studies"]:
            self.step = "the ingest-studies run (de-identify, version with DVC)"


def _start_training(params: Params, paths: ProjectPaths) -> None:
    from prefect.deployments import run_deployment

    run_deployment(f"training-pipeline/{params.prefect.deployment_name}",
                   parameters={"project_root": str(paths.root)}, timeout=0)


def wait_for_model(paths: ProjectPaths, params: Params, *, since: Any, before: int | None,
                   announce_after: float | None, timeout: float, log: Any) -> int:
    """Watch the event-driven loop until a model version other than ``before`` answers on
    Triton; returns it. ``announce_after``: seconds after which, if no ingest run has started,
    the demo emits the watcher's event itself (None: at once). MedopsError with the step that
    failed, or that was still awaited when ``timeout`` ran out."""
    loop = _Loop(params.prefect.ui_url)
    start = time.monotonic()
    announced = kicked = False
    while True:
        runs = _flow_runs(since)
        loop.see(runs, log)
        version = served_version(paths, params)
        # served, and the run that deployed it finished (its lineage record is written last)
        if version is not None and version != before and loop.training_done is not None:
            return version
        now = time.monotonic()
        if not runs and not announced and (announce_after is None or now - start > announce_after):
            log("  " + announce_export(paths, params, "no ingest run yet" if announce_after else
                                       "the export was already there"))
            announced = True
        if (loop.ingest_done is not None and loop.step.startswith("medops.dataset.versioned")
                and now - loop.ingest_done > 45 and not kicked):
            if version is not None:  # the same data as before, and its model already answers
                return version
            # the data version did not change (versioned by an earlier run), so no event came
            log("  ingest made no new data version and no model is served: starting "
                "training-pipeline by hand")
            _start_training(params, paths)
            kicked = True
        if (loop.training_done is not None and now - loop.training_done > 60
                and version in (None, before)):
            raise MedopsError("the demo stopped at deploy: training-pipeline completed but no new "
                              "model is served (did the gate refuse it? see reports/gate.json and "
                              "the run's artifacts in the Prefect UI)")
        if now - start > timeout:
            raise MedopsError(f"the demo timed out after {timeout:g} s waiting for {loop.step}; "
                              f"see `medops status` and the flow runs at {params.prefect.ui_url}/runs")
        time.sleep(2.0)


def check_answer(paths: ProjectPaths, params: Params, sample: Path) -> str:
    """One prediction through the DICOM ensemble: the proof that the model answers."""
    from medops.serving.client import predict_files
    from medops.serving.server import endpoint

    cfg = params.serving
    pred = predict_files([sample], url=endpoint(cfg, "grpc"), model_name=cfg.model_name,
                         preprocessing=params.ingest.preprocessing)[0]
    if pred.error is not None:
        raise MedopsError(f"the demo stopped at the first answer: Triton refused a test image: {pred.error}")
    return f"{pred.label} (p = {pred.probability:.3f}, model version {pred.model_version})"


def run_demo(paths: ProjectPaths, params: Params) -> str:
    """Start the supervised services, write the export (or announce the one that is there) and
    watch the events drive ingest, training and deploy until the first model answers."""
    from datetime import datetime, timedelta, timezone

    from medops.ops.prefect_server import prefect_env

    if not (paths.root / ".git").exists():
        raise MedopsError(f"{paths.root} is not a git repository: DVC needs one (clone medops with git)")
    t0 = time.monotonic()
    os.environ.update(prefect_env(params.prefect, paths.state))  # this process's Prefect client
    export = paths.export(params.ingest.source)
    fresh = not ((export / "labels.csv").is_file() and (export / "dicom").is_dir())
    export.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    for line in start_supervisor(paths, params):
        log(line)
    wait_for_deployments(params)
    before = served_version(paths, params)
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    if fresh:
        log(f"writing the demo's hospital export into {export} (a minute or two) ...")
        ensure_export(paths, params)
        log("written (synthetic PHI on purpose); the watcher announces it once it has been quiet 3 s")
    timeout = float(os.environ.get("MEDOPS_DEMO_TIMEOUT_S", DEMO_TIMEOUT_S))
    if fresh or before is None:
        log("waiting for the events to drive ingest -> training -> deploy:")
        version = wait_for_model(paths, params, since=since, before=None if fresh else before,
                                 announce_after=60.0 if fresh else None, timeout=timeout, log=log)
    else:
        version = before
        log(f"the export is unchanged and model version {before} is served: nothing to wait for")
    sample = sample_dicom(paths, params)
    answer = check_answer(paths, params, sample) if sample else "(no test image in the export)"
    return _summary(paths, params, version, answer, sample, time.monotonic() - t0)


def _summary(paths: ProjectPaths, params: Params, version: int, answer: str, sample: Path | None,
             seconds: float) -> str:
    ui = params.prefect.ui_url
    rel = sample.relative_to(paths.root) if sample else "path/to/file.dcm"
    return "\n".join([
        "",
        f"medops demo is up ({seconds:.0f} s): model version {version} answers on Triton; a test "
        f"image: {answer}",
        f"  Flow runs:   {ui}/runs  (ingest-studies and training-pipeline, started by events)",
        f"  Event feed:  {ui}/events  (medops.export.changed, medops.dataset.versioned, "
        "medops.model.deployed)",
        f"  Deployments: {ui}/deployments  (start 'training-pipeline/{params.prefect.deployment_name}' "
        "with edited parameters)",
        "  Lineage:     .venv/bin/medops lineage   (data version, code commit, flow run, gate)",
        f"  Data Docs:   {paths.quality_dir / 'data_docs' / 'index.html'}",
        f"  Try it:      .venv/bin/medops predict {rel}",
        "  More data:   .venv/bin/medops synth --add 300   (new labelled studies land in the export "
        "folder: the loop runs again, a new model version follows)",
        "  Services:    .venv/bin/medops status   (kept alive by supervisord; logs in .medops/logs/)",
        "  Stop it:     make down",
    ])


def stop_services(paths: ProjectPaths) -> list[str]:
    """Stop supervisord and the services it keeps, then anything left running unsupervised."""
    out = stop_supervisor(paths)
    out += stop_unsupervised(paths)
    return out or ["nothing was running"]
