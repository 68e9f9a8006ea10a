"""OOD benchmark (issue 10, item 5): does the served guard know when not to answer, and at what cost?

One run, seeded, on this machine:

1. A small-but-real model trained by the pipeline's own stages on the bundled PneumoniaMNIST
   (official splits; ``split``, ``train`` with simple_cnn for ``--epochs``, ``ood``, ``export``),
   exported twice: with the guard (probability, ood_score, in_distribution) and without it.
2. Both served side by side by the embedded tritonserver, as deploy writes them (classifier,
   pre/postprocessing, DICOM ensemble).
3. Corpora, every image sent as a DICOM file through the ensemble (preprocessing on the server):
   - in distribution: the test split (624 chest films, 8-bit CR files with the full-range VOI
     window medops synth writes, so the server prepares them as ingest prepared the training
     images);
   - far-OOD: every file of pydicom's own test data that is not a chest radiograph (modality not
     CR/DX) and that the ensemble decodes (CT, MR, US, NM, RT dose, secondary captures ...);
   - near-OOD: the test films corrupted (medops.learn.ood.corrupt): inverted, rotated 90 degrees,
     heavy noise (std 0.3), strong blur (box filter a third of the image wide), cropped to the
     top-left quarter; ``--near-per-kind`` films each, the first of a seeded permutation.
4. Figures: AUROC of ``ood_score`` (in vs far, in vs near pooled and per corruption), the false
   alarms on the test split at the threshold chosen on val (``ood_score > 1``), and the cost:
   p50/p99 latency of the DICOM path at c=1 and c=32 with the guard on and off, closed loop,
   measured in one run in the order off, on, on, off, ``--rounds`` times (each figure the mean
   of its runs), the tensor path's c=1 p99 with the guard, and the guard's compute alone:
   onnxruntime CPU time per call (process time, so other load on the machine does not count),
   plain vs guarded graph, batches of 1 and 32.

    .venv/bin/python benchmarks/ood/run.py                   # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/ood/run.py --write           # also results.json / results.md

Exit status 0 whether or not the targets pass (it is a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit"), str(ROOT / "benchmarks" / "serving")]

SEED = 20261203
TARGETS = {"far_auroc": 0.99, "near_auroc": 0.85, "test_false_alarms": 0.07, "cost_ratio": 1.10,
           "tensor_c1_p99_ms": 5.0}


def train_project(work: Path, epochs: int) -> dict[str, Path]:
    """The pipeline's stages on the full bundled dataset: ingested -> split -> train -> ood ->
    export (guarded and plain)."""
    from _ingested import build_ingested  # the bundled npz in the ingested format (tests' helper)

    from medops.config import AugmentConfig, ExportConfig, OodConfig, SplitConfig, TrainConfig
    from medops.stages import export, ood, split, train

    ing = build_ingested(work / "ingested", n_per_split={"train": 4708, "val": 524, "test": 624},
                         shard_size=2048, seed=SEED)
    split_csv = work / "split" / "split.csv"
    split.run(SplitConfig(), metadata=ing / "metadata.parquet", out=split_csv)
    models = work / "models"
    train.run(TrainConfig(epochs=epochs), AugmentConfig(), ingested_dir=ing, split=split_csv,
              model_out=models / "model.keras", result_out=models / "train.json",
              data_version="bench")
    common = dict(model=models / "model.keras", ingested_dir=ing, split=split_csv,
                  train_result=models / "train.json")
    ood_result = ood.run(OodConfig(), out_dir=models / "ood", **common)
    export.run(ExportConfig(), onnx_out=models / "guarded" / "model.onnx",
               result_out=models / "guarded" / "export.json", ood_dir=models / "ood", **common)
    export.run(ExportConfig(), onnx_out=models / "plain" / "model.onnx",
               result_out=models / "plain" / "export.json", **common)
    return {"ingested": ing, "split": split_csv, "guarded": models / "guarded" / "model.onnx",
            "plain": models / "plain" / "model.onnx", "ood": ood_result.model_dump()}


def cr_bytes(image: np.ndarray) -> bytes:
    """An 8-bit MONOCHROME2 CR file of a [0, 1] image, with the full-range VOI window medops'
    own synth writes (centre 128, width 256: the server's preprocessing gives back x/255, the
    pixels the model was trained on, as ingest of such files does)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.clip(np.rint(np.asarray(image, dtype=np.float64).squeeze() * 255), 0, 255)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = "128", "256"
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def foreign_files() -> list[tuple[str, bytes]]:
    """pydicom's own test files that are not chest radiographs (modality not CR/DX)."""
    import pydicom
    import pydicom.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = sorted(set(pydicom.data.get_testdata_files("*")))
    out = []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM at all (pydicom ships some such files)
            continue
        if str(getattr(ds, "Modality", "")).upper() in ("CR", "DX"):
            continue
        out.append((Path(path).name, Path(path).read_bytes()))
    return out


def corpora(project: dict, near_per_kind: int) -> dict[str, list[tuple[str, bytes]]]:
    from medops.data import load_split_images
    from medops.learn.ood import CORRUPTIONS, corrupt

    test, _, _ = load_split_images(project["ingested"], project["split"], "test")
    pick = np.random.default_rng(SEED).permutation(len(test))[:near_per_kind]
    near = [(f"{kind}-{i}", cr_bytes(img)) for kind in CORRUPTIONS
            for i, img in zip(pick, corrupt(test[pick], kind, seed=SEED))]
    return {"in": [(f"test-{i}", cr_bytes(img)) for i, img in enumerate(test)],
            "far": foreign_files(), "near": near}


def serve(work: Path, project: dict) -> tuple[Any, dict[str, Any], Path]:
    """Triton with the guarded and the plain model, each with its ensemble, as deploy writes them."""
    from medops.config import load_params
    from medops.serving.contract import build_ensemble_contract
    from medops.serving.repository import write_config, write_ensemble, write_processing_models, write_version
    from medops.serving.server import start_server
    from run import free_port  # benchmarks/serving/run.py

    params = load_params(ROOT / "params.yaml")
    repository, state = work / "repository", work / "state"
    contracts = {}
    for label in ("guarded", "plain"):
        cfg = params.serving.model_copy(update={"model_name": f"bench_{label}"})
        ec = build_ensemble_contract(cfg, params.ingest.preprocessing)
        write_version(ec.classifier, repository, project[label], flavour="embedded", version=1)
        write_config(ec.classifier, repository, "embedded", versions=[1])
        write_processing_models(ec, repository, "embedded")
        write_ensemble(ec, repository, 1)
        contracts[label] = ec
    cfg = params.serving.model_copy(update={
        "http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()})
    info = start_server(cfg, repository=repository, state_dir=state, admin_key=None)
    return info, contracts, state


def score(url: str, ec: Any, items: list[tuple[str, bytes]]) -> tuple[np.ndarray, list[str]]:
    """ood_score of every item the ensemble answers; names of those it refused (not decodable)."""
    import tritonclient.grpc as grpcclient

    from medops.serving.client import infer_dicom
    from medops.serving.deploy import wait_version_ready

    client = grpcclient.InferenceServerClient(url)
    try:
        wait_version_ready(client, ec.ensemble_name, 1, timeout=120)
        scores, refused = [], []
        for start in range(0, len(items), 16):
            chunk = items[start:start + 16]
            for name, data in chunk:  # one per request: a refused file is an answer, not a failure
                _, _, [error], _, (s, _) = infer_dicom(client, [data], protocol="grpc",
                                                       model_name=ec.ensemble_name, with_ood=True)
                (refused.append(name) if error else scores.append(float(s[0])))
        return np.array(scores), refused
    finally:
        client.close()


async def latency(url: str, ec: Any, items: list[bytes], c: int, seconds: float,
                  warmup: float) -> dict[str, float]:
    import tritonclient.grpc.aio as aio

    from medops.serving.client import _dicom_request  # the request exactly as medops predict sends it
    from run import closed_loop  # benchmarks/serving/run.py

    client = aio.InferenceServerClient(url)
    guarded = ec.classifier.name == "bench_guarded"
    try:
        async def call(k: int) -> None:
            inputs, outputs = _dicom_request([items[k % len(items)]], "grpc", guarded)
            # the request objects are built for the sync module: rebuild them for aio
            inp = aio.InferInput(inputs[0].name(), [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[items[k % len(items)]]], dtype=np.object_))
            outs = [aio.InferRequestedOutput(o.name()) for o in outputs]
            await client.infer(ec.ensemble_name, [inp], outputs=outs)

        return await closed_loop(call, c, seconds, warmup)
    finally:
        await client.close()


async def tensor_latency(url: str, ec: Any, images: np.ndarray, seconds: float, warmup: float) -> dict:
    import tritonclient.grpc.aio as aio

    from medops.serving.contract import GUARDED_OUTPUTS, INPUT_NAME, OUTPUT_NAME
    from run import closed_loop

    client = aio.InferenceServerClient(url)
    guarded = ec.classifier.name == "bench_guarded"
    try:
        outs = [aio.InferRequestedOutput(n) for n in (GUARDED_OUTPUTS if guarded else (OUTPUT_NAME,))]

        async def call(k: int) -> None:
            inp = aio.InferInput(INPUT_NAME, [1, *images.shape[1:]], "FP32")
            inp.set_data_from_numpy(images[k % len(images)][None])
            await client.infer(ec.classifier.name, [inp], outputs=outs)

        return await closed_loop(call, 1, seconds, warmup)
    finally:
        await client.close()


def compute_cost(project: dict, images: np.ndarray, calls: int = 300) -> dict:
    """CPU time (this process's, not wall time: other load on the machine does not count) of one
    onnxruntime ``session.run`` with the Triton instance's session options, plain vs guarded,
    batches of 1 and 32; interleaved, the median of 5 rounds of ``calls`` calls."""
    import onnxruntime as ort

    from medops.serving.contract import GUARDED_OUTPUTS, INPUT_NAME, OUTPUT_NAME

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = {k: ort.InferenceSession(str(project[k]), opts, providers=["CPUExecutionProvider"])
                for k in ("plain", "guarded")}
    names = {"plain": [OUTPUT_NAME], "guarded": list(GUARDED_OUTPUTS)}
    out: dict[str, Any] = {}
    for b in (1, 32):
        batch = images[:b]
        times: dict[str, list[float]] = {"plain": [], "guarded": []}
        for _ in range(5):
            for k in ("plain", "guarded"):
                t0 = time.process_time()
                for _ in range(calls):
                    sessions[k].run(names[k], {INPUT_NAME: batch})
                times[k].append((time.process_time() - t0) / calls * 1e6)
        out[f"batch{b}"] = {k: float(np.median(v)) for k, v in times.items()}
        out[f"batch{b}"]["ratio"] = out[f"batch{b}"]["guarded"] / out[f"batch{b}"]["plain"]
    return out


def cost(url: str, contracts: dict, files: list[bytes], images: np.ndarray, seconds: float,
         warmup: float, rounds: int) -> dict:
    out: dict[str, Any] = {}
    for c in (1, 32):
        runs: dict[str, list[dict]] = {"plain": [], "guarded": []}
        for label in ("plain", "guarded", "guarded", "plain") * rounds:
            runs[label].append(asyncio.run(latency(url, contracts[label], files, c, seconds, warmup)))
        out[f"c{c}"] = {label: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
                        for label, rs in runs.items()}
        out[f"c{c}"]["p99_ratio"] = out[f"c{c}"]["guarded"]["p99_ms"] / out[f"c{c}"]["plain"]["p99_ms"]
    runs = {"plain": [], "guarded": []}
    for label in ("plain", "guarded", "guarded", "plain") * rounds:
        runs[label].append(asyncio.run(tensor_latency(url, contracts[label], images, seconds, warmup)))
    out["tensor_c1"] = {label: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
                        for label, rs in runs.items()}
    out["tensor_c1"]["p99_ratio"] = out["tensor_c1"]["guarded"]["p99_ms"] / out["tensor_c1"]["plain"]["p99_ms"]
    return out


def render(r: dict) -> str:
    t = r["targets"]
    rows = [
        ("far-OOD AUROC (test films vs pydicom's non-chest files)", f"{r['far_auroc']:.4f}",
         f">= {t['far_auroc']}", r["far_auroc"] >= t["far_auroc"]),
        ("near-OOD AUROC (test films vs corrupted test films, pooled)", f"{r['near_auroc']:.4f}",
         f">= {t['near_auroc']}", r["near_auroc"] >= t["near_auroc"]),
        ("false alarms on the test split at the val threshold", f"{r['test_false_alarms']:.2%}",
         f"<= {t['test_false_alarms']:.0%}", r["test_false_alarms"] <= t["test_false_alarms"]),
    ]
    for c in ("c1", "c32"):
        x = r["cost"][c]
        rows.append((f"DICOM path p99 at {c.replace('c', 'c=')}: guard on / off",
                     f"{x['guarded']['p99_ms']:.2f} / {x['plain']['p99_ms']:.2f} ms "
                     f"(x{x['p99_ratio']:.3f})", f"<= x{t['cost_ratio']}",
                     x["p99_ratio"] <= t["cost_ratio"]))
    x = r["cost"]["tensor_c1"]
    tc = x["guarded"]["p99_ms"]
    rows.append(("tensor path p99 at c=1: guard on / off",
                 f"{tc:.2f} / {x['plain']['p99_ms']:.2f} ms (x{x['p99_ratio']:.3f})",
                 f"< {t['tensor_c1_p99_ms']} ms", tc < t["tensor_c1_p99_ms"]))
    for b, x in r["compute"].items():
        rows.append((f"onnxruntime CPU time per call, {b.replace('batch', 'batch of ')}: guard on / off",
                     f"{x['guarded']:.0f} / {x['plain']:.0f} us (x{x['ratio']:.2f})", "(compute)", True))
    lines = ["| figure | measured | target | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {'PASS' if ok else 'FAIL'} |" if c != "(compute)" else
              f"| {a} | {b} | | |" for a, b, c, ok in rows]
    lines += ["", "near-OOD AUROC per corruption: " + ", ".join(
        f"{k} {v:.4f}" for k, v in r["near_auroc_per_kind"].items()),
        f"corpora: {r['n']['in']} test films, {r['n']['far']} foreign files answered "
        f"({r['n']['far_refused']} refused by the ensemble as undecodable: {', '.join(r['far_refused']) or 'none'}), "
        f"{r['n']['near']} corrupted films",
        f"lowest-scoring foreign files: {', '.join(f'{n} {s:.2f}' for n, s in r['far_lowest'])}",
        f"machine: {r['meta']['cpus']} CPUs, load average before the timing {r['meta']['loadavg']}; "
        f"{r['meta']['epochs']} epochs of simple_cnn; {r['meta']['seconds']} s per latency point, "
        f"{r['meta']['rounds']} rounds of off/on/on/off",
        f"command: {r['meta']['command']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--near-per-kind", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of off, on, on, off per latency point")
    parser.add_argument("--write", action="store_true", help="write results.json and results.md here")
    args = parser.parse_args(argv)

    from medops.learn.ood import CORRUPTIONS, auroc
    from medops.serving.server import stop_server

    with tempfile.TemporaryDirectory(prefix="medops-ood-bench-") as tmp:
        work = Path(tmp)
        t0 = time.time()
        project = train_project(work, args.epochs)
        print(f"trained and exported in {time.time() - t0:.0f} s", flush=True)
        data = corpora(project, args.near_per_kind)
        info, contracts, state = serve(work, project)
        try:
            ec = contracts["guarded"]
            s_in, _ = score(info.grpc_url, ec, data["in"])
            s_far, far_refused = score(info.grpc_url, ec, data["far"])
            s_near, _ = score(info.grpc_url, ec, data["near"])
            far_names = [n for n, _ in data["far"] if n not in far_refused]
            kinds = np.repeat(CORRUPTIONS, args.near_per_kind)
            loadavg = os.getloadavg()
            from medops.data import load_split_images

            images, _, _ = load_split_images(project["ingested"], project["split"], "test")
            timing = cost(info.grpc_url, contracts, [b for _, b in data["in"][:64]], images[:64],
                          args.seconds, args.warmup, args.rounds)
            compute = compute_cost(project, images)
        finally:
            stop_server(state)
    result = {
        "far_auroc": auroc(s_in, s_far), "near_auroc": auroc(s_in, s_near),
        "near_auroc_per_kind": {k: auroc(s_in, s_near[kinds == k]) for k in CORRUPTIONS},
        "test_false_alarms": float((s_in > 1.0).mean()),
        "far_lowest": sorted(zip(far_names, s_far.tolist()), key=lambda t: t[1])[:5],
        "far_refused": far_refused,
        "n": {"in": len(s_in), "far": len(s_far), "far_refused": len(far_refused), "near": len(s_near)},
        "ood_stage": {k: project["ood"][k] for k in ("threshold", "val_false_alarm_rate",
                                                     "near_ood_val_auroc", "autoencoder_params")},
        "cost": timing, "compute": compute, "targets": TARGETS,
        "meta": {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in loadavg],
                 "python": platform.python_version(), "epochs": args.epochs, "seconds": args.seconds,
                 "rounds": args.rounds,
                 "command": "benchmarks/ood/run.py " + " ".join(argv if argv is not None else sys.argv[1:])},
    }
    text = render(result)
    print(text)
    if args.write:
        (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (HERE / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
