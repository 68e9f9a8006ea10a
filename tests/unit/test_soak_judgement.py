"""How benchmarks/soak/run.py judges a soak (issue 14, item 6): memory growth after warm-up, which
version may answer a request in flight, and which refusals count as clean. The soak itself runs
for minutes against a real Triton (benchmarks/soak/README.md); these are its rules, on made-up
samples."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def soak():
    name = "medops_bench_soak"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "soak" / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def samples(series: dict[tuple[int, str], list[int | None]], every: float = 10.0) -> list[dict]:
    """Samples every ``every`` s from ``{(pid, name): [rss MB or None (not running)]}``."""
    n = max(len(v) for v in series.values())
    return [{"t": i * every, "loadavg": [1.0, 1.0, 1.0],
             "processes": [{"pid": pid, "name": name, "rss_kb": mb * 1024}
                           for (pid, name), values in series.items()
                           if i < len(values) and (mb := values[i]) is not None]}
            for i in range(n)]


def test_growth_is_judged_after_warmup_and_per_process(soak):
    # tritonserver doubles during the warm-up (loading) then stays; a stub grows 10 % after it
    server = [40, 60, 80, 80, 80, 81, 81]
    stub = [70, 140, 150, 150, 155, 160, 165]
    res = soak.memory_growth(samples({(1, "tritonserver"): server, (2, "stub a"): stub}), 20.0)
    by_pid = {p["pid"]: p for p in res["processes"]}
    assert by_pid[1]["base_mb"] == 80 and by_pid[1]["growth"] == pytest.approx(81 / 80 - 1, abs=1e-4)
    assert by_pid[2]["growth"] == pytest.approx(165 / 150 - 1, abs=1e-4)
    assert res["worst"]["pid"] == 2 and not res["passed"]
    res = soak.memory_growth(samples({(1, "tritonserver"): server, (2, "stub a"): stub[:5]}), 20.0)
    assert res["passed"]  # 155 / 150: +3.3 %
    # the total of all processes is judged too when the same models run at both ends
    res = soak.memory_growth(samples({(1, "tritonserver"): [80] * 5, (2, "stub a"): [100] * 5,
                                      (5, "stub b"): [100, 100, 100, 100, None],
                                      (6, "stub b"): [None, None, None, None, 120]}), 20.0)
    assert res["total"]["same_models"] and res["total"]["growth"] == pytest.approx(0.0714, abs=1e-4)
    assert not res["passed"]


def test_a_stub_started_late_is_judged_from_its_own_warmup(soak):
    # the rollback's new stub starts at 30 s: its base is its sample at 30 + 20 = 50 s, not its first
    late = [None, None, None, 50, 90, 100, 101, 102]
    res = soak.memory_growth(samples({(1, "tritonserver"): [80] * 8, (3, "stub b"): late}), 20.0)
    stub = next(p for p in res["processes"] if p["pid"] == 3)
    assert (stub["base_t"], stub["base_mb"]) == (50.0, 100)
    assert stub["growth"] == pytest.approx(0.02) and res["passed"]
    # one that lived too briefly after its warm-up is listed but not judged
    res = soak.memory_growth(samples({(1, "tritonserver"): [80] * 8, (4, "stub c"): [None] * 6 + [30, 90]}), 20.0)
    assert "growth" not in next(p for p in res["processes"] if p["pid"] == 4) and res["passed"]


def test_the_version_a_request_may_get_follows_the_deploy_and_rollback(soak):
    rec = soak.Record(start=0.0)
    assert rec.served_during(1, 2) == {"1"}
    rec.events |= {"deploy_start": 10.0, "deploy_done": 20.0}
    assert rec.served_during(1, 9) == {"1"}
    assert rec.served_during(5, 12) is None      # in flight while v2 was being deployed: either
    assert rec.served_during(21, 25) == {"2"}
    rec.events |= {"rollback_start": 30.0, "rollback_done": 40.0}
    assert rec.served_during(21, 31) is None
    assert rec.served_during(41, 45) == {"1"}


class FakeServerError(Exception):
    def __init__(self, status: str, msg: str) -> None:
        super().__init__(msg)
        self._status = status

    def status(self) -> str:
        return self._status


FakeServerError.__name__ = "InferenceServerException"


@pytest.mark.parametrize("exc, clean", [
    (FakeServerError("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'image'"), True),
    (FakeServerError("400", "inference input 'image' data-type is 'FP64'"), True),
    (FakeServerError("StatusCode.NOT_FOUND", "Request for unknown model: 'x' is not found"), True),
    (FakeServerError("StatusCode.INTERNAL", "PanicException: index out of bounds"), False),
    (FakeServerError("500", "Traceback (most recent call last): ..."), False),
    (FakeServerError("StatusCode.UNAVAILABLE", "failed to connect to all addresses"), False),
    (FakeServerError("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded"), False),
    (asyncio.TimeoutError(), False),
    (ConnectionResetError("reset by peer"), False),
])
def test_a_refusal_is_clean_only_when_the_server_answered_it(soak, exc, clean):
    assert soak.judge_error(exc)[0] is clean
