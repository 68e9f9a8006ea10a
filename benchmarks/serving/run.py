"""Serving benchmark (issue 4): the same classifier served four ways, swept over concurrency.

1. ``onnxruntime``: in-process onnxruntime session, one image per call, c threads (the floor: no
   network, no server).
2. ``triton-batched``: the embedded tritonserver, Python-backend model with dynamic batching as
   the contract renders it (preferred sizes, max queue delay), c concurrent gRPC requests.
3. ``triton-unbatched``: the same model with dynamic batching removed.
4. ``fastapi-keras``: FastAPI + uvicorn with the Keras model in memory, c concurrent HTTP requests.

Every request carries one 28x28 image (a closed loop: each of the c workers sends its next request
when the previous one is answered), for ``--seconds`` per point after a short warm-up. Client and
servers share this machine, so the numbers include the client's CPU use; compare configurations
with each other, not with a dedicated server.

The model is ``models/model.keras`` + ``models/model.onnx`` if the pipeline has produced them,
otherwise an untrained ``simple_cnn`` from ``params.yaml`` (weights do not change the timing),
exported with ``medops.export.convert_to_onnx``.

    .venv/bin/python benchmarks/serving/run.py [--concurrency 1 4 16 64] [--seconds 3]

Writes ``results.json`` and ``results.md`` to ``--out`` (default: this folder).
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
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies_s)
    if not ms:
        return {"requests": 0, "throughput_rps": 0.0}

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, int(round(p / 100 * (len(ms) - 1))))]

    return {"requests": len(ms), "throughput_rps": len(ms) / wall_s, "p50_ms": pct(50),
            "p95_ms": pct(95), "p99_ms": pct(99), "mean_ms": statistics.fmean(ms)}


# -- models --------------------------------------------------------------------------------------

def prepare_models(workdir: Path) -> tuple[Path, Path, str]:
    """``(keras, onnx, source)``: the project's models if present, else a fresh simple_cnn."""
    keras_path, onnx_path = ROOT / "models" / "model.keras", ROOT / "models" / "model.onnx"
    if keras_path.is_file() and onnx_path.is_file():
        return keras_path, onnx_path, "models/ (trained by the pipeline)"
    import onnx

    from medops.config import load_params
    from medops.export import convert_to_onnx
    from medops.models import build_model

    params = load_params(ROOT / "params.yaml")
    size = params.ingest.image_size
    model = build_model(params.train.model, params.train, (size, size, 1))
    keras_path, onnx_path = workdir / "model.keras", workdir / "model.onnx"
    model.save(keras_path)
    onnx.save(convert_to_onnx(model, size, params.export.opset, {"source": "benchmark"}), onnx_path)
    return keras_path, onnx_path, f"untrained {params.train.model} (params.yaml)"


# -- load generators -----------------------------------------------------------------------------

def run_threads(call: Callable[[], None], concurrency: int, seconds: float,
                warmup: float = 0.5) -> dict[str, float]:
    """Closed loop: ``concurrency`` threads call ``call`` back to back for ``seconds``."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    def worker() -> None:
        mine = []
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            call()
            t1 = time.perf_counter()
            if t0 >= measure_from:
                mine.append(t1 - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(latencies, seconds)


async def run_async(call: Callable[[], Any], concurrency: int, seconds: float,
                    warmup: float = 0.5) -> dict[str, float]:
    """Closed loop: ``concurrency`` asyncio tasks await ``call()`` back to back for ``seconds``."""
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def worker() -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            await call()
            if t0 >= measure_from:
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(latencies, seconds)


# -- the four configurations ---------------------------------------------------------------------

def bench_onnxruntime(onnx_path: Path, image: np.ndarray, levels: list[int], seconds: float) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as the Triton model instance; threads give the concurrency
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return {c: run_threads(lambda: session.run(["probability"], {"image": image}), c, seconds)
            for c in levels}


def load_triton_models(client: Any, onnx_path: Path, image_size: int) -> dict[str, str]:
    """Load the classifier twice through the model-control API: with and without batching."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from medops.config import ServingConfig
    from medops.serving.contract import build_contract, render_config
    from medops.serving.repository import CLASSIFIER_BACKEND

    files = {"file:1/model.onnx": onnx_path.read_bytes(),
             "file:1/model.py": CLASSIFIER_BACKEND.read_bytes()}
    names = {}
    for label, batched in (("triton-batched", True), ("triton-unbatched", False)):
        config = text_format.Parse(
            render_config(build_contract(ServingConfig(), image_size=image_size), "embedded"),
            model_config_pb2.ModelConfig())
        config.name = label.replace("-", "_")
        if not batched:
            config.ClearField("dynamic_batching")
        client.load_model(config.name, files=files,
                          config=json_format.MessageToJson(config, preserving_proto_field_name=True))
        names[label] = config.name
    return names


async def bench_triton_model(url: str, model: str, image: np.ndarray, levels: list[int],
                             seconds: float) -> dict:
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(url)
    try:
        inp = aio.InferInput("image", list(image.shape), "FP32")
        inp.set_data_from_numpy(image)
        out = [aio.InferRequestedOutput("probability")]
        return {c: await run_async(lambda: client.infer(model, [inp], outputs=out), c, seconds)
                for c in levels}
    finally:
        await client.close()


def bench_triton(onnx_path: Path, image: np.ndarray, levels: list[int], seconds: float,
                 workdir: Path) -> dict:
    import tritonclient.grpc as grpcclient

    from medops.config import ServingConfig
    from medops.serving.server import start_server, stop_server

    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    state = workdir / "triton-state"
    info = start_server(cfg, repository=workdir / "triton-repo", state_dir=state)
    try:
        control = grpcclient.InferenceServerClient(info.grpc_url)
        try:
            names = load_triton_models(control, onnx_path, image.shape[1])
        finally:
            control.close()
        return {label: asyncio.run(bench_triton_model(info.grpc_url, name, image, levels, seconds))
                for label, name in names.items()}
    finally:
        stop_server(state)


def bench_fastapi(keras_path: Path, image: np.ndarray, levels: list[int], seconds: float,
                  workdir: Path) -> dict:
    import httpx

    port = free_port()
    env = dict(os.environ, MEDOPS_BENCH_KERAS=str(keras_path), TF_CPP_MIN_LOG_LEVEL="2")
    log = open(workdir / "fastapi.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "keras_app:app", "--host", "127.0.0.1", "--port",
         str(port), "--log-level", "warning", "--no-access-log"],
        cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).json().get("ready"):
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"FastAPI baseline did not start; see {workdir / 'fastapi.log'}")
            time.sleep(0.5)
        body = image.tobytes()

        async def sweep() -> dict:
            limits = httpx.Limits(max_connections=max(levels), max_keepalive_connections=max(levels))
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
                return {c: await run_async(lambda: client.post("/predict", content=body), c, seconds)
                        for c in levels}

        return asyncio.run(sweep())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# -- report --------------------------------------------------------------------------------------

def render_markdown(results: dict, meta: dict) -> str:
    levels = sorted({int(c) for r in results.values() for c in r})
    lines = [
        "# Serving benchmark",
        "",
        f"{meta['when']} on {meta['machine']} (1-min load average {meta['loadavg_1min'][0]} before, "
        f"{meta['loadavg_1min'][1]} after); model: {meta['model']}; {meta['seconds']} s per point;",
        "one 28x28 image per request; closed loop with c concurrent clients on the same machine.",
        "",
        "| configuration | " + " | ".join(f"c={c}" for c in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for name, per_c in results.items():
        cells = []
        for c in levels:
            r = per_c.get(c) or per_c.get(str(c))
            cells.append(f"{r['throughput_rps']:.0f} req/s, p50 {r['p50_ms']:.1f} / p99 "
                         f"{r['p99_ms']:.1f} ms" if r and r["requests"] else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--only", nargs="+", choices=["onnxruntime", "triton", "fastapi-keras"],
                        default=["onnxruntime", "triton", "fastapi-keras"])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="medops-bench-") as tmp:
        workdir = Path(tmp)
        keras_path, onnx_path, source = prepare_models(workdir)
        size = 28
        rng = np.random.default_rng(0)
        image = rng.random((1, size, size, 1), dtype=np.float32)
        results: dict[str, dict] = {}
        if "onnxruntime" in args.only:
            results["onnxruntime (in-process)"] = bench_onnxruntime(onnx_path, image, args.concurrency, args.seconds)
            print("onnxruntime done", flush=True)
        if "triton" in args.only:
            for label, r in bench_triton(onnx_path, image, args.concurrency, args.seconds, workdir).items():
                results[f"{label} (gRPC)"] = r
            print("triton done", flush=True)
        if "fastapi-keras" in args.only:
            results["fastapi-keras (HTTP)"] = bench_fastapi(keras_path, image, args.concurrency,
                                                            args.seconds, workdir)
            print("fastapi done", flush=True)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
            "model": source, "seconds": args.seconds, "concurrency": args.concurrency,
            # other work on the machine skews every number: record how busy it was
            "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (args.out / "results.md").write_text(render_markdown(results, meta))
    print(render_markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
