"""Issue 4 item 4: a rollout and failed rollouts while clients send requests all along: no request
fails.

A real tritonserver (free ports) serves v1. Client threads send requests continuously for the
whole test, through medops.serving.client: tensors to the classifier (sync gRPC and HTTP) and DICOM bytes
to the ensemble (sync HTTP, asyncio gRPC with requests in flight at once). Meanwhile v2 (good) is
deployed, then two v3s that must not be served: one that disagrees with its golden samples, one
whose ONNX cannot load for this input size. Every request's outcome is recorded; none may fail,
each client sees v1 then v2 and never v3, with each version's own probabilities, and v2 serves
afterwards. Retries are off (``retries=0``): a request that fails during the switch is a failure
here, not something a retry hides.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import pydicom_file
from medops.serving.client import apredict_files, label_for, predict_files
from medops.config import ServingConfig
from medops.errors import ServingError
from medops.serving.deploy import deploy
from medops.serving.repository import list_versions, served_version
from medops.serving.server import start_server, stop_server
from test_triton_serving import (
    S,
    SPEC,
    expected_probability,
    write_bundled_dicom,
    write_export_result,
    write_gate,
    write_golden,
    write_tiny_onnx,
)

pytestmark = [pytest.mark.triton, pytest.mark.slow]

V1 = {"w": 4.0, "b": -2.0}
V2 = {"w": -3.0, "b": 1.0}
COEF = {"1": V1, "2": V2}
MAX_PIXELS = 128 * 128


@dataclass
class Outcome:
    client: str
    start: float
    end: float
    versions: list[str | None] = field(default_factory=list)
    error: str | None = None
    wrong_label: str | None = None  # answered, but labelled with another version's threshold


@dataclass
class Load:
    """Client threads sending requests until ``stop`` is set, every outcome kept in order."""

    files: list[Path]
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    expected: dict[tuple[str, str], float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    def record(self, client: str, start: float, preds=None, error: str | None = None) -> None:
        out = Outcome(client, start, time.monotonic(), error=error)
        if preds is not None:
            out.versions = [p.model_version for p in preds]
            for p, f in zip(preds, self.files):
                if p.error is not None:
                    out.error = f"{f.name}: {p.error}"
                elif p.model_version in COEF and abs(
                        p.probability - self.expected[(p.model_version, str(f))]) > 1e-5:
                    out.error = (f"{f.name}: probability {p.probability} is not version "
                                 f"{p.model_version}'s {self.expected[(p.model_version, str(f))]}")
                elif p.model_version in self.thresholds and p.label != label_for(
                        p.probability, self.thresholds[p.model_version]):
                    out.wrong_label = (f"{f.name}: {p.label} for p={p.probability:.3f} from "
                                       f"v{p.model_version} (threshold "
                                       f"{self.thresholds[p.model_version]})")
        with self.lock:
            self.outcomes.append(out)

    def count(self, client: str, version: str | None = None) -> int:
        with self.lock:
            return sum(1 for o in self.outcomes if o.client == client and o.error is None
                       and (version is None or set(o.versions) == {version}))


def sync_worker(load: Load, name: str, **kwargs) -> None:
    while not load.stop.is_set():
        start = time.monotonic()
        try:
            load.record(name, start, predict_files(load.files, retries=0, **kwargs))
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome to report
            load.record(name, start, error=f"{type(exc).__name__}: {exc}")
        time.sleep(0.01)


def async_worker(load: Load, name: str, **kwargs) -> None:
    async def loop() -> None:
        while not load.stop.is_set():
            start = time.monotonic()
            try:
                preds = await apredict_files(load.files, retries=0, batch_size=1, concurrency=2,
                                             **kwargs)
                load.record(name, start, preds)
            except Exception as exc:  # noqa: BLE001
                load.record(name, start, error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.01)

    asyncio.run(loop())


@pytest.fixture
def server(tmp_path, free_port):
    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=60, max_image_pixels=MAX_PIXELS)
    state = tmp_path / "state"
    info = start_server(cfg, repository=tmp_path / "repository", state_dir=state)
    try:
        yield {"cfg": cfg, "info": info, "repo": tmp_path / "repository", "base": tmp_path}
    finally:
        stop_server(state)


def _deploy(server, tag: str, *, coef: dict, golden: dict | None = None, size: int = S,
            threshold: float | None = None):
    base = server["base"]
    onnx_path = write_tiny_onnx(base / tag / "model.onnx", size=size, **coef)
    write_golden(onnx_path, **(golden or coef))
    return deploy(server["cfg"], onnx=onnx_path, gate=write_gate(base / f"{tag}.json", passed=True),
                  export_result=write_export_result(onnx_path, decision_threshold=threshold),
                  repository=server["repo"], url=server["info"].grpc_url, protocol="grpc",
                  preprocessing=SPEC, timeout=20)


def _wait_for(condition, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


WORKER_KINDS = ("tensor-grpc", "tensor-http", "dicom-http", "dicom-grpc-async")


def run_rollout(server, tmp_path, *, v2_threshold: float | None = None,
                failing_v3s: bool = True) -> tuple[Load, dict[str, float], float]:
    """Deploy v1, start the clients, deploy v2 (and the failing v3s) under load, stop the
    clients. Returns the load, the times of the deploy events and the start time."""
    began = time.monotonic()
    cfg, info = server["cfg"], server["info"]
    assert _deploy(server, "v1", coef=V1).version == 1
    files = [write_bundled_dicom(tmp_path / "cr.dcm", index=3), pydicom_file("CT_small.dcm")]
    load = Load(files=files, expected={(v, str(f)): expected_probability(f, **c)
                                       for v, c in COEF.items() for f in files},
                thresholds={"1": 0.5, "2": 0.5 if v2_threshold is None else v2_threshold})
    common = {"model_name": cfg.model_name, "preprocessing": SPEC, "timeout": 20}
    workers = {
        "tensor-grpc": (sync_worker, {"url": info.grpc_url, "protocol": "grpc", "via": "tensor"}),
        "tensor-http": (sync_worker, {"url": info.http_url, "protocol": "http", "via": "tensor"}),
        "dicom-http": (sync_worker, {"url": info.http_url, "protocol": "http", "via": "ensemble"}),
        "dicom-grpc-async": (async_worker, {"url": info.grpc_url, "protocol": "grpc",
                                            "via": "ensemble"}),
    }
    assert tuple(workers) == WORKER_KINDS
    threads = [threading.Thread(target=fn, args=(load, name), kwargs={**common, **kw}, daemon=True)
               for name, (fn, kw) in workers.items()]
    for t in threads:
        t.start()
    events: dict[str, float] = {}
    try:
        for name in workers:
            _wait_for(lambda: load.count(name, "1") >= 3, f"{name} answered by v1")
        events["v2 deploy"] = time.monotonic()
        assert _deploy(server, "v2", coef=V2, threshold=v2_threshold).version == 2
        events["v2 served"] = time.monotonic()
        for name in workers:
            _wait_for(lambda: load.count(name, "2") >= 3, f"{name} answered by v2")
        if failing_v3s:
            events["v3 golden"] = time.monotonic()
            with pytest.raises(ServingError, match="golden check failed"):
                _deploy(server, "v3_drifted", coef={"w": 2.0, "b": 0.0},
                        golden={"w": 2.0, "b": 0.05})
            events["v3 load"] = time.monotonic()
            with pytest.raises(ServingError, match="candidate check failed"):
                _deploy(server, "v3_wrong_size", coef={"w": 1.0, "b": 0.0}, size=S + 4)
            events["v3 done"] = time.monotonic()
            for name in workers:
                n = load.count(name, "2")
                _wait_for(lambda: load.count(name, "2") >= n + 3, f"{name} answered after the v3s")
    finally:
        load.stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    return load, events, began


def _describe(outcomes: list[Outcome], attr: str, began: float, events: dict[str, float]) -> str:
    return ("; ".join(f"{o.client} at +{o.start - began:.2f}s: {getattr(o, attr)}"
                      for o in outcomes[:5])
            + f"; deploy events at {[(k, round(v - began, 2)) for k, v in events.items()]}")


@pytest.mark.timeout(180)
def test_no_request_fails_during_a_rollout_and_failed_rollouts(server, tmp_path):
    load, events, began = run_rollout(server, tmp_path)
    cfg, info, repo = server["cfg"], server["info"], server["repo"]
    workers = WORKER_KINDS

    failed = [o for o in load.outcomes if o.error is not None]
    assert not failed, (f"{len(failed)} of {len(load.outcomes)} requests failed; first ones: "
                        + _describe(failed, "error", began, events))
    # one threshold (0.5) for both versions here, so every label must agree with it
    assert not [o for o in load.outcomes if o.wrong_label]
    for name in workers:
        seen = [v for o in load.outcomes if o.client == name for v in o.versions]
        assert "3" not in seen
        # v1 then v2, never back: the first v2 answer is followed only by v2 answers
        first_v2 = seen.index("2")
        assert set(seen[:first_v2]) == {"1"} and set(seen[first_v2:]) == {"2"}, (name, seen)
        # requests that began after v2 was served were all answered by v2
        late = [o for o in load.outcomes if o.client == name and o.start > events["v2 served"]]
        assert late and all(set(o.versions) == {"2"} for o in late)
    assert len(load.outcomes) >= 4 * 9
    # the clients really were sending while each deploy changed the server
    for begin_event, end_event in (("v2 deploy", "v2 served"), ("v3 golden", "v3 done")):
        during = [o for o in load.outcomes
                  if o.start < events[end_event] and o.end > events[begin_event]]
        assert {o.client for o in during} == set(workers), (begin_event, len(during))

    # afterwards: v2 still serves, and the failed v3s left nothing behind
    assert list_versions(repo, cfg.model_name) == [1, 2]
    assert served_version(repo, cfg.model_name) == 2
    preds = predict_files(load.files, url=info.grpc_url, model_name=cfg.model_name, preprocessing=SPEC)
    assert [p.model_version for p in preds] == ["2", "2"]
    assert time.monotonic() - began < 120  # bounded: the whole rollout under load


@pytest.mark.long
@pytest.mark.timeout(180)
def test_labels_during_a_rollout_use_the_answering_versions_threshold(server, tmp_path):
    # v2 chose 0.3: CT_small is "normal" at v1 (p 0.379 < 0.5) and "pneumonia" at v2 (0.468 >= 0.3),
    # and v1's p 0.379 would be "pneumonia" under v2's threshold, so a mix-up shows either way
    load, events, began = run_rollout(server, tmp_path, v2_threshold=0.3, failing_v3s=False)
    assert not [o for o in load.outcomes if o.error]
    wrong = [o for o in load.outcomes if o.wrong_label]
    assert not wrong, (f"{len(wrong)} of {len(load.outcomes)} answers had another version's "
                       "label: " + _describe(wrong, "wrong_label", began, events))
