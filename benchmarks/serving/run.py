"""Serving benchmark (issues 4 and 12): the served paths beside the machine's in-process limits.

Configurations:

a. ``triton-batched``: the embedded tritonserver with the models as medops deploys them
   (``medops.serving.repository`` writers, ``medops.serving.contract`` configs from
   ``params.yaml``'s ``serving`` section: dynamic batching, ``serving.instances`` instances per
   Python-backend model, 0 = one per core), gRPC.
b. ``triton-unbatched`` (``--only ... unbatched``): the same models with ``dynamic_batching``
   removed.
c. ``fastapi-keras`` (``--only ... fastapi``): the usual hand-made server, FastAPI + uvicorn (one
   worker) calling the Keras model's ``model.predict`` per request (``keras_app.py``), HTTP.
d. the in-process limits of the machine, with all cores, on batches of ``serving.max_batch_size``:
   tensor: onnxruntime alone (the better of one session with a thread per core and one
   single-thread session per core in its own process); each DICOM path: the same work on the same
   files in one process per core, through the served model's own batch function
   (``postprocess.answer_files``: pydicom read, decode, scale, resize, as training prepared its
   images; onnxruntime; labels; with ``serving.record`` the drift records appended to a log, as
   the server records them). Measured before and after the servers; the higher is kept.

Paths: ``tensor`` (one preprocessed 28x28 float32 image per request to the classifier), ``dicom``
(the raw bytes of one DICOM file per request to the ensemble ``<model>_dicom``; embedded, one
Python model: preprocess, classify, label, record) and the compressed DICOM paths
``dicom-rle`` (the same files as RLE Lossless), ``dicom-jpeg-ls`` and ``dicom-j2k`` (pydicom's
64 x 64 MR test file in JPEG-LS / JPEG 2000 lossless); ``--no-compressed`` leaves them out.

Each of the c clients sends its next request when the previous one is answered (closed loop), for
``--seconds`` per point after ``--warmup`` seconds, from one asyncio process on the same cores as
the server (grpc.aio, each request serialized once before timing). Besides throughput and
p50/p95/p99 latency, each point records the CPU time per image of the server (tritonserver and
its Python-backend stubs) and the client together, and each limit its CPU time per image: their
ratio does not move with other work on the machine, which only slows everything down.

The model is ``models/model.keras`` + ``models/model.onnx`` when the pipeline has produced them,
otherwise an untrained model from ``params.yaml`` (weights do not change the timing). The DICOM
files are the first ``--dicom-files`` of ``data/raw/dicom`` if present, otherwise written by
``medops.dicom.synth`` from the bundled PneumoniaMNIST (28 x 28, 8-bit: a small radiograph).

    <venv>/bin/python benchmarks/serving/run.py --write   # c = 1 8 32, 5 s per point, ~6 min

Run it with a venv that has this tree installed (Triton's Python-backend stub imports medops
from the server's venv). Prints one side-by-side table, the limits with the ratios, and issue
12's targets with PASS/FAIL. The exit status is 0 whether or not the targets pass.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUNDLED = ROOT / "datasets" / "pneumoniamnist" / "pneumoniamnist.npz"

TRITON = ("triton-batched", "triton-unbatched")
FASTAPI = "fastapi-keras"
ORT_LIMIT = "onnxruntime full batches"

# The targets, checked at these concurrencies.
TARGET_SPEEDUP_OVER_FASTAPI = 5.0
TARGET_FRACTION_OF_LIMIT = 0.5
TARGET_P99_MS_AT_C1 = 5.0
TARGET_CONCURRENCY = 32
# the uncompressed DICOM path's limit without the drift records the server writes (reported
# beside the limit of the same work; the served "dicom" points are compared with both)
NO_RECORD = "dicom-no-record"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(latencies_s: list[float], wall_s: float, items_per_request: int = 1) -> dict[str, float]:
    """Throughput (requests/s and images/s) and latency percentiles (nearest rank) in ms."""
    ms = sorted(x * 1000 for x in latencies_s)
    if not ms:
        return {"requests": 0, "throughput_rps": 0.0, "images_per_s": 0.0}

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, max(0, int(np.ceil(p / 100 * len(ms))) - 1))]

    rps = len(ms) / wall_s
    return {"requests": len(ms), "throughput_rps": rps, "images_per_s": rps * items_per_request,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "mean_ms": statistics.fmean(ms)}


# -- inputs --------------------------------------------------------------------------------------

def prepare_models(workdir: Path, params: Any) -> tuple[Path, Path, str]:
    """``(keras, onnx, source)``: the project's models if present, else a fresh untrained one."""
    keras_path, onnx_path = ROOT / "models" / "model.keras", ROOT / "models" / "model.onnx"
    if keras_path.is_file() and onnx_path.is_file():
        return keras_path, onnx_path, "models/model.onnx + models/model.keras (the pipeline's)"
    import onnx

    from medops.stages.export import convert_to_onnx
    from medops.models import build_model

    size = params.ingest.image_size
    model = build_model(params.train.model, params.train, (size, size, 1))
    keras_path, onnx_path = workdir / "model.keras", workdir / "model.onnx"
    model.save(keras_path)
    onnx.save(convert_to_onnx(model, size, params.export.opset, {"source": "benchmark"}), onnx_path)
    return keras_path, onnx_path, f"untrained {params.train.model} (params.yaml)"


def load_images(n: int, size: int) -> np.ndarray:
    """``n`` bundled test images as the classifier takes them: ``(n, S, S, 1)`` float32 in [0, 1]."""
    images = np.load(BUNDLED)["test_images"]
    if images.shape[1:] != (size, size):
        raise SystemExit(f"bundled images are {images.shape[1:]}, the model takes {size}x{size}")
    idx = np.arange(n) % len(images)
    return (images[idx].astype(np.float32) / 255.0)[..., np.newaxis]


def load_dicom_files(n: int, workdir: Path) -> tuple[list[bytes], str]:
    """Raw bytes of ``n`` real DICOM files: ``data/raw/dicom`` if the pipeline wrote it, else a
    small synthetic export of the bundled dataset (medops.dicom.synth)."""
    raw = ROOT / "data" / "raw" / "dicom"
    files = sorted(raw.rglob("*.dcm"))[:n] if raw.is_dir() else []
    source = "data/raw/dicom"
    if len(files) < n:
        from medops.config import SynthConfig
        from medops.dicom import synth

        result = synth.run(SynthConfig(max_images_per_split=n), source_npz=BUNDLED,
                           out_dir=workdir / "synth")
        files = sorted(Path(result.dicom_dir).rglob("*.dcm"))[:n]
        source = "medops.dicom.synth of the bundled PneumoniaMNIST"
    return [f.read_bytes() for f in files], f"{len(files)} files from {source}"


# -- load generation -----------------------------------------------------------------------------

async def closed_loop(call: Callable[[int], Awaitable[Any]], concurrency: int, seconds: float,
                      warmup: float, items_per_request: int = 1,
                      cpu: Callable[[], float] | None = None) -> dict[str, float]:
    """``concurrency`` tasks each await ``call(k)`` back to back (k counts that task's requests,
    offset per task); requests started in the ``seconds`` after ``warmup`` are measured.
    ``cpu``: the CPU seconds used so far by everything serving (server and client); with it,
    ``cpu_ms_per_image`` is the CPU time per image over the measured window, a figure other
    work on the machine does not change (it only slows everything down)."""
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    marks: dict[str, float] = {}

    async def worker(offset: int) -> None:
        k = offset
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            if cpu is not None and t0 >= measure_from and "cpu0" not in marks:
                marks["cpu0"], marks["n0"], marks["client0"] = cpu(), done[0], sum(os.times()[:2])
            await call(k)
            done[0] += 1
            if t0 >= measure_from:
                latencies.append(time.perf_counter() - t0)
            k += concurrency

    done = [0]
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    out = summarize(latencies, seconds, items_per_request)
    if cpu is not None and "cpu0" in marks and done[0] > marks["n0"]:
        images = (done[0] - marks["n0"]) * items_per_request
        out["cpu_ms_per_image"] = 1000 * (cpu() - marks["cpu0"]) / images
        out["client_cpu_ms_per_image"] = 1000 * (sum(os.times()[:2]) - marks["client0"]) / images
    return out


def cpu_of(pid: int) -> Callable[[], float]:
    """CPU seconds (user + system) used so far by process ``pid``, its children (Triton's
    Python-backend stubs) and this process (the client)."""
    import psutil

    root = psutil.Process(pid)

    def used() -> float:
        total = sum(os.times()[:2])  # this process: the client
        for proc in [root, *root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:  # a stub that ended
                pass
        return total
    return used


# -- d: the in-process limits of the machine ----------------------------------------------------

def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def bench_onnxruntime(onnx_path: Path, images: np.ndarray, seconds: float, warmup: float) -> dict:
    """The tensor path's limit: ``session.run`` on full batches back to back with all cores, the
    better of one session using every core (intra-op threads) and one single-thread session per
    core in its own process (what the served model instances do)."""
    import onnxruntime as ort

    from medops.serving.contract import INPUT_NAME, OUTPUT_NAME

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cores()
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    async def call(_: int) -> None:
        session.run([OUTPUT_NAME], {INPUT_NAME: images})

    threads = asyncio.run(closed_loop(call, 1, seconds, warmup, items_per_request=len(images)))
    processes = in_processes("tensor", onnx_path, images, seconds, warmup)
    best = "threads" if threads["images_per_s"] >= processes["images_per_s"] else "processes"
    return {"images_per_s": max(threads["images_per_s"], processes["images_per_s"]),
            "cpu_ms_per_image": processes["cpu_ms_per_image"],
            "batch_size": len(images), "best": best, "cores": cores(),
            "threads_images_per_s": threads["images_per_s"],
            "processes_images_per_s": processes["images_per_s"]}


def bench_dicom_limit(onnx_path: Path, files: list[bytes], batch: int, spec: Any, seconds: float,
                      warmup: float, record: bool = False) -> dict:
    """The DICOM path's limit: the same work in-process on the same files with all cores (one
    process per core, pydicom holds the GIL): batches of ``batch`` files through the served
    model's own batch function (``postprocess.answer_files``: read, decode, scale and resize as
    training prepared its images, one onnxruntime call per batch on one thread, label) and, with
    ``record`` (``serving.record``, which the served path does too), the drift records of the
    batch appended to a ``RequestLog``."""
    items = [files[i % len(files)] for i in range(batch)]
    out = in_processes("dicom-record" if record else "dicom", onnx_path, items, seconds, warmup,
                       spec=spec)
    return {"images_per_s": out["images_per_s"], "cpu_ms_per_image": out["cpu_ms_per_image"],
            "batch_size": batch, "cores": cores(), "processes": cores(), "record": record}


def _limit_worker(kind: str, onnx_path: str, payload: Any, spec: Any, start_at: float,
                  seconds: float) -> tuple[int, float]:
    """One process of ``in_processes``: images done between ``start_at`` and ``+ seconds``, and
    the CPU seconds it used for them."""
    import onnxruntime as ort

    from medops.drift import RequestLog
    from medops.serving.backends.dicom_preprocess import Limits
    from medops.serving.backends.onnx_classifier import Classifier
    from medops.serving.backends.postprocess import answer_files
    from medops.serving.contract import INPUT_NAME, OUTPUT_NAME

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    limits = Limits(1 << 30, 1 << 30)
    record = kind == "dicom-record"
    if kind != "tensor":
        os.environ["MEDOPS_ORT_THREADS"] = "1"  # as each served instance runs it
        classifier = Classifier(onnx_path, {})
        requests = [[data] for data in payload]  # one file per request, as the clients send
        log = RequestLog(Path(tempfile.mkdtemp(prefix="medops-limit-")), max_bytes=64 << 20, keep=1)

    def once() -> int:
        if kind == "tensor":
            session.run([OUTPUT_NAME], {INPUT_NAME: payload})
            return len(payload)
        answers, records = answer_files(requests, spec, limits, classifier.run, threshold=0.5,
                                        labels=("normal", "pneumonia"), record=record)
        failed = [a for a in answers if isinstance(a, str) or any(a["error"].reshape(-1))]
        if failed:
            raise RuntimeError(f"the limit's files are not answered: {failed[:1]}")
        if records:
            log.append(records)
        return len(payload)

    while time.time() < start_at - seconds / 5:  # warm up until shortly before the start
        once()
    while time.time() < start_at:
        time.sleep(0.001)
    done, stop, cpu0 = 0, start_at + seconds, time.process_time()
    while time.time() < stop:
        done += once()
    return done, time.process_time() - cpu0


def in_processes(kind: str, onnx_path: Path, payload: Any, seconds: float, warmup: float,
                 spec: Any = None) -> dict:
    """``cores()`` processes doing ``kind``'s work back to back for ``seconds`` (after ``warmup``
    and their start-up), images per second over all of them."""
    import concurrent.futures
    import multiprocessing

    n = cores()
    start_at = time.time() + 10 + warmup  # after every process has started and warmed up
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx) as pool:
        done = list(pool.map(_limit_worker, [kind] * n, [str(onnx_path)] * n, [payload] * n,
                             [spec] * n, [start_at] * n, [seconds] * n))
    images, cpu = sum(d[0] for d in done), sum(d[1] for d in done)
    return {"images_per_s": images / seconds, "processes": n,
            "cpu_ms_per_image": 1000 * cpu / max(1, images)}


# -- a, b: Triton --------------------------------------------------------------------------------

def write_triton_repository(params: Any, onnx_path: Path, repository: Path,
                            configurations: tuple[str, ...] = TRITON) -> dict[str, Any]:
    """The models as deploy writes them (classifier version 1, pre/postprocessing, ensemble pinned
    to 1), once per Triton configuration; the unbatched set has ``dynamic_batching`` removed from
    every model that has it. Returns ``{configuration: EnsembleContract}``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from medops.serving.contract import build_ensemble_contract
    from medops.serving.repository import (
        write_config,
        write_ensemble,
        write_processing_models,
        write_version,
    )

    contracts = {}
    for label in configurations:
        cfg = params.serving.model_copy(update={"model_name": f"bench_{label.split('-')[1]}"})
        ec = build_ensemble_contract(cfg, params.ingest.preprocessing)
        write_version(ec.classifier, repository, onnx_path, flavour="embedded", version=1)
        write_config(ec.classifier, repository, "embedded", versions=[1])
        write_processing_models(ec, repository, "embedded")
        write_ensemble(ec, repository, 1)
        if label == "triton-unbatched":
            for name in (ec.classifier.name, ec.postprocess_name):  # embedded: no preprocess model
                path = repository / name / "config.pbtxt"
                config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
                config.ClearField("dynamic_batching")
                path.write_text(text_format.MessageToString(config))
        contracts[label] = ec
    return contracts


def check_triton_answers(url: str, contracts: dict[str, Any], images: np.ndarray,
                         expected: np.ndarray, dicom: dict[str, list[bytes]]) -> None:
    """Time only servers that answer right: the tensor path matches in-process onnxruntime, the
    DICOM path answers the first file without an error."""
    import tritonclient.grpc as grpcclient

    from medops.serving.client import infer_dicom, infer_images
    from medops.serving.deploy import wait_version_ready

    client = grpcclient.InferenceServerClient(url)
    try:
        for label, ec in contracts.items():
            for name in (ec.classifier.name, ec.ensemble_name):
                wait_version_ready(client, name, 1, timeout=120)
            probs, _ = infer_images(client, images[:8], protocol="grpc", model_name=ec.classifier.name)
            diff = float(np.max(np.abs(probs - expected[:8])))
            if not diff <= 1e-4:
                raise SystemExit(f"{label}: served probabilities differ from onnxruntime by {diff:.3g}")
            for path, files in dicom.items():
                _, _, errors, _ = infer_dicom(client, files, protocol="grpc",
                                              model_name=ec.ensemble_name)
                if any(errors):
                    raise SystemExit(f"{label}: the DICOM ensemble refused a {path} file: {errors}")
    finally:
        client.close()


def infer_request(model: str, name: str, datatype: str, array: np.ndarray,
                  outputs: list[str]) -> bytes:
    """A serialized KServe v2 ``ModelInferRequest`` of one input (raw contents), built once."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    if datatype == "BYTES":
        raw = b"".join(len(x).to_bytes(4, "little") + x for x in array.reshape(-1))
    else:
        raw = np.ascontiguousarray(array).tobytes()
    request.raw_input_contents.append(raw)
    del tensor
    for out in outputs:
        request.outputs.add(name=out)
    return request.SerializeToString()


async def bench_triton_paths(url: str, ec: Any, images: np.ndarray, dicom: dict[str, list[bytes]],
                             levels: list[int], seconds: float, warmup: float,
                             cpu: Callable[[], float] | None = None) -> dict[str, dict]:
    """``{"tensor": {c: stats}, <dicom path>: {c: stats}, ...}`` for one Triton configuration
    (``dicom``: the files of each DICOM path, e.g. uncompressed and compressed).

    The client is as light as Python allows, since it shares the cores with the server: each
    request is serialized once before timing and sent with grpc.aio's generic unary call (what
    tritonclient's aio client does, without building the request and parsing the answer in
    Python each time); a DICOM answer is checked for an empty ``error`` in its raw bytes."""
    import grpc
    from tritonclient.grpc import service_pb2

    from medops.serving.contract import (
        DICOM_INPUT,
        ERROR_OUTPUT,
        INPUT_NAME,
        LABEL_OUTPUT,
        OUTPUT_NAME,
    )

    channel = grpc.aio.insecure_channel(url, options=[("grpc.max_receive_message_length", -1),
                                                      ("grpc.max_send_message_length", -1)])
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=None,
                                response_deserializer=service_pb2.ModelInferResponse.FromString)
    try:
        tensors = [infer_request(ec.classifier.name, INPUT_NAME, "FP32", images[i:i + 1], [OUTPUT_NAME])
                   for i in range(len(images))]
        # all of them, as medops.serving.client asks: the ensemble refuses a request that leaves a
        # step's output unused ("unexpected deadlock")
        dicom_out = [OUTPUT_NAME, LABEL_OUTPUT, ERROR_OUTPUT]
        sets = {path: [infer_request(ec.ensemble_name, DICOM_INPUT, "BYTES",
                                     np.array([[d]], dtype=np.object_), dicom_out) for d in datas]
                for path, datas in dicom.items()}
        empty = (0).to_bytes(4, "little")  # one empty BYTES element

        async def tensor_call(k: int) -> None:
            await infer(tensors[k % len(tensors)])

        def dicom_call(files: list) -> Callable[[int], Awaitable[None]]:
            async def call(k: int) -> None:
                result = await infer(files[k % len(files)])
                error = result.raw_output_contents[[o.name for o in result.outputs].index(ERROR_OUTPUT)]
                if error != empty:  # a refused file is answered fast: it must not count as served
                    raise RuntimeError(f"{ec.ensemble_name} refused file {k % len(files)}: {error!r}")
            return call

        out: dict[str, dict] = {"tensor": {}}
        for c in levels:
            out["tensor"][c] = await closed_loop(tensor_call, c, seconds, warmup, cpu=cpu)
        for path, files in sets.items():
            out[path] = {}
            for c in levels:
                out[path][c] = await closed_loop(dicom_call(files), c, seconds, warmup, cpu=cpu)
        return out
    finally:
        await channel.close()


def bench_triton(params: Any, onnx_path: Path, images: np.ndarray, expected: np.ndarray,
                 dicom: dict[str, list[bytes]], levels: list[int], seconds: float, warmup: float,
                 workdir: Path, progress: Callable[[str], None],
                 configurations: tuple[str, ...] = TRITON) -> dict[str, dict]:
    from medops.serving.server import start_server, stop_server

    repository, state = workdir / "triton-repository", workdir / "triton-state"
    contracts = write_triton_repository(params, onnx_path, repository, configurations)
    cfg = params.serving.model_copy(update={
        "http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()})
    # No admin key: the benchmark's own throw-away server; the model-repository API is not used.
    info = start_server(cfg, repository=repository, state_dir=state, admin_key=None)
    try:
        check_triton_answers(info.grpc_url, contracts, images, expected, dicom)
        results = {}
        for label, ec in contracts.items():
            results[label] = asyncio.run(bench_triton_paths(
                info.grpc_url, ec, images, dicom, levels, seconds, warmup, cpu_of(info.pid)))
            progress(label)
        return results
    finally:
        stop_server(state)


# -- c: FastAPI + Keras --------------------------------------------------------------------------

def bench_fastapi(keras_path: Path, images: np.ndarray, levels: list[int], seconds: float,
                  warmup: float, workdir: Path) -> dict[int, dict]:
    import httpx

    port = free_port()
    env = dict(os.environ, MEDOPS_BENCH_KERAS=str(keras_path), TF_CPP_MIN_LOG_LEVEL="2")
    log_path = workdir / "fastapi.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "keras_app:app", "--host", "127.0.0.1", "--port",
             str(port), "--workers", "1", "--log-level", "warning", "--no-access-log"],
            cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).json().get("ready"):
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the FastAPI server did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        bodies = [images[i].tobytes() for i in range(len(images))]

        async def sweep() -> dict[int, dict]:
            limits = httpx.Limits(max_connections=max(levels), max_keepalive_connections=max(levels))
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
                async def call(k: int) -> None:
                    (await client.post("/predict", content=bodies[k % len(bodies)])).raise_for_status()

                return {c: await closed_loop(call, c, seconds, warmup) for c in levels}

        return asyncio.run(sweep())
    finally:
        os.killpg(proc.pid, 15)  # its own session: uvicorn and nothing else
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


# -- report --------------------------------------------------------------------------------------

def rows_of(results: dict) -> list[dict]:
    """Flat records ``{configuration, path, concurrency, ...stats}``."""
    rows = []
    for label in (*TRITON, FASTAPI):
        for path, per_c in results.get(label, {}).items():
            for c, stats in per_c.items():
                rows.append({"configuration": label, "path": path, "concurrency": int(c), **stats})
    return rows


def find(rows: list[dict], configuration: str, path: str, concurrency: int) -> dict | None:
    return next((r for r in rows if (r["configuration"], r["path"], r["concurrency"])
                 == (configuration, path, concurrency) and r["requests"]), None)


def check_targets(rows: list[dict], limits: dict[str, dict]) -> list[dict]:
    """Issue 12's targets (and issue 4's speed-up over FastAPI when it was measured), each with
    the measured values, the ratio and pass/fail (None: not measured in this run)."""
    c, checks = TARGET_CONCURRENCY, []

    def add(target: str, measured: str | None, ratio: float | None, passed: bool | None) -> None:
        checks.append({"target": target, "measured": measured or "not measured", "ratio": ratio,
                       "passed": passed})

    fastapi = find(rows, FASTAPI, "tensor", c)
    batched = find(rows, "triton-batched", "tensor", c)
    if fastapi:
        ratio = batched["throughput_rps"] / fastapi["throughput_rps"] if batched else None
        add(f"c={c}: triton-batched tensor >= {TARGET_SPEEDUP_OVER_FASTAPI:g}x fastapi-keras",
            batched and f"{batched['throughput_rps']:.0f} vs {fastapi['throughput_rps']:.0f} req/s",
            ratio, None if ratio is None else ratio >= TARGET_SPEEDUP_OVER_FASTAPI)
    for path in ("tensor", "dicom"):
        served, limit = find(rows, "triton-batched", path, c), limits.get(path)
        ratio = served["images_per_s"] / limit["images_per_s"] if served and limit else None
        add(f"c={c}: {path} path >= {TARGET_FRACTION_OF_LIMIT:g}x the machine's in-process limit",
            served and limit and f"{served['images_per_s']:.0f} vs {limit['images_per_s']:.0f} images/s",
            ratio, None if ratio is None else ratio >= TARGET_FRACTION_OF_LIMIT)
    for path in ("tensor", "dicom"):  # the same, in CPU time per image: not moved by other load
        served, limit = find(rows, "triton-batched", path, c), limits.get(path)
        ratio = (limit["cpu_ms_per_image"] / served["cpu_ms_per_image"]
                 if served and limit and served.get("cpu_ms_per_image") else None)
        add(f"c={c}: {path} path >= {TARGET_FRACTION_OF_LIMIT:g}x the limit in CPU time per image "
            "(server + client; load-independent)",
            ratio and f"{served['cpu_ms_per_image']:.3f} vs {limit['cpu_ms_per_image']:.3f} ms",
            ratio, None if ratio is None else ratio >= TARGET_FRACTION_OF_LIMIT)
    served, bare = find(rows, "triton-batched", "dicom", c), limits.get(NO_RECORD)
    if served and bare:  # for comparison: a limit that skips the drift records the server writes
        ratio = served["images_per_s"] / bare["images_per_s"]
        add(f"(for comparison) c={c}: dicom path >= {TARGET_FRACTION_OF_LIMIT:g}x the limit "
            "without drift records", f"{served['images_per_s']:.0f} vs {bare['images_per_s']:.0f} "
            "images/s", ratio, ratio >= TARGET_FRACTION_OF_LIMIT)
        if served.get("cpu_ms_per_image"):
            ratio = bare["cpu_ms_per_image"] / served["cpu_ms_per_image"]
            add(f"(for comparison) c={c}: the same in CPU time per image",
                f"{served['cpu_ms_per_image']:.3f} vs {bare['cpu_ms_per_image']:.3f} ms", ratio,
                ratio >= TARGET_FRACTION_OF_LIMIT)
    for path in ("tensor", "dicom"):
        one = find(rows, "triton-batched", path, 1)
        add(f"c=1: {path} path p99 < {TARGET_P99_MS_AT_C1:g} ms", one and f"p99 {one['p99_ms']:.2f} ms",
            one and one["p99_ms"] / TARGET_P99_MS_AT_C1, one and one["p99_ms"] < TARGET_P99_MS_AT_C1)
    return checks


def render_markdown(rows: list[dict], limits: dict[str, dict], checks: list[dict], meta: dict) -> str:
    levels = sorted({r["concurrency"] for r in rows})
    lines = [
        "# Serving benchmark",
        "",
        f"{meta['when']}, {meta['machine']}; commit {meta['commit']}.",
        f"Load (`/proc/loadavg`): before `{meta['loadavg']['before']}`, after "
        f"`{meta['loadavg']['after']}`. Other work shares these cores: compare the ratios "
        "(measured side by side in this run), not the absolute figures.",
        f"Model: {meta['model']}. DICOM: {meta['dicom']}. Closed loop ("
        f"{meta['client']}), c concurrent clients on the same cores as the server, "
        f"{meta['seconds']:g} s per point after {meta['warmup']:g} s warm-up; Triton: "
        f"{meta['batching']}.",
        "",
        "Cells: throughput (requests/s, one image per request), p50 / p95 / p99 latency in ms.",
        "",
        "| configuration | path | " + " | ".join(f"c={c}" for c in levels) + " |",
        "|---|---|" + "---|" * len(levels),
    ]
    paths = list(dict.fromkeys(r["path"] for r in rows))
    for label in (*TRITON, FASTAPI):
        for path in paths:
            cells = [find(rows, label, path, c) for c in levels]
            if not any(cells):
                continue
            lines.append(f"| {label} | {path} | " + " | ".join(
                f"{r['throughput_rps']:.0f}/s, {r['p50_ms']:.2f} / {r['p95_ms']:.2f} / {r['p99_ms']:.2f}"
                if r else "-" for r in cells) + " |")
    if limits:
        lines += ["", "In-process limits of the machine (all cores, batches of "
                  f"{next(iter(limits.values()))['batch_size']}), and the served c={TARGET_CONCURRENCY} "
                  "throughput as a fraction of them (each limit measured before and after the "
                  "served points, the higher kept):", "",
                  "| path | in-process limit | how | served at c=32 | ratio | CPU ms per image: "
                  "limit / served (server + client) | of which the client | CPU ratio | "
                  "CPU ratio of a server that only did the limit's work |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for path, limit in limits.items():
            how = (f"onnxruntime: best of one session with {limit['cores']} threads "
                   f"({limit['threads_images_per_s']:.0f}/s) and {limit['cores']} "
                   f"processes x 1 thread ({limit['processes_images_per_s']:.0f}/s)"
                   if path == "tensor" else
                   f"{limit['processes']} processes: the served model's batch function "
                   "(pydicom read + decode + scale + resize as in training, onnxruntime on 1 "
                   "thread, label" + (", drift records appended" if limit.get("record") else "")
                   + ")")
            served = find(rows, "triton-batched", "dicom" if path == NO_RECORD else path,
                          TARGET_CONCURRENCY)
            ratio = f"{served['images_per_s'] / limit['images_per_s']:.2f}" if served else "-"
            lines.append(f"| {path} | {limit['images_per_s']:.0f} images/s | {how} | "
                         f"{served['images_per_s']:.0f}/s |" if served else
                         f"| {path} | {limit['images_per_s']:.0f} images/s | {how} | - |")
            lines[-1] += f" {ratio} |"
            cpu_served = served.get("cpu_ms_per_image") if served else None
            lines[-1] += (f" {limit['cpu_ms_per_image']:.3f} / {cpu_served:.3f} | "
                          f"{served['client_cpu_ms_per_image']:.3f} | "
                          f"{limit['cpu_ms_per_image'] / cpu_served:.2f} |" if cpu_served else " - | - | - |")
            if cpu_served:  # the client's share is fixed: even a server with no overhead at all
                best = limit["cpu_ms_per_image"] / (limit["cpu_ms_per_image"]
                                                    + served["client_cpu_ms_per_image"])
                lines[-1] += f" {best:.2f} |"
            else:
                lines[-1] += " - |"
    if limits:
        lines += ["", "The last column bounds what any server could reach with these clients on "
                  "these cores: the clients' own CPU per image is fixed, and a server that spent "
                  "nothing beyond the limit's own work per image would still add the client's "
                  "share. Where it is below 0.5, the 0.5x target cannot be met by a server alone "
                  "with one image per request."]
    lines += ["", "## Targets (issue 12)", "", "| target | measured | ratio | result |",
              "|---|---|---|---|"]
    for chk in checks:
        result = {True: "PASS", False: "FAIL", None: "not measured"}[chk["passed"]]
        ratio = "-" if chk["ratio"] is None else f"{chk['ratio']:.2f}"
        lines.append(f"| {chk['target']} | {chk['measured']} | {ratio} | {result} |")
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def compressed_sets(files: list[bytes]) -> tuple[dict[str, list[bytes]], dict[str, str]]:
    """The compressed DICOM paths: the benchmark's files re-encoded as RLE Lossless (pydicom's
    own encoder), and pydicom's 64 x 64 MR test file in JPEG-LS and JPEG 2000 lossless (no
    encoder for those here that takes a 28 x 28 image). ``({path: files}, {path: source})``."""
    import io

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import RLELossless

    rle = []
    for data in files:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.compress(RLELossless)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        rle.append(out.getvalue())
    sets, sources = {"dicom-rle": rle}, {"dicom-rle": "the same files as RLE Lossless"}
    for path, name in (("dicom-jpeg-ls", "MR_small_jpeg_ls_lossless.dcm"),
                       ("dicom-j2k", "MR_small_jp2klossless.dcm")):
        found = get_testdata_file(name)
        if found:
            sets[path] = [Path(found).read_bytes()]
            sources[path] = f"pydicom's {name} (64 x 64 MR)"
    return sets, sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per point")
    parser.add_argument("--only", nargs="+", choices=["onnxruntime", "triton", "unbatched", "fastapi"],
                        default=["onnxruntime", "triton"],
                        help="triton: the models as deployed; unbatched: also without dynamic "
                             "batching; fastapi: the hand-made Keras server")
    parser.add_argument("--no-compressed", action="store_true", help="skip the compressed DICOM paths")
    parser.add_argument("--dicom-files", type=int, default=32)
    parser.add_argument("--max-queue-delay-us", type=int, default=None,
                        help="override serving.max_queue_delay_us for this run")
    parser.add_argument("--preferred-batch-sizes", type=int, nargs="*", default=None,
                        help="override serving.preferred_batch_sizes for this run (none: empty)")
    parser.add_argument("--write", action="store_true", help="write results.json and results.md")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for --write")
    args = parser.parse_args(argv)
    levels = sorted(set(args.concurrency))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from medops.config import load_params

    params = load_params(ROOT / "params.yaml")
    if args.max_queue_delay_us is not None:
        params = params.model_copy(update={"serving": params.serving.model_copy(
            update={"max_queue_delay_us": args.max_queue_delay_us})})
    if args.preferred_batch_sizes is not None:
        params = params.model_copy(update={"serving": params.serving.model_copy(
            update={"preferred_batch_sizes": args.preferred_batch_sizes})})
    load_before = Path("/proc/loadavg").read_text().strip()
    began = time.monotonic()

    def progress(what: str) -> None:
        print(f"[{time.monotonic() - began:5.0f} s] {what} done", file=sys.stderr, flush=True)

    results: dict[str, dict] = {}
    limits: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="medops-bench-") as tmp:
        workdir = Path(tmp)
        keras_path, onnx_path, source = prepare_models(workdir, params)
        size, spec = params.ingest.image_size, params.ingest.preprocessing
        batch = load_images(params.serving.max_batch_size, size)
        files, dicom_source = load_dicom_files(args.dicom_files, workdir)
        dicom = {"dicom": files}
        if not args.no_compressed:
            more, sources = compressed_sets(files)
            dicom |= more
            dicom_source += "; " + "; ".join(f"{k}: {v}" for k, v in sources.items())
        import onnxruntime as ort

        from medops.serving.contract import INPUT_NAME, OUTPUT_NAME

        expected = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
            [OUTPUT_NAME], {INPUT_NAME: batch})[0].reshape(-1)
        def measure_limits() -> dict[str, dict]:
            out = {"tensor": bench_onnxruntime(onnx_path, batch, args.seconds, args.warmup)}
            for path, datas in dicom.items():
                out[path] = bench_dicom_limit(onnx_path, datas, len(batch), spec, args.seconds,
                                              args.warmup, record=params.serving.record)
            if params.serving.record:  # the same without the drift records, for comparison
                out[NO_RECORD] = bench_dicom_limit(onnx_path, dicom["dicom"], len(batch), spec,
                                                   args.seconds, args.warmup, record=False)
            progress("in-process limits")
            return out

        configurations = tuple(label for label, flag in zip(TRITON, ("triton", "unbatched"))
                               if flag in args.only)
        before = measure_limits() if "onnxruntime" in args.only else {}
        if configurations:
            results |= bench_triton(params, onnx_path, batch, expected, dicom, levels, args.seconds,
                                    args.warmup, workdir, progress, configurations)
        # the machine's load moves: the limits again after the servers, the better of the two kept
        after = measure_limits() if before and configurations else {}
        for path, first in before.items():
            second = after.get(path, first)
            limits[path] = max(first, second, key=lambda x: x["images_per_s"]) | {
                "before_images_per_s": first["images_per_s"],
                "after_images_per_s": second["images_per_s"]}
        if "fastapi" in args.only:
            results[FASTAPI] = {"tensor": bench_fastapi(keras_path, batch, levels, args.seconds,
                                                        args.warmup, workdir)}
            progress(FASTAPI)
    sv = params.serving
    from medops.serving.contract import build_contract, instance_count

    instances = instance_count(build_contract(sv, image_size=params.ingest.image_size), "embedded")
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {cores()} cores, Python {platform.python_version()}",
        "commit": git_commit(), "model": source, "dicom": dicom_source,
        "seconds": args.seconds, "warmup": args.warmup, "concurrency": levels,
        "client": "grpc.aio with requests serialized once; perf_analyzer is not installable here, see README",
        "batching": f"{instances} instance(s) per model (serving.instances {sv.instances}), "
                    f"max_batch_size {sv.max_batch_size}, preferred {sv.preferred_batch_sizes}, "
                    f"max queue delay {sv.max_queue_delay_us} us",
        # other work on the machine skews every number: record how busy it was
        "loadavg": {"before": load_before, "after": Path("/proc/loadavg").read_text().strip()},
        "total_s": round(time.monotonic() - began, 1),
    }
    rows = rows_of(results)
    checks = check_targets(rows, limits)
    report = render_markdown(rows, limits, checks, meta)
    print(report)
    if args.write:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(
            {"meta": meta, "results": rows, "limits": limits, "targets": checks}, indent=2) + "\n")
        (args.out / "results.md").write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
