"""Drift benchmark (issue 10, items 4 and 5): does ``medops monitor`` see a shifted window of 200
served images, and stay quiet on in-distribution ones? And what does recording cost?

1. ``collect``: start the embedded Triton, deploy the project's exported model (with recording on,
   serving.record), and send every image of the corpora below ONCE through the DICOM ensemble;
   the recorder's log then holds one record per image, in the order sent.
   - ``test``: the test split's de-identified DICOM files (data/ingested), with their labels;
   - ``corrupt/<kind>``: the same films corrupted (seeded) in their pixels, headers unchanged:
     inverted, rotated 90 degrees, heavy Gaussian noise (sd 60 of 255), strong blur (Gaussian,
     sigma 2 px of 28), cropped to the top-left quarter and enlarged back;
   - ``foreign``: pydicom's own test files that are not chest radiographs (Modality not CR/DX:
     CT, MR, US, NM, OT, ...), those the ensemble answers.
2. ``windows``: offline, from those records, seeded windows of 200, each judged by
   ``medops.ops.monitor.compare`` with the project's params (``monitor``) against the project's
   reference (``models/reference.json``, the reference stage):
   - in-distribution: test-split films drawn at the reference's class prior (val's);
   - (a) 20% of the window replaced by corrupted films (each kind, and all kinds mixed) or by
     foreign images;
   - (b) class-prior shift: 50% of the window replaced by normal films (or by pneumonia films).
   A window's statistics are those of its records: the same as serving the window, without
   serving every window.
3. ``cost``: p50/p99 latency of one DICOM per request through the ensemble, recording on vs off,
   in one run (c=1 and c=16 closed-loop clients), deploying the same model both ways.

    /work/venv-drift/bin/python benchmarks/drift/run.py --project /tmp/drift-proj --write

The project needs models/model.onnx with its export.json and a passed reports/gate.json (the
pipeline's outputs), data/ingested and data/split; the reference is computed if missing.
Python must be the environment medops is installed in (the Triton stub imports it from there).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WINDOW = 200
CORRUPTIONS = ("inverted", "rotated", "noise", "blur", "crop")
PAIRS = 3  # recording on/off alternations in the cost runs


# -- corpora ---------------------------------------------------------------------------------------

def corrupt(pixels: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One corruption of an 8-bit film (uint8, any size), seeded by ``rng``."""
    from scipy.ndimage import gaussian_filter

    x = pixels.astype(np.float64)
    if kind == "inverted":
        y = 255 - x
    elif kind == "rotated":
        y = np.rot90(x)
    elif kind == "noise":
        y = x + rng.normal(0, 60, x.shape)
    elif kind == "blur":
        y = gaussian_filter(x, sigma=2.0)
    elif kind == "crop":
        h, w = x.shape
        y = np.kron(x[: h // 2, : w // 2], np.ones((2, 2)))[:h, :w]
    else:
        raise ValueError(kind)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def test_corpus(project: Path, out: Path, seed: int) -> list[dict]:
    """The test split's de-identified files, and their corrupted copies, written under ``out``."""
    import io
    import zipfile

    import pydicom

    from medops.data import pack_path, select_split

    rows = select_split(project / "data" / "ingested", project / "data" / "split" / "split.csv",
                        "test")
    rng = np.random.default_rng(seed)
    items = []
    for shard, group in rows.groupby("shard"):
        with zipfile.ZipFile(pack_path(project / "data" / "ingested", int(shard))) as pack:
            for i, deid_path, label in zip(group.index, group["deid_path"], group["label"]):
                data = pack.read(str(deid_path))
                path = out / "test" / f"{i:05d}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                items.append({"path": str(path), "corpus": "test", "label": int(label)})
                ds = pydicom.dcmread(io.BytesIO(data))
                for kind in CORRUPTIONS:
                    bad = corrupt(ds.pixel_array, kind, rng)
                    ds2 = pydicom.dcmread(io.BytesIO(data))
                    ds2.Rows, ds2.Columns = bad.shape
                    ds2.PixelData = bad.tobytes()
                    p = out / kind / f"{i:05d}.dcm"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    ds2.save_as(p)
                    items.append({"path": str(p), "corpus": f"corrupt/{kind}", "label": int(label)})
    return items


def foreign_corpus() -> list[dict]:
    """pydicom's test files whose Modality is not CR or DX (not chest radiographs)."""
    import warnings

    import pydicom
    from pydicom.data import get_testdata_files

    items = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in sorted(get_testdata_files("*.dcm")):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            except Exception:  # noqa: BLE001
                continue
            if str(ds.get("Modality", "")) not in ("CR", "DX") and ds.get("Rows") \
                    and ds.get("Columns"):
                items.append({"path": f, "corpus": "foreign", "label": None})
    return items


# -- serving ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """The embedded Triton serving the project's model, in a state folder of its own."""

    def __init__(self, project: Path, base: Path) -> None:
        from medops.config import load_params

        self.project, self.base = project, base
        self.params = load_params(project / "params.yaml")
        self.cfg = self.params.serving.model_copy(update={
            "http_port": _free_port(), "grpc_port": _free_port(), "metrics_port": _free_port(),
            "repository": str(base / "repository")})
        self.state = base / "state"

    def __enter__(self) -> "Served":
        from medops.serving.server import start_server

        self.info = start_server(self.cfg, repository=base_repo(self), state_dir=self.state)
        return self

    def __exit__(self, *exc) -> None:
        from medops.serving.server import stop_server

        stop_server(self.state)

    def deploy(self, record: bool) -> None:
        from medops.serving.deploy import deploy

        p, models = self.params, self.project / "models"
        deploy(self.cfg.model_copy(update={"record": record}), onnx=models / "model.onnx",
               gate=self.project / "reports" / "gate.json", export_result=models / "export.json",
               repository=base_repo(self), url=self.info.grpc_url, preprocessing=p.ingest.preprocessing)

    @property
    def log_dir(self) -> Path:
        return self.cfg.record_path(self.state)


def base_repo(served: Served) -> Path:
    return Path(served.cfg.repository)


def collect(served: Served, items: list[dict]) -> list[dict]:
    """Send each item once (batches of 32, in order); returns the items with their records."""
    from medops.drift import RequestLog
    from medops.serving.client import predict_files

    log = RequestLog(served.log_dir)
    before = len(log.read_last())
    for start in range(0, len(items), 32):
        predict_files([it["path"] for it in items[start:start + 32]], url=served.info.grpc_url,
                      model_name=served.cfg.model_name, preprocessing=served.params.ingest.preprocessing,
                      batch_size=32)
    records = log.read_last()[before:]
    if len(records) != len(items):
        raise RuntimeError(f"{len(records)} records for {len(items)} images sent")
    return [it | {"record": rec} for it, rec in zip(items, records)]


def server_cpu_s(sid: int) -> float:
    """CPU seconds (user + system) used so far by the processes of session ``sid``: the
    tritonserver and its Python-backend stubs (the embedded server leads its own session)."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of stat: the session id
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def latency(served: Served, path: str, *, clients: int, requests: int) -> dict:
    """p50/p99 (ms) of one-file ensemble requests from ``clients`` closed-loop gRPC clients."""
    import tritonclient.grpc as grpcclient

    data = np.array([[Path(path).read_bytes()]], dtype=np.object_)
    name = f"{served.cfg.model_name}_dicom"
    times: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        client = grpcclient.InferenceServerClient(served.info.grpc_url)
        outs = [grpcclient.InferRequestedOutput(o) for o in ("probability", "label", "error")]
        local = []
        for _ in range(n):
            inp = grpcclient.InferInput("dicom", [1, 1], "BYTES")
            inp.set_data_from_numpy(data)
            t = time.perf_counter()
            client.infer(name, [inp], outputs=outs)
            local.append(time.perf_counter() - t)
        with lock:
            times.extend(local[max(1, n // 10):])  # the first tenth is warm-up
        client.close()

    threads = [threading.Thread(target=worker, args=(requests // clients,)) for _ in range(clients)]
    cpu0, t0 = server_cpu_s(served.info.pid), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, server_cpu_s(served.info.pid) - cpu0
    ms = np.array(times) * 1000
    return {"clients": clients, "n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "throughput_rps": round(requests / wall, 1),
            "server_cpu_ms_per_request": round(1000 * cpu / requests, 3)}


def cost(served: Served, path: str, requests: int) -> list[dict]:
    """Recording on vs off, alternated twice (on, off, on, off) so drift in the machine's load
    falls on both; the better of each pair's p99 is not taken: all runs are listed."""
    rows = []
    for record in (True, False) * PAIRS:
        served.deploy(record)
        for clients in (1, 16):
            rows.append({"record": record} | latency(served, path, clients=clients,
                                                     requests=requests * (4 if clients > 1 else 1)))
    return rows


# -- windows ---------------------------------------------------------------------------------------

def evaluate_windows(collected: list[dict], project: Path, trials: int, seed: int) -> dict:
    from medops.config import load_params
    from medops.ops.monitor import Reference, compare

    cfg = load_params(project / "params.yaml").monitor.model_copy(update={"window": WINDOW})
    ref = Reference.load(project / "models" / "reference.json")
    prior = reference_prior(project)
    by = {}
    for it in collected:
        by.setdefault(it["corpus"], []).append(it)
    test = by["test"]
    pos = [it["record"] for it in test if it["label"] == 1]
    neg = [it["record"] for it in test if it["label"] == 0]
    pools = {f"corrupt/{k}": [it["record"] for it in by[f"corrupt/{k}"]] for k in CORRUPTIONS}
    pools["corrupt/mixed"] = [r for k in CORRUPTIONS for r in pools[f"corrupt/{k}"]]
    pools["foreign"] = [it["record"] for it in by["foreign"] if not it["record"].get("error")]
    rng = np.random.default_rng(seed)

    def in_dist(n: int) -> list[dict]:
        k = int(round(n * prior))
        return (list(rng.choice(pos, k, replace=False)) + list(rng.choice(neg, n - k, replace=False)))

    def judge(make) -> dict:
        fired, names = 0, {}
        for _ in range(trials):
            window = make()
            rng.shuffle(window)
            result = compare(ref, window, cfg)
            fired += result.drift
            for t in result.fired:
                names[t.name] = names.get(t.name, 0) + 1
        return {"rate": fired / trials, "trials": trials,
                "tests_fired": dict(sorted(names.items(), key=lambda kv: -kv[1])[:5])}

    out = {"prior": round(prior, 4), "in_distribution": judge(lambda: in_dist(WINDOW))}
    m = WINDOW // 5
    for name, pool in pools.items():
        replace = len(pool) < m
        out[f"20% {name}"] = judge(lambda p=pool, r=replace: in_dist(WINDOW - m)
                                   + list(rng.choice(p, m, replace=r)))
    half = WINDOW // 2
    out["prior shift: 50% -> normal"] = judge(
        lambda: in_dist(WINDOW - half) + list(rng.choice(neg, half, replace=False)))
    out["prior shift: 50% -> pneumonia"] = judge(
        lambda: in_dist(WINDOW - half) + list(rng.choice(pos, half, replace=False)))
    return out


def reference_prior(project: Path) -> float:
    """The pneumonia share of the validation split (whose answers are the reference's)."""
    import pandas as pd

    split = pd.read_csv(project / "data" / "split" / "split.csv")
    return float(split.loc[split["split"] == "val", "label"].mean())


# -- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path.cwd())
    parser.add_argument("--trials", type=int, default=200, help="windows per scenario")
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--cost-requests", type=int, default=300)
    parser.add_argument("--write", action="store_true", help="write results.json / results.md here")
    parser.add_argument("--records", type=Path,
                        help="served records (JSON lines) of an earlier run: judge windows only")
    parser.add_argument("--save-records", type=Path, help="write the served records here")
    parser.add_argument("--no-cost", action="store_true", help="skip the recording-cost runs")
    parser.add_argument("--cost-only", action="store_true", help="only the recording-cost runs")
    args = parser.parse_args(argv)
    project = args.project.resolve()
    if not (project / "models" / "reference.json").is_file():
        from medops.config import load_params
        from medops.pipeline import run_stage
        from medops.paths import ProjectPaths

        run_stage("reference", load_params(project / "params.yaml"), ProjectPaths(project))
    load = Path("/proc/loadavg").read_text().split()[:3]
    costs, collect_s = [], None
    if args.cost_only:
        return measure_cost_only(project, args.cost_requests, load)
    if args.records:
        collected = [json.loads(line) for line in args.records.read_text().splitlines()]
    else:
        with tempfile.TemporaryDirectory(prefix="medops-drift-") as tmp:
            base = Path(tmp)
            items = test_corpus(project, base / "corpus", args.seed) + foreign_corpus()
            with Served(project, base) as served:
                served.deploy(record=True)
                t0 = time.perf_counter()
                collected = collect(served, items)
                collect_s = round(time.perf_counter() - t0, 1)
                if not args.no_cost:
                    costs = cost(served, items[0]["path"], args.cost_requests)
        for it in collected:  # the corpus folder is gone: keep the name alone
            it["path"] = Path(it["path"]).name
    if args.save_records:
        args.save_records.write_text("".join(json.dumps(it) + "\n" for it in collected))
    windows = evaluate_windows(collected, project, args.trials, args.seed)
    results = {"window": WINDOW, "seed": args.seed, "loadavg_before": load,
               "served_images": len(collected), "collect_s": collect_s,
               "foreign_answered": sum(1 for it in collected if it["corpus"] == "foreign"
                                       and not it["record"].get("error")),
               "foreign_sent": sum(1 for it in collected if it["corpus"] == "foreign"),
               "windows": windows, "cost": costs,
               "loadavg_after": Path("/proc/loadavg").read_text().split()[:3]}
    text = render(results)
    print(text)
    if args.write:
        (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (HERE / "results.md").write_text(text)
    return 0


def measure_cost_only(project: Path, requests: int, load: list[str]) -> int:
    """Serve one test film, recording on vs off (``cost``), and print the table."""
    with tempfile.TemporaryDirectory(prefix="medops-drift-") as tmp:
        film = test_corpus_one(project, Path(tmp))
        with Served(project, Path(tmp)) as served:
            costs = cost(served, str(film), requests)
    r = {"cost": costs, "loadavg_before": load,
         "loadavg_after": Path("/proc/loadavg").read_text().split()[:3]}
    print(json.dumps(r, indent=2))
    print(render_cost(costs))
    return 0


def test_corpus_one(project: Path, out: Path) -> Path:
    """The first test-split film, written to ``out``."""
    import zipfile

    from medops.data import pack_path, select_split

    row = select_split(project / "data" / "ingested", project / "data" / "split" / "split.csv",
                       "test").iloc[0]
    with zipfile.ZipFile(pack_path(project / "data" / "ingested", int(row["shard"]))) as pack:
        path = out / "film.dcm"
        path.write_bytes(pack.read(str(row["deid_path"])))
    return path


def render_cost(costs: list[dict]) -> str:
    lines = ["| record | clients | p50 ms | p99 ms | req/s | server CPU ms/request |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c['record']} | {c['clients']} | {c['p50_ms']} | {c['p99_ms']} | "
              f"{c['throughput_rps']} | {c.get('server_cpu_ms_per_request')} |" for c in costs]
    for clients in (1, 16):
        for q in ("p50_ms", "p99_ms", "server_cpu_ms_per_request"):
            on = [c[q] for c in costs if c["record"] and c["clients"] == clients]
            off = [c[q] for c in costs if not c["record"] and c["clients"] == clients]
            if on and off:
                lines.append(f"\nc={clients}: {q} with recording / without = "
                             f"{statistics.median(on) / statistics.median(off):.2f} "
                             f"(medians of {len(on)} runs each)")
    return "\n".join(lines) + "\n"


def render(r: dict) -> str:
    w = r["windows"]
    lines = [f"# Drift benchmark: windows of {r['window']} served images", "",
             f"{r['served_images']} images served once through Triton ({r['foreign_answered']} of "
             f"{r['foreign_sent']} foreign files answered); load average before "
             f"{' '.join(r['loadavg_before'])}, after {' '.join(r['loadavg_after'])}. "
             f"In-distribution windows at the reference's prior {w['prior']:.3f}.", "",
             "| scenario | drift flagged | target | most frequent tests fired |", "|---|---|---|---|"]
    for name, v in w.items():
        if name == "prior":
            continue
        target = "<= 5%" if name == "in_distribution" else ">= 90%"
        ok = v["rate"] <= 0.05 if name == "in_distribution" else v["rate"] >= 0.90
        fired = ", ".join(f"{k} ({n})" for k, n in v["tests_fired"].items())
        lines.append(f"| {name} | {v['rate']:.1%} of {v['trials']} | {target} "
                     f"{'PASS' if ok else 'FAIL'} | {fired} |")
    if r["cost"]:
        lines += ["", "Cost of recording (one DICOM per request through the ensemble):", "",
                  render_cost(r["cost"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
