"""Soak (issue 14, item 6): a live Triton under 32 concurrent clients for ``--minutes`` (default
10), mixing the tensor path, the DICOM path and malformed requests, with one rollout (deploy of v2)
and one rollback (to v1) inside the run.

What it starts: the embedded tritonserver (``medops.serving.server.start_server``, free ports, its
own state dir and repository under ``--work-dir``), then deploys v1 of a tiny ONNX classifier
through the gate (the helpers of tests/integration/test_triton_serving.py: probability =
sigmoid(w * mean(image) + b), so v1 and v2 answer differently). At ``--deploy-at`` of the run v2 is
deployed (``medops.serving.deploy.deploy``), at ``--rollback-at`` rolled back to v1
(``medops.serving.deploy.rollback``), both while the clients keep sending.

The clients (one asyncio loop, each client a closed loop: its next request when the last one is
answered), built on medops.serving.client (its request steps ``classify_images`` /
``classify_dicom`` taken by its ``AsyncTransport``, and ``apredict_files``), no retries:

- ``tensor-grpc`` / ``tensor-http``: 1 to 4 preprocessed images to the classifier;
- ``dicom-grpc`` / ``dicom-http``: 1 to 3 DICOM files' bytes to the ensemble ``<model>_dicom``;
- ``predict-ensemble`` / ``predict-tensor``: ``apredict_files`` over 3 files (the user's path:
  readiness check, thresholds, answers);
- ``malformed``: bad DICOM bytes (not DICOM, empty, truncated, the fuzzer's RLE panic file,
  seeded mutations from benchmarks/fuzz/mutate.py, a bad file between two good ones), tensors of a
  wrong shape, rank, dtype, name or batch size, a byte count that does not match the shape, an
  unknown model, and raw HTTP requests with a broken JSON header or a truncated binary body.

A valid request fails when it raises, times out, or any answer differs from the answering
version's known output on that image (onnxruntime in this process on the same preprocessed
pixels, |diff| <= 1e-5), carries another version's label, or comes from a version that was not
the served one for the whole time the request was in flight. A malformed request must get a clean
error: an error status from the server (not INTERNAL, not a timeout or a dropped connection, no
traceback), or for a bad file in the ensemble a per-file error that names a quarantine reason.

Every 10 s the resident memory (VmRSS, and its anonymous and shared-memory parts, from
/proc/PID/status) of tritonserver and each of its children (the Python backend stubs: one per
model instance) and the load average are sampled. Memory growth is judged after the warm-up
(``--warmup-minutes``, default the first minute): last sample over the first sample after warm-up
(for a stub started later, the first sample a warm-up after it started).

    .venv/bin/python benchmarks/soak/run.py                     # 10 minutes, 32 clients
    .venv/bin/python benchmarks/soak/run.py --minutes 2 --json /tmp/soak.json
    .venv/bin/python benchmarks/soak/run.py --json benchmarks/soak/results.json \\
        --markdown benchmarks/soak/results.md

Exits 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import json
import math
import os
import platform
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

GROWTH_LIMIT = 0.05
ATOL = 1e-5
V1 = {"w": 4.0, "b": -2.0}
V2 = {"w": -3.0, "b": 1.0}
THRESHOLDS = {"1": 0.5, "2": 0.4}  # v2 "chose" 0.4 at export: labels tell the versions apart too
SAMPLE_S = 10.0


def _load(name: str, path: Path) -> Any:
    """A module of benchmarks/ (no package) by file path."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


serving_bench = _load("medops_bench_serving", ROOT / "benchmarks" / "serving" / "run.py")
mutate = _load("medops_fuzz_mutate", ROOT / "benchmarks" / "fuzz" / "mutate.py")
free_port, summarize = serving_bench.free_port, serving_bench.summarize


# -- memory of tritonserver and its stubs, from /proc ----------------------------------------------

def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _status(pid: int) -> dict[str, int]:
    fields = {"VmRSS": "rss_kb", "RssAnon": "anon_kb", "RssShmem": "shmem_kb"}
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in fields:
                out[fields[key]] = int(line.split()[1])
    except OSError:
        pass
    return out


def _process_name(pid: int) -> str:
    """``tritonserver``, or a stub as ``<model>/<version> <instance>`` (from its command line)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in args if a]
    if args and args[0].endswith("triton_python_backend_stub") and len(args) > 2:
        model_py = Path(args[1])
        return f"stub {model_py.parent.parent.name}/{model_py.parent.name} {args[-2]}"
    return Path(args[0]).name if args else "?"


def sample_memory(root: int) -> list[dict[str, Any]]:
    """One sample: tritonserver and every descendant, each with its RSS figures."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        status = _status(pid)
        if status:
            out.append({"pid": pid, "name": _process_name(pid), **status})
        todo += _children(pid)
    return out


class MemorySampler:
    """Samples ``sample_memory(pid)`` and the load average every ``interval`` s in a thread (the
    event loop is busy with the clients)."""

    def __init__(self, pid: int, start: float, interval: float = SAMPLE_S) -> None:
        self.pid, self.start, self.interval = pid, start, interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            t = time.monotonic() - self.start
            self.samples.append({"t": round(t, 1), "loadavg": _loadavg(),
                                 "processes": sample_memory(self.pid)})
            if self._stop.wait(self.interval):
                return

    def stop(self) -> list[dict[str, Any]]:
        if self._stop.is_set():
            return self.samples
        self._stop.set()
        self._thread.join()
        self.samples.append({"t": round(time.monotonic() - self.start, 1), "loadavg": _loadavg(),
                             "processes": sample_memory(self.pid)})
        return self.samples


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def memory_growth(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Per process (by pid): first sample at least ``warmup_s`` after both the run's and the
    process's start, last sample, growth = last / first - 1; and the same for the total of all
    processes. A process seen in fewer than two samples after its warm-up is listed, not judged."""
    first_seen: dict[int, float] = {}
    series: dict[int, list[tuple[float, int]]] = collections.defaultdict(list)
    names: dict[int, str] = {}
    for s in samples:
        for p in s["processes"]:
            first_seen.setdefault(p["pid"], s["t"])
            names[p["pid"]] = p["name"]
            series[p["pid"]].append((s["t"], p["rss_kb"]))
    processes = []
    for pid, points in series.items():
        after = [(t, kb) for t, kb in points if t >= max(warmup_s, first_seen[pid] + warmup_s)]
        row = {"pid": pid, "name": names[pid], "first_t": points[0][0], "last_t": points[-1][0],
               "first_mb": round(points[0][1] / 1024, 1), "last_mb": round(points[-1][1] / 1024, 1),
               "peak_mb": round(max(kb for _, kb in points) / 1024, 1)}
        if len(after) >= 2:
            base = after[0][1]
            row |= {"base_t": after[0][0], "base_mb": round(base / 1024, 1),
                    "growth": round(after[-1][1] / base - 1, 4),
                    "peak_growth": round(max(kb for _, kb in after) / base - 1, 4)}
        processes.append(row)
    after = [s for s in samples if s["t"] >= warmup_s]
    total: dict[str, Any] = {}
    if len(after) >= 2:
        first, last = (sum(p["rss_kb"] for p in s["processes"]) for s in (after[0], after[-1]))
        peak = max(sum(p["rss_kb"] for p in s["processes"]) for s in after)
        models = [sorted(p["name"] for p in s["processes"]) for s in (after[0], after[-1])]
        # judged only when the same models run at both ends (a deploy's stubs come and go)
        total = {"base_t": after[0]["t"], "base_mb": round(first / 1024, 1),
                 "last_mb": round(last / 1024, 1), "growth": round(last / first - 1, 4),
                 "peak_growth": round(peak / first - 1, 4), "same_models": models[0] == models[1]}
    judged = [p for p in processes if "growth" in p]
    worst = max(judged, key=lambda p: p["growth"], default=None)
    return {"processes": sorted(processes, key=lambda p: (p["name"] != "tritonserver", p["first_t"], p["name"])),
            "total": total, "worst": worst,
            "passed": bool(judged) and all(p["growth"] <= GROWTH_LIMIT for p in judged)
            and not (total.get("same_models") and total["growth"] > GROWTH_LIMIT)}


# -- inputs and what the model must answer ---------------------------------------------------------

@dataclass
class Inputs:
    """The valid images and files, each with v1's and v2's known probability."""

    images: np.ndarray                    # (n, S, S, 1) float32: bundled test images + preprocessed files
    image_expected: dict[str, np.ndarray]  # version -> (n,)
    files: list[Path]
    file_bytes: list[bytes]
    file_expected: dict[str, np.ndarray]   # version -> (len(files),)


def known_outputs(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """The model's outputs on ``images``: onnxruntime in this process, one image at a time."""
    import onnxruntime as ort

    from medops.serving.contract import INPUT_NAME, OUTPUT_NAME

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.array([float(session.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + 1]})[0].reshape(-1)[0])
                     for i in range(len(images))])


def make_inputs(base: Path, onnx: dict[str, Path]) -> Inputs:
    from conftest import pydicom_file
    from medops.dicom.pixels import preprocess_file
    from test_triton_serving import BUNDLED, SPEC, write_bundled_dicom

    files = [write_bundled_dicom(base / f"cr{i}.dcm", index=i) for i in range(8)]
    files += [pydicom_file("CT_small.dcm"), pydicom_file("MR_small.dcm")]
    pixels = np.stack([preprocess_file(f, SPEC) for f in files])[..., np.newaxis].astype(np.float32)
    bundled = (np.load(BUNDLED)["test_images"][100:124].astype(np.float32) / 255.0)[..., np.newaxis]
    images = np.concatenate([bundled, pixels])
    return Inputs(
        images=images,
        image_expected={v: known_outputs(p, images) for v, p in onnx.items()},
        files=files, file_bytes=[f.read_bytes() for f in files],
        file_expected={v: known_outputs(p, pixels) for v, p in onnx.items()},
    )


# -- the record of every request -------------------------------------------------------------------

@dataclass
class Record:
    """Everything the clients saw, and when the served version changed (seconds since start)."""

    start: float
    valid: list[dict[str, Any]] = field(default_factory=list)      # one per valid request
    malformed: list[dict[str, Any]] = field(default_factory=list)  # one per malformed request
    events: dict[str, float] = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.start

    def served_during(self, t0: float, t1: float) -> set[str] | None:
        """The version(s) that may answer a request in flight from ``t0`` to ``t1``: one when the
        served version did not change meanwhile, None (either) when it may have."""
        e = self.events
        if "deploy_start" not in e or t1 < e["deploy_start"]:
            return {"1"}
        if "deploy_done" in e and t0 > e["deploy_done"] and (
                "rollback_start" not in e or t1 < e["rollback_start"]):
            return {"2"}
        if "rollback_done" in e and t0 > e["rollback_done"]:
            return {"1"}
        return None


def check_answers(rec: Record, t0: float, t1: float, version: str, probs: list[float],
                  expected: dict[str, np.ndarray], ids: list[int], labels: list[str] | None) -> str | None:
    """Why the answers are wrong, or None."""
    from medops.serving.client import label_for

    allowed = rec.served_during(t0, t1)
    if version not in expected or (allowed is not None and version not in allowed):
        return f"answered by version {version!r}, expected {sorted(allowed or expected)}"
    for k, (i, p) in enumerate(zip(ids, probs)):
        if not abs(p - expected[version][i]) <= ATOL:
            return f"item {i}: p={p:.6f}, version {version}'s known output is {expected[version][i]:.6f}"
        if labels is not None and labels[k] != label_for(p, THRESHOLDS[version]):
            return f"item {i}: label {labels[k]!r} for p={p:.4f} from v{version}"
    return None


# -- valid clients ---------------------------------------------------------------------------------

async def tensor_client(rec: Record, inp: Inputs, transport: Any, protocol: str, model: str,
                        path: str, rng: random.Random, stop_at: float, timeout: float) -> None:
    from medops.serving.client import classify_images

    while rec.now() < stop_at:
        ids = [rng.randrange(len(inp.images)) for _ in range(rng.randint(1, 4))]
        t0 = rec.now()
        try:
            probs, version = await transport.run(classify_images(
                inp.images[ids], protocol=protocol, model_name=model, timeout=timeout))
            error = check_answers(rec, t0, rec.now(), version, [float(p) for p in probs],
                                  inp.image_expected, ids, None)
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome
            version, error = None, f"{type(exc).__name__}: {_first_line(exc)}"
        rec.valid.append({"path": path, "t0": t0, "t1": rec.now(), "version": version, "error": error,
                          "client": id(rng)})


async def dicom_client(rec: Record, inp: Inputs, transport: Any, protocol: str, model: str,
                       path: str, rng: random.Random, stop_at: float, timeout: float) -> None:
    from medops.serving.client import classify_dicom

    while rec.now() < stop_at:
        ids = [rng.randrange(len(inp.files)) for _ in range(rng.randint(1, 3))]
        t0 = rec.now()
        try:
            probs, labels, errors, version = await transport.run(classify_dicom(
                [inp.file_bytes[i] for i in ids], protocol=protocol, model_name=model, timeout=timeout))
            error = next((f"file {inp.files[i].name}: {e}" for i, e in zip(ids, errors) if e), None)
            error = error or check_answers(rec, t0, rec.now(), version, probs, inp.file_expected,
                                           ids, labels)
        except Exception as exc:  # noqa: BLE001
            version, error = None, f"{type(exc).__name__}: {_first_line(exc)}"
        rec.valid.append({"path": path, "t0": t0, "t1": rec.now(), "version": version, "error": error,
                          "client": id(rng)})


async def predict_client(rec: Record, inp: Inputs, url: str, protocol: str, model: str, via: str,
                         path: str, rng: random.Random, stop_at: float, timeout: float) -> None:
    """``apredict_files`` as a user calls it (readiness, thresholds, one request per file)."""
    from medops.serving.client import apredict_files
    from test_triton_serving import SPEC

    while rec.now() < stop_at:
        ids = rng.sample(range(len(inp.files)), 3)
        t0 = rec.now()
        version, error = None, None
        try:
            preds = await apredict_files([inp.files[i] for i in ids], url=url, protocol=protocol,
                                         model_name=model, preprocessing=SPEC, via=via, retries=0,
                                         timeout=timeout, batch_size=1, concurrency=3)
            bad = [p for p in preds if p.error]
            versions = {p.model_version for p in preds}
            if bad:
                error = f"{bad[0].file}: {bad[0].error}"
            elif len(versions) > 1 and rec.served_during(t0, rec.now()) is not None:
                error = f"versions {sorted(versions)} while one version was served"
            else:
                for i, p in zip(ids, preds):
                    version = p.model_version
                    error = error or check_answers(rec, t0, rec.now(), version, [p.probability],
                                                   inp.file_expected, [i], [p.label])
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {_first_line(exc)}"
        rec.valid.append({"path": path, "t0": t0, "t1": rec.now(), "version": version, "error": error,
                          "client": id(rng)})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


# -- malformed requests ----------------------------------------------------------------------------

def _status_of(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    return str(status()) if callable(status) else type(exc).__name__


def judge_error(exc: BaseException) -> tuple[bool, str]:
    """``(clean, outcome)`` for a request the server refused: clean is an error answer from the
    server that is not INTERNAL / 500, no timeout, no dropped connection, no traceback."""
    from medops.serving.client import is_connection_error

    status, line = _status_of(exc), _first_line(exc)
    short = line.replace("[request id: <id_unknown>] ", "").replace(f"[{status}] ", "")
    outcome = f"{status.replace('StatusCode.', '')}: {short[:120]}"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or "DEADLINE_EXCEEDED" in status:
        return False, outcome
    if "Traceback" in str(exc) or status in ("StatusCode.INTERNAL", "500"):
        return False, outcome
    if is_connection_error(exc) and "unknown model" not in line and "not found" not in line:
        return False, outcome
    return True, outcome


def _reason_ok(error: str) -> bool:
    from medops.errors import QuarantineReason

    return error.split(":", 1)[0] in {r.value for r in QuarantineReason} and "Traceback" not in error


class Malformed:
    """The malformed cases, each an ``async (rng) -> (clean, outcome)``."""

    def __init__(self, inp: Inputs, grpc: Any, http: Any, http_url: str, model: str,
                 ensemble: str, fuzzed: list[bytes], timeout: float) -> None:
        from conftest import fuzz_file

        self.inp, self.grpc, self.http, self.http_url = inp, grpc, http, http_url
        self.model, self.ensemble, self.fuzzed, self.timeout = model, ensemble, fuzzed, timeout
        ct = inp.file_bytes[-2]
        self.bad_files = {
            "dicom_not_dicom": b"this is not a DICOM file\n" * 20,
            "dicom_empty": b"",
            "dicom_truncated_half": ct[:len(ct) // 2],
            "dicom_truncated_header": ct[:200],
            "dicom_preamble_only": b"\0" * 128 + b"DICM",
            "dicom_rle_panic": fuzz_file("rle_panic.dcm").read_bytes(),
        }
        self.cases: dict[str, Callable[[random.Random], Awaitable[tuple[bool, str]]]] = {
            **{name: self._bad_file(name) for name in self.bad_files},
            "dicom_fuzzed": self._fuzzed, "dicom_bad_between_good": self._mixed,
            "dicom_wrong_dtype": self._dicom_wrong_dtype,
            "tensor_wrong_shape": self._tensor(np.zeros((1, 27, 27, 1), np.float32)),
            "tensor_wrong_rank": self._tensor(np.zeros((1, 28, 28), np.float32)),
            "tensor_wrong_dtype": self._tensor(np.zeros((1, 28, 28, 1), np.float64), dtype="FP64"),
            "tensor_int_dtype": self._tensor(np.zeros((1, 28, 28, 1), np.int32), dtype="INT32"),
            "tensor_wrong_name": self._tensor(np.zeros((1, 28, 28, 1), np.float32), name="pixels"),
            "tensor_batch_over_max": self._tensor(np.zeros((65, 28, 28, 1), np.float32)),
            "tensor_bytes_short": self._tensor(np.zeros((1, 28, 28, 1), np.float32), cut=100),
            "unknown_model": self._tensor(np.zeros((1, 28, 28, 1), np.float32), model="no_such_model"),
            "http_broken_json": self._raw_http(b'{"inputs": [{"name": "image", "shape": [1, 28',
                                               {"Content-Type": "application/json"}),
            "http_truncated_binary": self._raw_http(*self._truncated_binary()),
        }

    async def _dicom(self, items: list[bytes], protocol: str) -> tuple[list[float], list[str], list[str], str]:
        from medops.serving.client import AsyncTransport, classify_dicom

        client = self.grpc if protocol == "grpc" else self.http
        return await AsyncTransport(client).run(classify_dicom(
            items, protocol=protocol, model_name=self.ensemble, timeout=self.timeout))

    def _bad_file(self, name: str) -> Callable[[random.Random], Awaitable[tuple[bool, str]]]:
        async def case(rng: random.Random) -> tuple[bool, str]:
            protocol = rng.choice(["grpc", "http"])
            try:
                probs, _, [error], _ = await self._dicom([self.bad_files[name]], protocol)
            except Exception as exc:  # noqa: BLE001
                return judge_error(exc)
            if not error:
                return False, f"answered p={probs[0]:.4f} for a file that is not usable"
            return _reason_ok(error), error.split(":", 1)[0]
        return case

    async def _fuzzed(self, rng: random.Random) -> tuple[bool, str]:
        try:
            probs, _, [error], _ = await self._dicom([rng.choice(self.fuzzed)], rng.choice(["grpc", "http"]))
        except Exception as exc:  # noqa: BLE001
            return judge_error(exc)
        if not error:  # a mutation the decoder tolerates: an answer is fine if it is a probability
            return 0.0 <= probs[0] <= 1.0, "answered"
        return _reason_ok(error), error.split(":", 1)[0]

    async def _mixed(self, rng: random.Random) -> tuple[bool, str]:
        good = rng.sample(range(len(self.inp.files)), 2)
        bad = rng.choice(list(self.bad_files.values()) + self.fuzzed[:20])
        try:
            probs, _, errors, version = await self._dicom(
                [self.inp.file_bytes[good[0]], bad, self.inp.file_bytes[good[1]]], "grpc")
        except Exception as exc:  # noqa: BLE001
            return judge_error(exc)
        exp = self.inp.file_expected.get(version)
        ok = (exp is not None and not errors[0] and not errors[2]
              and abs(probs[0] - exp[good[0]]) <= ATOL and abs(probs[2] - exp[good[1]]) <= ATOL)
        return ok, "good files answered, bad one " + (errors[1].split(":", 1)[0] or "answered")

    async def _dicom_wrong_dtype(self, rng: random.Random) -> tuple[bool, str]:
        import tritonclient.grpc.aio as aio

        from medops.serving.contract import DICOM_INPUT, ERROR_OUTPUT

        inp = aio.InferInput(DICOM_INPUT, [1, 1], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 1), np.float32))
        try:
            await self.grpc.infer(self.ensemble, [inp], outputs=[aio.InferRequestedOutput(ERROR_OUTPUT)],
                                  client_timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001
            return judge_error(exc)
        return False, "answered a FP32 tensor sent as a DICOM file"

    def _tensor(self, array: np.ndarray, *, dtype: str = "FP32", name: str | None = None,
                model: str | None = None, cut: int | None = None
                ) -> Callable[[random.Random], Awaitable[tuple[bool, str]]]:
        async def case(rng: random.Random) -> tuple[bool, str]:
            import tritonclient.grpc as tg
            import tritonclient.http as th

            from medops.serving.contract import INPUT_NAME, OUTPUT_NAME

            protocol = rng.choice(["grpc", "http"])
            tc, client = (tg, self.grpc) if protocol == "grpc" else (th, self.http)
            inp = tc.InferInput(name or INPUT_NAME, list(array.shape), dtype)
            if protocol == "http":
                inp.set_data_from_numpy(array, binary_data=True)
            else:
                inp.set_data_from_numpy(array)
            if cut is not None:  # declared shape kept, fewer bytes sent
                if protocol == "http":
                    inp._raw_data = inp._raw_data[:cut]
                else:
                    inp._raw_content = inp._raw_content[:cut]
            kwargs = {"client_timeout": self.timeout} if protocol == "grpc" else {"timeout": int(self.timeout * 1e6)}
            try:
                await client.infer(model or self.model, [inp], outputs=[tc.InferRequestedOutput(OUTPUT_NAME)],
                                   **kwargs)
            except Exception as exc:  # noqa: BLE001
                return judge_error(exc)
            return False, "answered"
        return case

    def _truncated_binary(self) -> tuple[bytes, dict[str, str]]:
        header = json.dumps({"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 28 * 28 * 4}}],
                             "outputs": [{"name": "probability"}]}).encode()
        body = header + np.zeros(28 * 28, np.float32).tobytes()[:1000]
        return body, {"Inference-Header-Content-Length": str(len(header)),
                      "Content-Type": "application/octet-stream"}

    def _raw_http(self, body: bytes, headers: dict[str, str]
                  ) -> Callable[[random.Random], Awaitable[tuple[bool, str]]]:
        async def case(rng: random.Random) -> tuple[bool, str]:
            import aiohttp

            url = f"http://{self.http_url}/v2/models/{self.model}/infer"
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as s:
                    async with s.post(url, data=body, headers=headers) as r:
                        text = (await r.text())[:160]
                        status = r.status
            except Exception as exc:  # noqa: BLE001
                return False, f"{type(exc).__name__}: {_first_line(exc)}"
            if "Traceback" in text:
                return False, f"HTTP {status}: {text}"
            if status == 500 and text.startswith('{"error":"failed to parse the request JSON buffer'):
                # Triton's HTTP front end reports a JSON parse error as INTERNAL, so 500 (upstream:
                # triton-inference-server/server#8762); the message names the problem: clean
                return True, f"HTTP 500 (Triton's code for unparsable JSON): {text}"
            return 400 <= status < 500, f"HTTP {status}: {text}"
        return case


async def malformed_client(rec: Record, bad: Malformed, rng: random.Random, stop_at: float) -> None:
    names = sorted(bad.cases)
    while rec.now() < stop_at:
        name = rng.choice(names)
        t0 = rec.now()
        try:
            clean, outcome = await bad.cases[name](rng)
        except Exception as exc:  # noqa: BLE001 - a bug in the case itself: reported, not hidden
            clean, outcome = False, f"case raised {type(exc).__name__}: {_first_line(exc)}"
        rec.malformed.append({"case": name, "t0": t0, "t1": rec.now(), "clean": clean, "outcome": outcome})


# -- rollout and rollback --------------------------------------------------------------------------

async def changes(rec: Record, server: dict[str, Any], deploy_at: float, rollback_at: float) -> None:
    """Deploy v2 at ``deploy_at`` s, roll back to v1 at ``rollback_at`` s (in threads: both block)."""
    from medops.serving.deploy import rollback
    from test_triton_serving import SPEC

    await asyncio.sleep(max(0.0, deploy_at - rec.now()))
    rec.events["deploy_start"] = rec.now()
    result = await asyncio.to_thread(deploy_version, server, "v2", V2, THRESHOLDS["2"])
    rec.events["deploy_done"] = rec.now()
    server["deploy"] = result.model_dump(mode="json")
    await asyncio.sleep(max(0.0, rollback_at - rec.now()))
    rec.events["rollback_start"] = rec.now()
    back = await asyncio.to_thread(
        rollback, server["cfg"], repository=server["repo"], url=server["info"].grpc_url,
        protocol="grpc", preprocessing=SPEC, to_version=1, timeout=120)
    rec.events["rollback_done"] = rec.now()
    server["rollback"] = back.model_dump(mode="json")


def deploy_version(server: dict[str, Any], tag: str, coef: dict[str, float], threshold: float) -> Any:
    from medops.serving.deploy import deploy
    from test_triton_serving import SPEC, write_export_result, write_gate, write_golden

    onnx_path = server["onnx"][tag]
    write_golden(onnx_path, **coef)
    return deploy(server["cfg"], onnx=onnx_path, gate=write_gate(server["base"] / f"gate-{tag}.json", passed=True),
                  export_result=write_export_result(onnx_path, decision_threshold=threshold),
                  repository=server["repo"], url=server["info"].grpc_url, protocol="grpc",
                  preprocessing=SPEC, timeout=120)


# -- the run ---------------------------------------------------------------------------------------

MIX = {"tensor-grpc": 6, "tensor-http": 6, "dicom-grpc": 6, "dicom-http": 6,
       "predict-ensemble": 2, "predict-tensor": 2, "malformed": 4}


async def drive(server: dict[str, Any], inp: Inputs, fuzzed: list[bytes], *, seconds: float,
                deploy_at: float, rollback_at: float, timeout: float, seed: int,
                mix: dict[str, int]) -> Record:
    from medops.serving.client import AsyncTransport
    from medops.serving.contract import ensemble_name

    cfg, info = server["cfg"], server["info"]
    model, ensemble = cfg.model_name, ensemble_name(cfg.model_name)
    grpc = AsyncTransport.open(info.grpc_url, "grpc", timeout)
    http = AsyncTransport.open(info.http_url, "http", timeout)
    rec = Record(start=time.monotonic())
    server["sampler"] = MemorySampler(info.pid, rec.start)
    bad = Malformed(inp, grpc.client, http.client, info.http_url, model, ensemble, fuzzed, timeout)
    rngs = iter(random.Random(f"soak:{seed}:{i}") for i in range(10_000))
    tasks = [changes(rec, server, deploy_at, rollback_at)]
    for kind, n in mix.items():
        for _ in range(n):
            rng = next(rngs)
            if kind.startswith(("tensor", "dicom")):
                path, protocol = kind.split("-")
                fn = tensor_client if path == "tensor" else dicom_client
                transport = grpc if protocol == "grpc" else http
                tasks.append(fn(rec, inp, transport, protocol, model if path == "tensor" else ensemble,
                                kind, rng, seconds, timeout))
            elif kind.startswith("predict"):
                via = kind.split("-")[1]
                tasks.append(predict_client(rec, inp, info.http_url if via == "ensemble" else info.grpc_url,
                                            "http" if via == "ensemble" else "grpc", model, via, kind,
                                            rng, seconds, timeout))
            else:
                tasks.append(malformed_client(rec, bad, rng, seconds))
    try:
        await asyncio.gather(*tasks)
    finally:
        await grpc.close()
        await http.close()
    return rec


def start(base: Path) -> dict[str, Any]:
    from medops.config import ServingConfig
    from medops.serving.server import start_server
    from test_triton_serving import write_tiny_onnx

    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=180)
    state, repo = base / "state", base / "repository"
    onnx = {tag: write_tiny_onnx(base / f"export-{tag}" / "model.onnx", **coef)
            for tag, coef in (("v1", V1), ("v2", V2))}
    info = start_server(cfg, repository=repo, state_dir=state, admin_key=None)
    return {"cfg": cfg, "info": info, "state": state, "repo": repo, "base": base, "onnx": onnx}


def fuzzed_files(seed: int, count: int) -> list[bytes]:
    """Seeded mutations (benchmarks/fuzz/mutate.py), the cheap kinds only: bombs are item 5's."""
    seeds = mutate.corpus()
    kinds = ("bitflip", "bytes", "truncate", "length", "vr", "value", "pixels")
    return [mutate.fuzz_one(seed, i, seeds, only=kinds[i % len(kinds)]).data for i in range(count)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from medops.procs import pid_alive
    from medops.serving.server import stop_server

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="medops-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60
    began = time.monotonic()
    load_before = _loadavg()
    server = start(work)
    print(f"tritonserver pid {server['info'].pid} ready in {time.monotonic() - began:.0f} s "
          f"(grpc {server['info'].grpc_url}, http {server['info'].http_url})", flush=True)
    try:
        deploy_version(server, "v1", V1, THRESHOLDS["1"])
        inp = make_inputs(work, {"1": server["onnx"]["v1"], "2": server["onnx"]["v2"]})
        fuzzed = fuzzed_files(args.seed, 60)
        print(f"v1 deployed; {len(inp.images)} images, {len(inp.files)} files, {len(fuzzed)} fuzzed "
              f"files; soak of {args.minutes} min starts", flush=True)
        rec = asyncio.run(drive(server, inp, fuzzed, seconds=seconds, deploy_at=args.deploy_at * seconds,
                                rollback_at=args.rollback_at * seconds, timeout=args.timeout,
                                seed=args.seed, mix=MIX))
        samples = server["sampler"].stop()
        after = after_checks(server, inp)
        alive = pid_alive(server["info"].pid)
        log = Path(server["info"].log_file).read_text(errors="replace") if server["info"].log_file else ""
    finally:
        if "sampler" in server:
            server["sampler"].stop()
        stop_server(server["state"])
    return report(rec, samples, server, after, alive=alive, log=log, args=args,
                  load=(load_before, _loadavg()), setup_s=time.monotonic() - began - seconds)


def after_checks(server: dict[str, Any], inp: Inputs) -> dict[str, Any]:
    """After the run: v1 is served again and answers both paths with its known outputs."""
    import tritonclient.grpc as grpcclient

    from medops.serving.client import infer_dicom, infer_images
    from medops.serving.contract import ensemble_name
    from medops.serving.repository import served_version

    client = grpcclient.InferenceServerClient(server["info"].grpc_url)
    try:
        probs, version = infer_images(client, inp.images[:4], protocol="grpc",
                                      model_name=server["cfg"].model_name)
        dprobs, _, errors, dversion = infer_dicom(client, inp.file_bytes[:3], protocol="grpc",
                                                  model_name=ensemble_name(server["cfg"].model_name))
    finally:
        client.close()
    ok = (version == dversion == "1" and not any(errors)
          and np.allclose(probs, inp.image_expected["1"][:4], atol=ATOL)
          and np.allclose(dprobs, inp.file_expected["1"][:3], atol=ATOL))
    return {"served_version": served_version(server["repo"], server["cfg"].model_name),
            "answers_v1_correctly": bool(ok)}


# -- the report ------------------------------------------------------------------------------------

def per_minute(rows: list[dict[str, Any]], key: str, minutes: float) -> dict[str, list[dict[str, Any]]]:
    """``{path: [{minute, requests, p50_ms, p99_ms, ...}, ...]}`` by the minute a request started."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted({r[key] for r in rows}):
        mins = []
        for m in range(math.ceil(minutes)):
            lat = [r["t1"] - r["t0"] for r in rows if r[key] == path and m * 60 <= r["t0"] < (m + 1) * 60]
            stats = summarize(lat, 60.0)
            mins.append({"minute": m + 1, "requests": stats["requests"],
                         "rps": round(stats["throughput_rps"], 2),
                         **{k: round(stats[k], 1) for k in ("p50_ms", "p99_ms") if k in stats}})
        out[path] = mins
    return out


def version_order(rec: Record) -> dict[str, Any]:
    """Each valid client's answering versions in order must read 1..1 2..2 1..1 (no going back
    and forth): the number of changes per client."""
    seq: dict[int, list[str]] = collections.defaultdict(list)
    for r in sorted(rec.valid, key=lambda r: r["t0"]):
        if r["version"] and (not seq[r["client"]] or seq[r["client"]][-1] != r["version"]):
            seq[r["client"]].append(r["version"])
    bad = [s for s in seq.values() if s not in (["1"], ["1", "2"], ["1", "2", "1"])]
    return {"clients": len(seq), "sequences_not_1_2_1": bad[:5], "n_bad": len(bad)}


def report(rec: Record, samples: list[dict[str, Any]], server: dict[str, Any], after: dict[str, Any], *,
           alive: bool, log: str, args: argparse.Namespace, load: tuple[list[float], list[float]],
           setup_s: float) -> dict[str, Any]:
    failed = [r for r in rec.valid if r["error"]]
    unclean = [r for r in rec.malformed if not r["clean"]]
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rec.malformed:
        outcomes[r["case"]][("clean: " if r["clean"] else "UNCLEAN: ") + r["outcome"][:90]] += 1
    growth = memory_growth(samples, args.warmup_minutes * 60)
    order = version_order(rec)
    loads = [s["loadavg"] for s in samples]
    checks = {
        "no_failed_valid_request": not failed,
        "every_malformed_request_clean": not unclean,
        "memory_growth_after_warmup_le_5pct": growth["passed"],
        "server_alive_all_along": alive and all(any(p["name"] == "tritonserver" for p in s["processes"])
                                                for s in samples),
        "rollout_and_rollback_done": {"deploy_done", "rollback_done"} <= set(rec.events),
        "versions_in_order_1_2_1": order["n_bad"] == 0,
        "v1_served_and_correct_after": after["served_version"] == 1 and after["answers_v1_correctly"],
        "no_traceback_in_triton_log": "Traceback (most recent call last)" not in log,
    }
    by_path = collections.Counter(r["path"] for r in rec.valid)
    versions = collections.Counter((r["path"], r["version"]) for r in rec.valid if not r["error"])
    return {
        "command": "benchmarks/soak/run.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load[0], "loadavg_after": load[1],
                    "loadavg_1min_during": {"min": min(l[0] for l in loads), "max": max(l[0] for l in loads),
                                            "mean": round(sum(l[0] for l in loads) / len(loads), 2)}},
        "minutes": args.minutes, "clients": sum(MIX.values()), "mix": MIX, "setup_s": round(setup_s, 1),
        "events_s": {k: round(v, 1) for k, v in rec.events.items()},
        "deploy": server.get("deploy"), "rollback": server.get("rollback"),
        "passed": all(checks.values()), "checks": checks,
        "valid": {"requests": len(rec.valid), "failed": len(failed), "by_path": dict(by_path),
                  "answered_by_version": {f"{p} v{v}": n for (p, v), n in sorted(versions.items())},
                  "failed_examples": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                                       if k != "client"} for r in failed[:10]],
                  "version_order": order},
        "malformed": {"requests": len(rec.malformed), "unclean": len(unclean),
                      "by_case": {c: dict(o) for c, o in sorted(outcomes.items())}},
        "latency_per_minute": per_minute(rec.valid, "path", args.minutes),
        "malformed_latency_per_minute": per_minute(
            [r | {"all": "malformed"} for r in rec.malformed], "all", args.minutes),
        "memory": growth, "after": after,
        "triton_log": {"tracebacks": log.count("Traceback (most recent call last)"),
                       "stub_unhealthy": log.lower().count("stub process is unhealthy")},
        "memory_samples": [{"t": s["t"], "loadavg": s["loadavg"],
                            "rss_mb": {f"{p['name']} [{p['pid']}]": round(p["rss_kb"] / 1024, 1)
                                       for p in s["processes"]}} for s in samples],
    }


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"# Soak: {res['minutes']} min, {res['clients']} clients — {'PASS' if res['passed'] else 'FAIL'}",
        "",
        f"`{res['command']}` on {res['date']}; {m['cpus']} CPUs shared with other work: load average "
        f"{m['loadavg_before'][0]} before, {m['loadavg_1min_during']['min']}–{m['loadavg_1min_during']['max']} "
        f"during (mean {m['loadavg_1min_during']['mean']}), {m['loadavg_after'][0]} after.",
        "",
        f"Events (s from start): {res['events_s']}.",
        "",
        "## Checks", "", *(f"- {'PASS' if v else 'FAIL'} {k}" for k, v in res["checks"].items()), "",
        "## Valid requests", "",
        f"{res['valid']['requests']} requests, **{res['valid']['failed']} failed**. Answered by version: "
        + ", ".join(f"{k}: {v}" for k, v in res["valid"]["answered_by_version"].items()) + ".", "",
    ]
    for ex in res["valid"]["failed_examples"]:
        lines.append(f"- failed: {ex}")
    paths = list(res["latency_per_minute"]) + ["malformed"]
    table = {**res["latency_per_minute"], **res["malformed_latency_per_minute"]}
    minutes = _per_minute_samples(res["memory_samples"], len(table[paths[0]]))
    lines += ["", "## Latency per minute (ms, p50 / p99; requests started in that minute)", "",
              "The load average is the machine's (other work included), sampled every 10 s, at "
              "the minute's end.", "",
              "| minute | load | " + " | ".join(paths) + " |", "|---|---|" + "---|" * len(paths)]
    for i in range(len(table[paths[0]])):
        cells = []
        for p in paths:
            row = table[p][i]
            cells.append(f"{row.get('p50_ms', '-')} / {row.get('p99_ms', '-')}; {row['requests']}")
        lines.append(f"| {i + 1} | {minutes[i]['loadavg'][0]} | " + " | ".join(cells) + " |")
    lines += ["", "## Resident memory at each minute's end (MB)", "",
              "| minute | tritonserver | stubs (sum) | stubs (count) | all |", "|---|---|---|---|---|"]
    for i, s in enumerate(minutes):
        server = sum(v for k, v in s["rss_mb"].items() if k.startswith("tritonserver"))
        stubs = [v for k, v in s["rss_mb"].items() if k.startswith("stub")]
        lines.append(f"| {i + 1} ({s['t']} s) | {server} | {round(sum(stubs), 1)} | {len(stubs)} | "
                     f"{round(server + sum(stubs), 1)} |")
    g = res["memory"]
    lines += ["", "## Resident memory (VmRSS)", "",
              f"Total of tritonserver and its stubs: {g['total'].get('base_mb')} MB at "
              f"{g['total'].get('base_t')} s (after warm-up) -> {g['total'].get('last_mb')} MB at the end: "
              f"growth {100 * g['total'].get('growth', 0):+.1f} % (peak {100 * g['total'].get('peak_growth', 0):+.1f} %).",
              "", "| process | pid | seen (s) | first MB | after warm-up MB | last MB | growth | peak growth |",
              "|---|---|---|---|---|---|---|---|"]
    for p in g["processes"]:
        gr = f"{100 * p['growth']:+.1f} %" if "growth" in p else "(not judged)"
        pk = f"{100 * p['peak_growth']:+.1f} %" if "peak_growth" in p else ""
        lines.append(f"| {p['name']} | {p['pid']} | {p['first_t']}–{p['last_t']} | {p['first_mb']} | "
                     f"{p.get('base_mb', '')} | {p['last_mb']} | {gr} | {pk} |")
    lines += ["", f"## Malformed requests: {res['malformed']['requests']}, "
              f"{res['malformed']['unclean']} unclean", "", "| case | outcome | n |", "|---|---|---|"]
    for case, outs in res["malformed"]["by_case"].items():
        for o, n in sorted(outs.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {case} | {o.replace('|', '/')} | {n} |")
    lines += ["", f"Triton log: {res['triton_log']}. After the run: {res['after']}.", ""]
    return "\n".join(lines)


def _per_minute_samples(samples: list[dict[str, Any]], minutes: int) -> list[dict[str, Any]]:
    """The last sample taken in each minute (the one closest to its end)."""
    out = []
    for m in range(minutes):
        inside = [s for s in samples if s["t"] <= (m + 1) * 60 + 1]
        out.append(inside[-1] if inside else samples[0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup-minutes", type=float, default=1.0)
    ap.add_argument("--deploy-at", type=float, default=0.35, help="fraction of the run")
    ap.add_argument("--rollback-at", type=float, default=0.65, help="fraction of the run")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--render", type=Path, help="only print (and --markdown) the report of a "
                    "results.json written before")
    args = ap.parse_args(argv)
    res = json.loads(args.render.read_text()) if args.render else run(args)
    text = markdown(res)
    print(text)
    if args.json and not args.render:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
