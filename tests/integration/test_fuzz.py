"""A short seeded fuzz run (issue 14, item 5): 300 mutations of pydicom's test files through ingest
and through the DICOM ensemble on a real Triton. benchmarks/fuzz/README.md has the long run.

Every file must be used or quarantined (answered or refused) with a known reason: no crash, no
traceback, no failed request, no file over its time limit, and Triton answers a good file
correctly all along.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
import time
from pathlib import Path

import pytest

from medops.stages import ingest
from medops.config import IngestConfig, PreprocessSpec
from medops.errors import QuarantineReason

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SEED, FILES = 20261203, 300
REASONS = {r.value for r in QuarantineReason}


def _mutate():
    """benchmarks/fuzz/mutate.py (benchmarks/ is no package)."""
    name = "medops_fuzz_mutate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "fuzz" / "mutate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("fuzzed")
    made = _mutate().generate(SEED, FILES, src)
    kinds = {m for f in made for m in f.mutations}
    assert kinds == set(_mutate().MUTATIONS)  # every kind of mutation is in the short run too
    return src


def test_mutations_are_seeded():
    mutate = _mutate()
    seeds = mutate.corpus()
    assert len(seeds) > 100
    again = [mutate.fuzz_one(SEED, i, seeds).data for i in range(20)]
    assert again == [mutate.fuzz_one(SEED, i, seeds).data for i in range(20)]
    assert len(set(again)) == 20


def test_ingest_uses_or_quarantines_every_fuzzed_file_with_a_reason(fuzzed, tmp_path, capfd):
    started = time.monotonic()
    result = ingest.run(IngestConfig(workers=2, file_timeout_s=30), source_dir=fuzzed,
                        out_dir=tmp_path / "out", key=b"fuzz-test-key-0123456789abcdef")
    assert time.monotonic() - started < 120
    with result.quarantine.open() as fh:
        rows = list(csv.DictReader(fh))
    assert result.files_seen == FILES and result.used + len(rows) == FILES
    assert result.used > 0
    assert {r["reason"] for r in rows} <= REASONS - {"timeout"}
    assert all(r["detail"] for r in rows)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.triton
def test_the_dicom_ensemble_answers_every_fuzzed_file_and_keeps_serving(fuzzed, tmp_path, free_port):
    from medops.serving.client import infer_dicom
    from medops.config import ServingConfig
    from medops.procs import pid_alive
    from medops.serving.contract import ensemble_name
    from medops.serving.deploy import deploy
    from medops.serving.server import start_server, stop_server
    from test_triton_serving import (expected_probability, write_bundled_dicom, write_export_result,
                                     write_gate, write_golden, write_tiny_onnx)
    import tritonclient.grpc as grpcclient

    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=90)
    state, repo = tmp_path / "state", tmp_path / "repository"
    coef = {"w": 4.0, "b": -2.0}
    info = start_server(cfg, repository=repo, state_dir=state)
    try:
        onnx_path = write_tiny_onnx(tmp_path / "export" / "model.onnx", **coef)
        write_golden(onnx_path, **coef)
        deploy(cfg, onnx=onnx_path, gate=write_gate(tmp_path / "gate.json", passed=True),
               export_result=write_export_result(onnx_path), repository=repo, url=info.grpc_url,
               preprocessing=PreprocessSpec(image_size=28))
        good = write_bundled_dicom(tmp_path / "good.dcm", index=3)
        good_p = expected_probability(good, **coef)
        client = grpcclient.InferenceServerClient(info.grpc_url)
        files = sorted(fuzzed.iterdir())
        reasons, answered = set(), 0
        try:
            for n, start in enumerate(range(0, len(files), 8)):
                batch = [p.read_bytes() for p in files[start:start + 8]]
                # one bad file must not fail the request: no exception here, one answer per file
                _, _, errors, _ = infer_dicom(client, batch, protocol="grpc",
                                              model_name=ensemble_name(cfg.model_name), timeout=60)
                assert len(errors) == len(batch)
                answered += sum(not e for e in errors)
                reasons |= {e.split(":", 1)[0] for e in errors if e}
                if n % 5 == 0:
                    [p], _, [err], _ = infer_dicom(client, [good.read_bytes()], protocol="grpc",
                                                   model_name=ensemble_name(cfg.model_name), timeout=60)
                    assert not err and p == pytest.approx(good_p, abs=1e-5)
        finally:
            client.close()
        assert answered > 0 and reasons <= REASONS
        assert pid_alive(info.pid)
        assert "Traceback (most recent call last)" not in Path(info.log_file).read_text(errors="replace")
    finally:
        stop_server(state)
