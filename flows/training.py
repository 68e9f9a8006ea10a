"""The training pipeline as a Prefect flow. A table of contents: every step is medops code.

1. ``write_params``: parameters edited for this run (in the Prefect UI form, or as keyword
   arguments) are written into params.yaml, so dvc.lock records the values that were used;
2. ``data_version``: the de-identified dataset's DVC version (``data/ingested.dvc``, written by the
   ingest-studies flow); a run started for a given ``data_version`` (by the trigger on
   ``medops.dataset.versioned``) refuses to train on another one;
3. one task per stage of ``medops.pipeline.STAGES``, in order, each running
   ``dvc repro --single-item NAME`` (DVC decides whether it must run), logging its output line by
   line while it runs (ingest and train also move a progress artifact), then posting the stage's
   JSON result as table, image and link artifacts. A failed critical data-quality expectation
   stops the flow with its message;
4. ``deploy``: only if the gate passed (otherwise its reasons are logged and the flow completes
   without deploying); retried, because Triton may be briefly busy loading;
5. ``push_outputs``: ``dvc push`` of the pipeline's outputs;
6. ``record_experiment``: the run as a DVC experiment named after the flow run (``dvc exp show``).

Each flow parameter is typed with the constraint of the params.yaml field it overrides (taken from
the pydantic models in medops.config), so the UI form validates what params.yaml would. Empty
(None) means "keep params.yaml's value".

(No ``from __future__ import annotations`` here: Prefect builds the parameter schema from the
evaluated annotations.)
"""

import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_image_artifact, create_link_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE

from medops.atomic import write_text
from medops.config import Params, load_params, update_params_file
from medops.errors import DvcError, GateRejectedError
from medops.ops import dvc
from medops.paths import ProjectPaths
from medops.ops.progress import parse_progress
from medops.pipeline import STAGES, read_stage_result

from flows.artifacts import Artifact, artifact_key, field_rows, stage_artifacts, summarize_repro
from flows.events import DATA_REJECTED, MODEL_DEPLOYED, MODEL_REJECTED, emit
from flows.recover import continue_after_api_outage

DEPLOY_RETRIES = 2
DEPLOY_RETRY_DELAY_S = 10.0
# stages that take minutes: a progress artifact follows their `medops progress:` lines
LONG_STAGES = ("ingest", "train")


# The run parameters the Prefect UI form offers, as "section.field" of params.yaml. Each becomes a
# keyword parameter of training_pipeline named after its field, typed with that field's constraints
# (so the form validates what params.yaml would) and empty by default (keep params.yaml's value).
# Adding one to the form, the deployment's description and the overrides is this one line.
UI_PARAMETERS: tuple[str, ...] = (
    "train.epochs", "train.batch_size", "train.learning_rate",
    "gate.min_auc", "gate.min_accuracy", "gate.min_sensitivity", "gate.min_specificity",
)


def _ui_parameter(dotted: str) -> inspect.Parameter:
    section, field = dotted.split(".")
    info = Params.model_fields[section].annotation.model_fields[field]
    annotation = Annotated[(Optional[info.annotation], *info.metadata)]
    return inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def with_ui_parameters(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``fn(project_root=None, **overrides)`` the signature and docstring Prefect builds its
    form from: one typed keyword parameter per entry of UI_PARAMETERS."""
    names = [d.split(".")[1] for d in UI_PARAMETERS]
    assert len(set(names)) == len(names), f"UI parameter names must be unique: {names}"
    head = list(inspect.signature(fn).parameters.values())[:-1]  # drop **overrides
    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        head + [_ui_parameter(d) for d in UI_PARAMETERS],
        return_annotation=inspect.signature(fn).return_annotation)
    docs = "".join(f"        {d.split('.')[1]}: {d} for this run; empty keeps params.yaml's value.\n"
                   for d in UI_PARAMETERS)
    fn.__doc__ = (fn.__doc__ or "").replace("        {ui_parameters}\n", docs)
    return fn


def overrides_by_section(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"epochs": 3}`` as ``{"train": {"epochs": 3}}``; None (empty in the form) is left out."""
    out: dict[str, dict[str, Any]] = {}
    for dotted in UI_PARAMETERS:
        section, field = dotted.split(".")
        if overrides.get(field) is not None:
            out.setdefault(section, {})[field] = overrides[field]
    return out


# --- tasks ------------------------------------------------------------------------------------

@task(cache_policy=NO_CACHE)
def write_params(paths: ProjectPaths, overrides: dict[str, dict[str, Any]]) -> Params:
    """Write the values that differ from params.yaml into it (validated first); returns the params."""
    current = load_params(paths.params).model_dump(mode="json")
    changed = {
        section: {k: v for k, v in values.items() if current[section][k] != v}
        for section, values in overrides.items()
    }
    changed = {section: values for section, values in changed.items() if values}
    if not changed:
        return load_params(paths.params)
    params = update_params_file(paths.params, changed)
    rows = [{"parameter": f"{s}.{k}", "was": current[s][k], "now": v} for s, vals in changed.items()
            for k, v in vals.items()]
    get_run_logger().info("params.yaml updated: %s", changed)
    post(Artifact("table", "params-changed", rows, "params.yaml values edited for this run"))
    return params


@task(cache_policy=NO_CACHE)
def check_data_version(paths: ProjectPaths, expected: Optional[str]) -> str:
    """The dataset's DVC version (data/ingested.dvc); ``expected`` (from the event that started
    the run) must be it: another ingest may have versioned newer data since."""
    try:
        version = dvc.data_version(paths.root, paths.ingested)
    except DvcError as exc:
        raise DvcError(f"no versioned dataset in {paths.ingested}: run the ingest-studies flow "
                       f"(or `medops ingest` and `medops version-data`) first ({exc})") from None
    if expected and version != expected:
        raise DvcError(f"this run was started for data version {expected}, but {paths.ingested} is "
                       f"at {version}: the run for {version} trains it")
    get_run_logger().info("training on data version %s", version)
    return version


def post(artifact: Artifact) -> None:
    """Post one artifact built by flows.artifacts with Prefect's function for its type."""
    if artifact.kind == "table":
        create_table_artifact(table=artifact.data, key=artifact.key, description=artifact.description)
    elif artifact.kind == "image":
        create_image_artifact(image_url=artifact.data, key=artifact.key, description=artifact.description)
    else:
        create_link_artifact(link=artifact.data, link_text=artifact.link_text, key=artifact.key,
                             description=artifact.description)


class StageOutput:
    """``dvc repro``'s lines as they come: each one logged to the task run, ``medops progress:``
    lines also moving the stage's progress artifact (created at 0 % for the LONG_STAGES)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.logger = get_run_logger()
        self.progress_id = None
        if name in LONG_STAGES:
            self.progress_id = create_progress_artifact(
                progress=0.0, key=artifact_key(name, "progress"), description=f"{name}: waiting for the stage")
        self.last_percent = 0.0

    def __call__(self, line: str) -> None:
        if line.strip():
            self.logger.info("%s | %s", self.name, line)
        progress = parse_progress(line)
        if progress is not None and self.progress_id is not None and progress.stage == self.name:
            self.update(progress.percent, f"{self.name}: {progress.done}/{progress.total} {progress.unit}")

    def update(self, percent: float, description: str) -> None:
        if self.progress_id is not None and percent != self.last_percent:
            try:
                update_progress_artifact(self.progress_id, percent, description=description)
            except Exception as exc:  # noqa: BLE001 - Prefect's API unreachable: the stage goes on
                # without its progress bar (each try waits out the client's retries, a minute)
                self.logger.warning("%s: progress no longer posted: %s", self.name, exc)
                self.progress_id = None
            self.last_percent = percent


@task(cache_policy=NO_CACHE)
def run_stage(paths: ProjectPaths, name: str) -> dict[str, Any]:
    """``dvc repro --single-item NAME``, its output logged line by line while it runs; then the
    stage's JSON result, posted as artifacts (tables, images, links: flows.artifacts)."""
    logger = get_run_logger()
    output = StageOutput(name)
    try:
        repro = dvc.repro(paths.root, name, single_item=True, on_line=output)
    except DvcError:
        if name == "quality":
            _raise_quality_failure(paths)
        raise
    output.update(100.0, f"{name}: done")
    logger.info("dvc repro --single-item %s: %s", name, summarize_repro(repro))
    result = read_stage_result(name, paths)
    for warning in result.get("warnings") or []:  # e.g. non-critical data-quality expectations
        logger.warning("%s: %s", name, warning)
    for artifact in stage_artifacts(name, result):
        post(artifact)
    return result


def _raise_quality_failure(paths: ProjectPaths) -> None:
    """A failed quality stage wrote its report before failing: stop with its message."""
    from medops.stages import quality
    failed = quality.failed_result(paths.quality_dir)
    if failed is not None:  # else it failed before validating; the DvcError says why
        for artifact in stage_artifacts("quality", failed.model_dump(mode="json"), failed=True):
            post(artifact)
        error = quality.failure_error(failed)
        emit(DATA_REJECTED, "medops.dataset.ingested",
             {"data_version": dvc.data_version_or_none(paths.root, paths.ingested), "reason": str(error)})
        raise error


def _is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry deploy unless the failure is a decision (gate, wrong model), not a busy server."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not isinstance(exc, GateRejectedError)


@task(name="deploy", retries=DEPLOY_RETRIES, retry_delay_seconds=DEPLOY_RETRY_DELAY_S,
      retry_condition_fn=_is_transient, cache_policy=NO_CACHE)
def deploy_model(paths: ProjectPaths, params: Params) -> dict[str, Any]:
    """medops.serving.deploy.deploy: the exported model as a new version in the running Triton."""
    from medops.serving.deploy import deploy

    from prefect.runtime import flow_run

    from medops.ops.blocks import triton_server
    from medops.pipeline import serving_kwargs

    cfg, settings = params.serving, serving_kwargs(params, paths)
    server = triton_server()  # the medops-triton block, when there is one: its address and key
    if server is not None:
        get_run_logger().info("deploying to Triton at %s (block %s)", server.url, server._block_document_name)
        cfg, settings["admin_key"] = server.serving_config(cfg), server.key() or settings["admin_key"]
    result = deploy(cfg, onnx=paths.onnx_model, gate=paths.gate, export_result=paths.export_result, **settings,
                    reason=f"Prefect flow run {flow_run.get_name()} ({flow_run.get_id()}): the gate passed")
    payload = result.model_dump(mode="json")
    if not result.unchanged:
        from medops.ops.lineage import record_deployment

        record_deployment(paths, payload, flow_run_id=flow_run.get_id())
    post(Artifact("table", "deployment", field_rows(payload),
                  f"{result.model_name} version {result.version} on Triton"))
    emit(MODEL_DEPLOYED, f"medops.model.{result.model_name}.{result.version}",
         {"model_name": result.model_name, "model_version": result.version,
          "data_version": result.data_version})
    return payload


@task(cache_policy=NO_CACHE)
def record_experiment(paths: ProjectPaths) -> Optional[str]:
    """This run's params, data version, code commit and metrics as a DVC experiment named after
    the flow run (``dvc exp show`` compares them). Bookkeeping: a failure is logged, not fatal."""
    from prefect.runtime import flow_run

    name = flow_run.get_name() or "medops-run"
    try:
        dvc.exp_save(paths.root, name, message=f"Prefect flow run {name}")
    except DvcError as exc:
        get_run_logger().warning("could not record the run as a DVC experiment: %s", exc)
        return None
    get_run_logger().info("recorded as DVC experiment %s (dvc exp show)", name)
    return name


@task(cache_policy=NO_CACHE)
def push_outputs(paths: ProjectPaths) -> str:
    """``dvc push``: the pipeline's outputs (and the raw data) to the default remote, or to the
    remote of the medops-dvc-remote block when there is one (written into the DVC config first)."""
    from medops.ops.blocks import dvc_remote

    remote = dvc_remote()
    summary = dvc.push(paths.root, remote=remote.configure(paths.root) if remote is not None else None)
    get_run_logger().info("dvc push: %s", summary)
    return summary


# --- flow -------------------------------------------------------------------------------------

def trained_marker(paths: ProjectPaths, data_version: str) -> Path:
    """Written when a run for ``data_version`` completed: a second run started for the same version
    (a replayed event) finds it and does nothing."""
    return paths.state / "trained" / f"{data_version}.json"


def deploy_if_passed(paths: ProjectPaths, params: Params) -> Optional[dict[str, Any]]:
    """Run the deploy task only if reports/gate.json passed; otherwise log why and return None."""
    from medops.results import read_decision

    decision = read_decision(paths.gate)
    if not decision.passed:
        get_run_logger().warning("gate rejected the model, not deploying: %s",
                                 "; ".join(decision.failed_reasons or decision.reasons))
        emit(MODEL_REJECTED, f"medops.model.candidate.{decision.data_version}",
             {"data_version": decision.data_version, "model": decision.model,
              "reasons": decision.failed_reasons or decision.reasons})
        return None
    return deploy_model(paths, params)


# a run cut off from the Prefect server continues in a new run of its deployment (flows.recover)
@flow(name="training-pipeline", on_failure=[continue_after_api_outage],
      on_crashed=[continue_after_api_outage])
@with_ui_parameters
def training_pipeline(project_root: Optional[str] = None, data_version: Optional[str] = None,
                      **overrides: Any) -> dict[str, Any]:
    """Reproduce every stage with DVC from the versioned dataset, deploy if the gate passed, push.

    Args:
        project_root: the medops project (default: $MEDOPS_ROOT or the worker's current folder).
        data_version: the dataset version this run is for (set by the trigger on
            medops.dataset.versioned); empty: whatever data/ingested.dvc holds.
        {ui_parameters}

    Returns:
        A summary: data version, params used, every stage's result, the gate, the deployment.
    """
    paths = ProjectPaths(Path(project_root).resolve()) if project_root else ProjectPaths.discover()
    if data_version and trained_marker(paths, data_version).is_file():
        # a replayed or duplicate medops.dataset.versioned event: this version was trained already
        get_run_logger().info("data version %s was trained already (%s): nothing to do", data_version,
                              trained_marker(paths, data_version).relative_to(paths.root))
        return {"project_root": str(paths.root), "data_version": data_version, "skipped": True}
    params = write_params(paths, overrides_by_section(overrides))
    data_version = check_data_version(paths, data_version)
    stages = {name: run_stage.with_options(name=name, task_run_name=name)(paths, name) for name in STAGES}
    deployed = deploy_if_passed(paths, params)
    pushed = push_outputs(paths)
    experiment = record_experiment(paths)
    marker = trained_marker(paths, data_version)
    write_text(marker, json.dumps({"data_version": data_version, "gate": stages["gate"].get("passed"),
                                  "deployed": (deployed or {}).get("version")}) + "\n")
    return {
        "project_root": str(paths.root),
        "data_version": data_version,
        "params": params.model_dump(mode="json"),
        "stages": stages,
        "gate": {"passed": stages["gate"].get("passed"), "reasons": stages["gate"].get("reasons")},
        "deployed": deployed,
        "pushed": pushed,
        "experiment": experiment,
    }
