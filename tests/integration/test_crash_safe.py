"""Crash-safe stages: `dvc repro` killed with SIGKILL inside each stage, then run again.

A tiny copy of the project (what a clone holds, a 210-image dataset, a two-block CNN trained for
two epochs) is reproduced again and again; each run is killed at the next point inside a stage:
after a stage wrote its outputs but not its result (``MEDOPS_CRASH_AT=<stage>.done``, the
documented hook of medops.atomic), between model.keras and train.json, between model.onnx and
export.json, and once from outside, the whole process group (dvc and the stage) in the middle of
training, as a machine going down would. After every kill: no output is a partial file, stages
finished before are not redone, and the next run is not blocked by a lock. The last run completes
and `dvc status` is clean.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import pytest

from medops.atomic import CRASH_ENV

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.dvc]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # _ingested

TINY = {
    "train": {"epochs": 2, "batch_size": 32, "filters": [8, 16], "dense_units": 16, "dropout": 0.0},
    "evaluate": {"bootstrap_samples": 50, "gradcam_samples": 2},
    "gate": {"min_auc": 0.0, "min_accuracy": 0.0, "min_sensitivity": 0.0, "min_specificity": 0.0,
             "compare_with_serving": False},
}
# what a killed run may leave: the outputs of dvc.yaml, each checked whole if present
OUTPUT_DIRS = ("models", "reports", "data/split")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from _ingested import build_ingested
    from _project import clone_project

    from medops.ops import dvc

    root = clone_project(tmp_path_factory.mktemp("crash"), TINY)
    build_ingested(root / "data" / "ingested", n_per_split={"train": 120, "val": 45, "test": 45},
                   with_packs=True)  # the reference stage reads the headers
    dvc.init(root)
    dvc.add(root, "data/ingested")
    return root


def _run_killable(cmd: list[str], cwd: Path, env: dict[str, str], *, crash_at: str | None = None,
                  kill_when: Callable[[], bool] | None = None,
                  timeout: float = 900) -> tuple[int, str, float]:
    """Run ``cmd`` in its own process group; ``crash_at`` sets MEDOPS_CRASH_AT; ``kill_when``:
    SIGKILL the whole group as soon as it returns True. Returns (exit code, output, seconds)."""
    env = dict(env)
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    started = time.monotonic()
    log = cwd.parent / f"run-{int(started * 1000)}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                if time.monotonic() - started > timeout:
                    raise AssertionError(f"{cmd} ran past {timeout} s: {log.read_text()[-3000:]}")
                if kill_when is not None and kill_when():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, log.read_text(), time.monotonic() - started


def _holds_file(folder: Path, pattern: str = "*") -> Callable[[], bool]:
    return lambda: folder.is_dir() and any(p.is_file() for p in folder.rglob(pattern))


def _repro(root: Path, crash_at: str | None = None, *,
           kill_when: Callable[[], bool] | None = None) -> tuple[int, str, float]:
    """``dvc repro`` in ``root``, as _run_killable runs it."""
    from medops.ops.dvc import dvc_env

    return _run_killable([sys.executable, "-m", "dvc", "repro"], root,
                         {**dvc_env(root), "PYTHONUNBUFFERED": "1"}, crash_at=crash_at,
                         kill_when=kill_when)


def _ran(output: str) -> list[str]:
    """The stages a `dvc repro` ran (started), in order."""
    return re.findall(r"Running stage '(\w+)'", output)


def _check_whole(root: Path) -> int:
    """Every output file present is whole (parses as what it is); none is a visible temporary.
    Returns the number of files checked."""
    import numpy as np
    import onnx
    import pandas as pd
    from PIL import Image

    checked = 0
    for folder in OUTPUT_DIRS:
        for path in (root / folder).rglob("*"):
            if not path.is_file() or "tensorboard" in path.parts:  # event logs: appended as they go
                continue
            assert ".tmp-" not in path.name or path.name.startswith("."), f"visible temporary {path}"
            if path.name.startswith("."):
                continue
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".csv":
                pd.read_csv(path)
            elif path.suffix in (".keras", ".npz"):
                with zipfile.ZipFile(path) as z:
                    assert z.testzip() is None, path
                if path.suffix == ".npz":
                    with np.load(path) as data:
                        [data[k] for k in data.files]
            elif path.suffix == ".onnx":
                onnx.checker.check_model(onnx.load(str(path)))
            elif path.suffix == ".png":
                Image.open(path).verify()
            checked += 1
    return checked


def _stage_of_point(point: str) -> str:
    return point.split(".")[0]


# the named points, in pipeline order; "train.fit" is the kill from outside
POINTS = ["quality.done", "split.done", "train.saved", "train.fit", "ood.done", "evaluate.done",
          "explain.done", "export.onnx", "export.done", "quantize.done", "gate.done", "reference.done"]


def test_a_pipeline_killed_inside_each_stage_completes_on_the_next_run(project: Path) -> None:
    from medops.ops import dvc

    finished: set[str] = set()   # stages whose dvc.lock entry a run completed
    record: list[dict] = []
    remaining = list(POINTS)
    while remaining:
        if remaining[0] == "train.fit":  # from outside: dvc and the stage, once training began
            shutil.rmtree(project / "models" / "tensorboard", ignore_errors=True)  # the last run's
            code, out, seconds = _repro(project, kill_when=_holds_file(project / "models" / "tensorboard"))
        else:  # every point not yet hit: the run dies at the first it reaches
            code, out, seconds = _repro(project, ",".join(p for p in remaining if p != "train.fit"))
        ran = _ran(out)
        assert code != 0, f"the run meant to die at {remaining[0]} completed:\n{out[-3000:]}"
        killed = ran[-1]
        point = next(p for p in remaining if _stage_of_point(p) == killed)
        # finished stages are not redone; the killed stage left no dvc.lock entry
        assert not finished & set(ran), f"{finished & set(ran)} ran again:\n{out[-3000:]}"
        assert "is busy" not in out and "Unable to acquire lock" not in out, out[-3000:]
        checked = _check_whole(project)
        lock = (project / "dvc.lock").read_text() if (project / "dvc.lock").is_file() else ""
        assert f"  {killed}:" not in lock
        assert not (project / "reports" / "stages" / f"{killed}.json").exists()
        finished |= set(ran[:-1])
        record.append({"killed": point, "stage": killed, "ran": ran, "exit": code,
                       "seconds": round(seconds, 1), "files_checked": checked,
                       "stale_lock_removed": "Auto removed it from the lock file" in out})
        remaining.remove(point)

    code, out, seconds = _repro(project)
    assert code == 0, out[-3000:]
    ran = _ran(out)
    assert not finished & set(ran), f"{finished & set(ran)} ran again after the last kill"
    assert ran == [record[-1]["stage"]]  # only the stage killed last
    record.append({"killed": None, "ran": ran, "exit": code, "seconds": round(seconds, 1),
                   "files_checked": _check_whole(project)})
    assert dvc.status(project) == {}
    # the group kill left dvc's own pid in .dvc/tmp/rwlock: the next run removed it, not blocked
    assert next(r for r in record if r["killed"] == "train.fit")
    assert any(r["stale_lock_removed"] for r in record), record
    export = json.loads((project / "models" / "export.json").read_text())
    from medops.hashing import sha256_file

    assert export["sha256"] == sha256_file(project / "models" / "model.onnx")
    print("\ncrash-safe pipeline:", json.dumps(record, indent=1))


# -- ingest: the export folder -> .medops/ingest -> data/ingested ------------------------------------

DEID_KEY = "crash-test-key-not-a-secret"


def _ingest_project(root: Path, export: Path) -> Path:
    from medops.config import update_params_file

    root.mkdir()
    (root / "params.yaml").write_text((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    update_params_file(root / "params.yaml", {"ingest": {"shard_size": 4, "workers": 2}})
    shutil.copytree(export, root / "data" / "export")
    return root


def _ingest(root: Path, crash_at: str | None = None, *,
            kill_when: Callable[[], bool] | None = None) -> tuple[int, str, float]:
    env = {**os.environ, "MEDOPS_DEID_KEY": DEID_KEY,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                          os.environ.get("PYTHONPATH", "")])}
    return _run_killable([sys.executable, "-m", "medops", "--project", str(root), "ingest", "--quiet",
                          "--json"], root, env, crash_at=crash_at, kill_when=kill_when, timeout=300)


def _dataset_files(folder: Path) -> dict[str, object]:
    """The published dataset's content: each file's bytes (a pack: its members' bytes; the
    metadata table: its rows), by relative path; hidden files separately under "hidden"."""
    import pandas as pd

    content: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            content.setdefault("hidden", []).append(rel)
        elif path.suffix == ".zip":
            with zipfile.ZipFile(path) as z:
                content[rel] = {n: z.read(n) for n in z.namelist()}
        elif path.suffix == ".parquet":
            content[rel] = pd.read_parquet(path).to_dict("list")
        else:
            content[rel] = path.read_bytes()
    return content


def test_ingest_killed_at_each_point_then_rerun_publishes_what_one_clean_run_does(tmp_path: Path) -> None:
    from medops.config import SynthConfig
    from medops.dicom import synth
    from medops.paths import BUNDLED_DATASET, ProjectPaths

    export = tmp_path / "export"
    synth.run(SynthConfig(max_images_per_split=6), source_npz=BUNDLED_DATASET, out_dir=export)
    (export / "broken.dcm").write_bytes(b"DICM but not really")  # one quarantined file too
    reference = _ingest_project(tmp_path / "reference", export)
    code, out, clean_seconds = _ingest(reference)
    assert code == 0, out[-3000:]
    expected = _dataset_files(ProjectPaths(reference).ingested)
    assert len([k for k in expected if k.startswith("arrays/")]) >= 3  # several shards to cut between

    root = _ingest_project(tmp_path / "crashed", export)
    paths = ProjectPaths(root)
    record = []
    kills = [("ingest.decoding", None),
             ("outside: first staged shard", _holds_file(paths.ingest_work / ".staging", "*.npy")),
             ("ingest.replacing", None),
             ("ingest.publishing", None)]
    for point, kill_when in kills:
        code, out, seconds = _ingest(root, None if kill_when else point, kill_when=kill_when)
        assert code == -signal.SIGKILL, f"{point}: {out[-3000:]}"
        published = _dataset_files(paths.ingested) if paths.ingested.is_dir() else {}
        # the table readers start from is never there before every file it names
        assert "metadata.parquet" not in published, point
        for rel, content in published.items():  # what is there is whole: the final file
            if rel != "hidden":
                assert content == expected[rel], f"{point}: {rel} differs from a clean run's"
        record.append({"killed": point, "seconds": round(seconds, 1),
                       "published_files": len(published) - ("hidden" in published)})
    # a crashed run leaves no lock: the next one runs, and publishes what a clean run publishes
    code, out, seconds = _ingest(root)
    assert code == 0, out[-3000:]
    assert _dataset_files(paths.ingested) == expected
    assert not (paths.ingest_work / ".staging").exists()
    report = json.loads(out[out.index("{"):])
    assert report["published"] is True
    record.append({"killed": None, "seconds": round(seconds, 1), "clean_run_seconds": round(clean_seconds, 1)})
    # and a rerun over the same export changes nothing
    code, out, _ = _ingest(root)
    assert code == 0 and json.loads(out[out.index("{"):])["published"] is False
    print("\ncrash-safe ingest:", json.dumps(record, indent=1))


# -- deploy: a new version into a running Triton -----------------------------------------------------

DEPLOY = """
import json, sys
from pathlib import Path
from medops.config import PreprocessSpec, ServingConfig
from medops.serving.deploy import deploy
a = json.loads(sys.argv[1])
result = deploy(ServingConfig(**a["cfg"]), onnx=Path(a["onnx"]), gate=Path(a["gate"]),
                export_result=Path(a["export"]), repository=Path(a["repo"]), url=a["url"],
                protocol="grpc", preprocessing=PreprocessSpec(image_size=28))
print(result.model_dump_json())
"""


def _served_answers(url: str, name: str, images) -> tuple[object, str]:
    import tritonclient.grpc as grpcclient

    from medops.serving.client import infer_images

    client = grpcclient.InferenceServerClient(url)
    try:
        return infer_images(client, images, protocol="grpc", model_name=name)
    finally:
        client.close()


def _complete_versions(model_dir: Path) -> dict[int, bool]:
    """Each version folder on disk: whether it holds every file a version needs."""
    return {int(p.name): {"model.onnx", "model.py", "golden.npz"} <= {f.name for f in p.iterdir()}
            for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}


@pytest.mark.triton
def test_deploy_killed_at_each_point_never_serves_a_partial_version(tmp_path: Path, free_port) -> None:
    import numpy as np
    from test_triton_serving import (V1, V2, write_export_result, write_gate, write_golden,
                                     write_tiny_onnx)

    from medops.config import PreprocessSpec, ServingConfig
    from medops.hashing import sha256_file
    from medops.serving.deploy import deploy
    from medops.serving.repository import served_version
    from medops.serving.server import start_server, stop_server

    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=120)
    state, repo = tmp_path / "state", tmp_path / "repository"
    exports = {}
    for n, coef in ((1, V1), (2, V2)):
        onnx_path = write_tiny_onnx(tmp_path / f"export{n}" / "model.onnx", **coef)
        exports[n] = {"onnx": onnx_path, "golden": write_golden(onnx_path, **coef),
                      "export": write_export_result(onnx_path),
                      "gate": write_gate(tmp_path / f"gate{n}.json", passed=True)}
    golden = {n: np.load(e["golden"]) for n, e in exports.items()}
    sha = {n: sha256_file(e["onnx"]) for n, e in exports.items()}
    info = start_server(cfg, repository=repo, state_dir=state)
    try:
        url, name = info.grpc_url, cfg.model_name
        deploy(cfg, onnx=exports[1]["onnx"], gate=exports[1]["gate"], export_result=exports[1]["export"],
               repository=repo, url=url, protocol="grpc", preprocessing=PreprocessSpec(image_size=28))
        args = json.dumps({"cfg": cfg.model_dump(mode="json"), "repo": str(repo), "url": url,
                           **{k: str(v) for k, v in exports[2].items() if k != "golden"}})
        cmd = [sys.executable, "-c", DEPLOY, args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
        record = []
        for point in ("deploy.staging", "deploy.written", "deploy.switching", "deploy.served"):
            code, out, seconds = _run_killable(cmd, tmp_path, env, crash_at=point, timeout=300)
            assert code == -signal.SIGKILL, f"{point}: {out[-3000:]}"
            versions = _complete_versions(repo / name)
            assert all(versions.values()), f"{point}: an incomplete version folder {versions}"
            # Triton answers, from a whole version, exactly that version's golden probabilities
            probs, answered = _served_answers(url, name, golden[1]["images"])
            served_sha = sha256_file(repo / name / answered / "model.onnx")
            which = next(n for n, s in sha.items() if s == served_sha)
            assert np.allclose(probs.reshape(-1), golden[which]["probabilities"].reshape(-1), atol=1e-4)
            record.append({"killed": point, "seconds": round(seconds, 1), "versions": versions,
                           "answered_version": answered, "answered_model": f"v{which}",
                           "hidden": sorted(p.name for p in (repo / name).iterdir()
                                            if p.name.startswith(".") and p.is_dir())})
        # no deploy lock left behind: the next deploy runs, and finishes what the killed ones began
        code, out, seconds = _run_killable(cmd, tmp_path, env, timeout=300)
        assert code == 0, out[-3000:]
        result = json.loads(out[out.index('{"model_name"'):].splitlines()[0])
        assert served_version(repo, name) == result["version"] and result["sha256"] == sha[2]
        probs, answered = _served_answers(url, name, golden[2]["images"])
        assert answered == str(result["version"])
        assert np.allclose(probs.reshape(-1), golden[2]["probabilities"].reshape(-1), atol=1e-4)
        assert (repo / name / answered / "deploy.json").is_file()
        assert not [p for p in (repo / name).iterdir() if p.name.endswith(".partial")]
        record.append({"killed": None, "seconds": round(seconds, 1), "version": result["version"],
                       "versions": _complete_versions(repo / name)})
        print("\ncrash-safe deploy:", json.dumps(record, indent=1))
    finally:
        stop_server(state)


# -- the Prefect server killed while a training run is in flight -------------------------------------

def _flow_runs(**filters) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        # sort and limit explicitly: Prefect 3.8.8's server answers 422 to the client's None
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(**filters),
                                     sort=FlowRunSort.START_TIME_ASC, limit=20)


def _wait_final(flow_run_id, timeout: float) -> object:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run {run.name} still {run.state_name}"
            time.sleep(2)


@pytest.mark.prefect
def test_a_training_run_cut_off_from_a_killed_prefect_server_continues_from_its_last_stage(
        project: Path, tmp_path: Path, free_port) -> None:
    from prefect.client.schemas.filters import FlowRunFilterTags
    from prefect.deployments import run_deployment

    from flows.recover import RESTART_TAG
    from medops.config import PrefectConfig, load_params
    from medops.ops.prefect_server import prefect_env, start_prefect, stop_prefect

    cfg = PrefectConfig(port=free_port())
    state = tmp_path / "prefect"
    server = start_prefect(cfg, state_dir=state, timeout=300)
    served = None
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # this process's client talks to that server (Prefect reads its environment only on import)
    settings = temporary_settings(updates={PREFECT_API_URL: cfg.api_url})
    settings.__enter__()
    try:
        repo = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, **prefect_env(cfg, state), "MEDOPS_ROOT": str(project), "PYTHONUNBUFFERED": "1",
               "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
               "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
        serve_log = tmp_path / "serve.log"

        def serve() -> subprocess.Popen:  # the flows served by a process, as `make demo` does
            return subprocess.Popen([sys.executable, "-m", "flows.serve", "--project", str(project)],
                                    cwd=repo, env=env, stdout=open(serve_log, "a"),
                                    stderr=subprocess.STDOUT, start_new_session=True)

        served = serve()
        name = f"training-pipeline/{load_params(project / 'params.yaml').prefect.deployment_name}"
        shutil.rmtree(project / "models" / "tensorboard", ignore_errors=True)
        results = project / "reports" / "stages"
        started = time.time()
        deadline = time.monotonic() + 180
        while True:  # until flows.serve has registered the deployment
            try:
                # epochs changed: train and what follows it run again; min_auc 1.0: no deploy
                first = run_deployment(name, timeout=0, parameters={
                    "project_root": str(project), "epochs": 3, "min_auc": 1.0})
                break
            except Exception:  # noqa: BLE001 - not registered yet
                assert time.monotonic() < deadline and served.poll() is None, serve_log.read_text()[-3000:]
                time.sleep(2)
        in_flight = _holds_file(project / "models" / "tensorboard")
        deadline = time.monotonic() + 600
        while not in_flight():
            assert time.monotonic() < deadline, serve_log.read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(server.pid, signal.SIGKILL)  # the server, mid-training
        killed = time.monotonic()
        deadline = killed + 600
        while "Encountered exception during execution" not in serve_log.read_text():
            assert time.monotonic() < deadline, serve_log.read_text()[-3000:]
            time.sleep(1)
        outage = time.monotonic() - killed
        start_prefect(cfg, state_dir=state, timeout=300)
        back = time.monotonic() - killed
        failed = _wait_final(first.id, 300)
        assert failed.state.type.value in ("FAILED", "CRASHED"), failed.state
        assert "ConnectError" in (failed.state.message or ""), failed.state.message
        # the stages this run finished (the one in flight too: its progress artifact could not be
        # posted, the stage went on), by the time of their results
        finished = {p.stem: p.stat().st_mtime for p in results.glob("*.json") if p.stat().st_mtime > started}
        assert "train" in finished, finished
        deadline = time.monotonic() + 120
        while not (restarted := _flow_runs(tags=FlowRunFilterTags(all_=[f"{RESTART_TAG}-1"]))):
            assert time.monotonic() < deadline, serve_log.read_text()[-3000:]
            time.sleep(2)
        [restarted] = restarted
        # Prefect's runner gives up after a few minutes without its server ("Service exceeded
        # error threshold"): the process that serves the flows is started again, as its
        # supervisor does (issue 14, item 2)
        serve_restarted = served.poll() is not None
        if serve_restarted:
            served = serve()
        assert restarted.parameters == first.parameters
        done = _wait_final(restarted.id, 900)
        assert done.state.type.value == "COMPLETED", (done.state, serve_log.read_text()[-3000:])
        # what the first run finished, DVC made a no-op in the new run; the rest ran there
        assert {n: (results / f"{n}.json").stat().st_mtime for n in finished} == finished
        redone = {p.stem for p in results.glob("*.json") if p.stat().st_mtime > started} - set(finished)
        assert "export" in redone, redone
        assert load_params(project / "params.yaml").train.epochs == 3
        from medops.ops import dvc

        assert dvc.status(project) == {}
        print("\nprefect restart:", json.dumps({
            "server_down_s": round(outage, 1), "back_after_s": round(back, 1),
            "first_run": [failed.name, failed.state.type.value, failed.state.message],
            "finished_in_first_run": sorted(finished), "run_in_restarted_run": sorted(redone),
            "restarted_run": [done.name, done.state.type.value], "serve_restarted": serve_restarted,
            "restart_total_s": round(time.monotonic() - killed, 1)}, indent=1))
    finally:
        if served is not None and served.poll() is None:
            os.killpg(served.pid, signal.SIGKILL)
            served.wait()
        stop_prefect(state)
        settings.__exit__(None, None, None)
