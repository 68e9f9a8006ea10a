"""DICOM fuzzing (issue 14, item 5): seeded mutations of pydicom's test files through
``medops ingest`` and through the DICOM ensemble on a live Triton.

1. Makes ``--files`` files with :mod:`mutate` (file ``i`` of ``--seed`` is always the same bytes),
   cached under ``--work-dir``.
2. Runs ``medops ingest`` (the CLI, in a fresh process, ``--full``) over them with
   ``ingest.file_timeout_s = --file-timeout``, sampling the memory of its process tree; checks:
   exit 0, no Python traceback in its output, every file used or quarantined with a reason.
3. Starts the embedded tritonserver (free ports), deploys a tiny ONNX classifier through the gate
   (the helpers of tests/integration/test_triton_serving.py), and sends every file to the DICOM
   ensemble, ``--batch`` files per request, each request with a ``--request-timeout``. Checks: no
   request fails (one bad file must not fail its batch), every file answered or given an error
   with a reason, and, every ``--probe-every`` requests, that a good file is answered with the
   probability worked out from its pixels and the server process is alive. A failed request is
   sent again file by file to name the culprit.

Prints a summary and writes every figure to ``--json``; exits 1 when a check fails.

Usage (from the repository root)::

    .venv/bin/python benchmarks/fuzz/run.py                       # 10,000 files, seed 0
    .venv/bin/python benchmarks/fuzz/run.py --files 300 --work-dir /tmp/fz   # a smoke run
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

import mutate  # noqa: E402

GENERATOR_VERSION = 1  # bump when mutate.py changes what a (seed, index) makes: invalidates the cache
KEY = "fuzz-key-not-a-secret-0123456789"


# -- memory of a process tree, from /proc -------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples a process and its descendants every ``interval`` s: the largest peak RSS (VmHWM)
    of any descendant ("worker peak") and of the root."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.root_kb = self.worker_kb = 0
        self.processes: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.root_kb = max(self.root_kb, _status_kb(self.pid, "VmHWM"))
            todo = _children(self.pid)
            while todo:
                pid = todo.pop()
                self.processes.add(pid)
                self.worker_kb = max(self.worker_kb, _status_kb(pid, "VmHWM"))
                todo += _children(pid)
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"root_peak_mb": round(self.root_kb / 1024, 1),
                "worker_peak_mb": round(self.worker_kb / 1024, 1),
                "processes_seen": len(self.processes)}


# -- 1. the files ---------------------------------------------------------------------------------

def make_files(seed: int, count: int, work: Path) -> tuple[Path, list[mutate.Fuzzed]]:
    src = work / f"files-seed{seed}-n{count}-v{GENERATOR_VERSION}"
    marker = src.with_name(src.name + ".complete.json")  # beside it: ingest would list it
    if marker.is_file():
        made = [mutate.Fuzzed(**row, data=b"") for row in json.loads(marker.read_text())]
        return src, made
    started = time.monotonic()
    made = mutate.generate(seed, count, src)
    marker.write_text(json.dumps([{"index": f.index, "source": f.source, "mutations": f.mutations}
                                  for f in made]))
    print(f"generated {count} files in {time.monotonic() - started:.0f} s "
          f"({sum(p.stat().st_size for p in src.glob('*.dcm')) / 1e6:.0f} MB)", flush=True)
    return src, made


# -- 2. medops ingest -----------------------------------------------------------------------------

def run_ingest(src: Path, work: Path, *, workers: int, file_timeout: float, limit_s: float) -> dict:
    project = work / "project"
    project.mkdir(parents=True, exist_ok=True)
    params = (ROOT / "params.yaml").read_text()
    params = re.sub(r"(?m)^  file_timeout_s: .*$", f"  file_timeout_s: {file_timeout}", params)
    (project / "params.yaml").write_text(params)
    out = work / "ingest-out"
    log = work / "ingest.log"
    env = {**os.environ, "MEDOPS_DEID_KEY": KEY, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "medops", "--project", str(project), "ingest", str(src),
           "--out", str(out), "--workers", str(workers), "--quiet", "--full"]
    started = time.monotonic()
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=project, env=env)
        memory = TreeMemory(proc.pid)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "hung"
        mem = memory.stop()
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    reasons: collections.Counter = collections.Counter()
    details: dict[str, str] = {}
    quarantined = 0
    if (out / "quarantine.csv").is_file():
        with (out / "quarantine.csv").open() as fh:
            for row in csv.DictReader(fh):
                quarantined += 1
                reasons[row["reason"]] += 1
                details.setdefault(row["reason"], f"{row['path']}: {row['detail'][:160]}")
    summary = re.search(r"(\d+) files?.*", text)
    used = 0
    if (out / "metadata.parquet").is_file():
        import pyarrow.parquet as pq

        used = pq.ParquetFile(out / "metadata.parquet").metadata.num_rows
    return {"rc": rc, "seconds": round(seconds, 1), "used": used, "quarantined": quarantined,
            "reasons": dict(sorted(reasons.items())), "example_detail": details,
            "tracebacks": text.count("Traceback (most recent call last)"),
            "rust_panic_messages": text.count("panicked at"),
            "summary": summary.group(0) if summary else "", **mem, "log": str(log)}


# -- 3. the DICOM ensemble on a live Triton -------------------------------------------------------

def _reason(error: str) -> str:
    return error.split(":", 1)[0] if error else "answered"


def run_triton(src: Path, work: Path, *, batch: int, request_timeout: float, probe_every: int,
               files: list[Path]) -> dict:
    import socket

    import numpy as np
    import tritonclient.grpc as grpcclient

    from medops.serving.client import infer_dicom
    from medops.config import PreprocessSpec, ServingConfig
    from medops.procs import pid_alive
    from medops.serving.contract import ensemble_name
    from medops.serving.deploy import deploy
    from medops.serving.server import start_server, stop_server
    from test_triton_serving import (expected_probability, write_bundled_dicom, write_export_result,
                                     write_gate, write_golden, write_tiny_onnx)

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    base = work / "triton"
    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=120)
    state, repo = base / "state", base / "repository"
    coef = {"w": 4.0, "b": -2.0}
    info = start_server(cfg, repository=repo, state_dir=state)
    memory = TreeMemory(info.pid, interval=0.5)
    out: dict = {}
    try:
        onnx_path = write_tiny_onnx(base / "export" / "model.onnx", **coef)
        write_golden(onnx_path, **coef)
        deploy(cfg, onnx=onnx_path, gate=write_gate(base / "gate.json", passed=True),
               export_result=write_export_result(onnx_path), repository=repo,
               url=info.grpc_url, protocol="grpc", preprocessing=PreprocessSpec(image_size=28))
        good = write_bundled_dicom(base / "good.dcm", index=3)
        good_bytes, good_p = good.read_bytes(), expected_probability(good, **coef)
        target = ensemble_name(cfg.model_name)
        client = grpcclient.InferenceServerClient(info.grpc_url)
        outcomes: collections.Counter = collections.Counter()
        examples: dict[str, str] = {}
        failed_requests: list[dict] = []
        probes = probe_failures = 0
        slowest = (0.0, "")
        started = time.monotonic()

        def send(names: list[Path]) -> list[str] | None:
            nonlocal slowest
            t = time.monotonic()
            try:
                _, _, errors, _ = infer_dicom(client, [p.read_bytes() for p in names],
                                              protocol="grpc", model_name=target,
                                              timeout=request_timeout)
            except Exception as exc:  # noqa: BLE001 - what the check is about
                failed_requests.append({"files": [p.name for p in names],
                                        "error": str(exc).splitlines()[0][:300]})
                return None
            finally:
                took = time.monotonic() - t
                if took > slowest[0]:
                    slowest = (took, ",".join(p.name for p in names))
            return errors

        for n, start in enumerate(range(0, len(files), batch)):
            names = files[start:start + batch]
            errors = send(names)
            if errors is None:  # the whole request failed: which file was it?
                errors = []
                for p in names:
                    one = send([p])
                    errors.append("request_failed" if one is None else one[0])
            for p, error in zip(names, errors):
                outcomes[_reason(error)] += 1
                examples.setdefault(_reason(error), f"{p.name}: {error[:160]}")
            if n % probe_every == 0:
                probes += 1
                try:
                    [prob], _, [err], _ = infer_dicom(client, [good_bytes], protocol="grpc",
                                                      model_name=target, timeout=request_timeout)
                    ok = not err and abs(prob - good_p) < 1e-5 and pid_alive(info.pid)
                except Exception:  # noqa: BLE001
                    ok = False
                probe_failures += not ok
            if n % 200 == 0:
                print(f"  triton: {start + len(names)}/{len(files)} files, "
                      f"{time.monotonic() - started:.0f} s", flush=True)
        client.close()
        log = Path(info.log_file).read_text(errors="replace") if info.log_file else ""
        out = {"seconds": round(time.monotonic() - started, 1), "requests_failed": len(failed_requests),
               "failed_examples": failed_requests[:5], "outcomes": dict(sorted(outcomes.items())),
               "example_error": examples, "probes": probes, "probe_failures": probe_failures,
               "server_alive": pid_alive(info.pid), "slowest_request_s": round(slowest[0], 2),
               "slowest_request_files": slowest[1][:200],
               "log_tracebacks": log.count("Traceback (most recent call last)"),
               "log_stub_restarts": log.lower().count("stub process is unhealthy")}
    finally:
        out.update(memory.stop())
        stop_server(state)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--work-dir", type=Path, default=ROOT / ".medops" / "bench" / "fuzz")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--file-timeout", type=float, default=30.0, help="ingest.file_timeout_s")
    ap.add_argument("--batch", type=int, default=8, help="files per request to the ensemble")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--probe-every", type=int, default=25, help="requests between good-file probes")
    ap.add_argument("--sections", nargs="+", default=["ingest", "triton"], choices=["ingest", "triton"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src, made = make_files(args.seed, args.files, work)
    kinds = collections.Counter(m for f in made for m in f.mutations)
    result: dict = {"seed": args.seed, "files": len(made), "mutations": dict(sorted(kinds.items())),
                    "bytes": sum(p.stat().st_size for p in src.glob("*.dcm")),
                    "seed_files": len(mutate.corpus()), "cpus": os.cpu_count(),
                    "loadavg_start": os.getloadavg()}
    failed: list[str] = []
    if "ingest" in args.sections:
        limit = max(600.0, 0.5 * args.files)
        ing = run_ingest(src, work, workers=args.workers, file_timeout=args.file_timeout,
                         limit_s=limit)
        result["ingest"] = ing
        print(json.dumps({"ingest": ing}, indent=2), flush=True)
        if ing["rc"] != 0:
            failed.append(f"ingest exit {ing['rc']}")
        if ing["tracebacks"]:
            failed.append(f"{ing['tracebacks']} tracebacks in ingest's output")
        if ing["used"] + ing["quarantined"] != len(made):
            failed.append(f"ingest accounted for {ing['used'] + ing['quarantined']} of {len(made)} files")
    if "triton" in args.sections:
        tri = run_triton(src, work, batch=args.batch, request_timeout=args.request_timeout,
                         probe_every=args.probe_every, files=sorted(src.glob("*.dcm")))
        result["triton"] = tri
        print(json.dumps({"triton": tri}, indent=2), flush=True)
        if tri.get("requests_failed"):
            failed.append(f"{tri['requests_failed']} requests failed")
        if tri.get("probe_failures") or not tri.get("server_alive"):
            failed.append("Triton stopped answering the good file")
        if sum(tri.get("outcomes", {}).values()) != len(made):
            failed.append("not every file was answered or refused with a reason")
    result["loadavg_end"] = os.getloadavg()
    result["failed"] = failed
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    print("PASS" if not failed else "FAIL: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
