"""medops.serving.client without a server: labels, per-file errors, the table and JSON-lines outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import pydicom_file
from medops.serving.client import (
    Prediction,
    chunk_requests,
    format_predictions,
    label_for,
    predict_files,
    preprocess_files,
    read_files,
    to_json_lines,
)
from medops.errors import ExitCode, ServerUnreachableError, ServingError


def test_label_threshold_is_inclusive():
    assert label_for(0.5, 0.5) == "pneumonia"
    assert label_for(0.4999, 0.5) == "normal"
    assert label_for(0.2, 0.1) == "pneumonia"


def test_preprocess_files_keeps_order_and_turns_bad_files_into_errors(tmp_path):
    text = tmp_path / "report.txt"
    text.write_text("not DICOM")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(pydicom_file("CT_small.dcm").read_bytes()[:2000])
    missing = tmp_path / "missing.dcm"
    ct = pydicom_file("CT_small.dcm")
    items = preprocess_files([text, ct, truncated, missing], image_size=28)
    assert [f for f, _, _ in items] == [str(text), str(ct), str(truncated), str(missing)]
    (_, none1, err1), (_, img, err2), (_, none3, err3), (_, none4, err4) = items
    assert none1 is None and err1.startswith("not_dicom:")
    assert err2 is None and img.shape == (28, 28) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert none3 is None and err3 and "Traceback" not in err3
    assert none4 is None and err4


@pytest.mark.parametrize("via", ["ensemble", "tensor"])
def test_only_unusable_files_need_no_server(tmp_path, free_port, via):
    # the ensemble sends bytes, so only an unreadable file is known bad without the server;
    # preprocessing here also knows a non-DICOM file
    missing = tmp_path / "missing.dcm"
    bad = tmp_path / "x.txt"
    bad.write_text("no")
    paths = [missing] if via == "ensemble" else [missing, bad]
    preds = predict_files(paths, url=f"127.0.0.1:{free_port()}", model_name="m", image_size=28,
                          via=via)
    assert [p.file for p in preds] == [str(p) for p in paths]
    assert all(p.probability is None and p.error.startswith("not_dicom: ") for p in preds)


def test_read_files_reads_bytes_and_reports_unreadable(tmp_path):
    ok = tmp_path / "a.dcm"
    ok.write_bytes(b"\x00\x01")
    [(f1, data, e1), (f2, none, e2)] = read_files([ok, tmp_path / "gone.dcm"])
    assert (f1, data, e1) == (str(ok), b"\x00\x01", None)
    assert none is None and e2.startswith("not_dicom: cannot read file:") and "gone.dcm" in e2


def test_unreachable_server_is_a_serving_error_of_its_own(free_port):
    url = f"127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachableError, match=rf"cannot reach Triton at {url} over http") as err:
        predict_files([pydicom_file("CT_small.dcm")], url=url, protocol="http", model_name="m",
                      image_size=28, timeout=3)
    assert isinstance(err.value, ServingError) and err.value.exit_code == ExitCode.UNAVAILABLE


def test_bad_via_is_refused():
    with pytest.raises(ValueError, match="via must be 'ensemble' or 'tensor'"):
        predict_files([], url="127.0.0.1:1", model_name="m", image_size=28, via="both")  # type: ignore[arg-type]


def test_bad_protocol_is_refused():
    with pytest.raises(ValueError, match="protocol must be 'grpc' or 'http'"):
        predict_files([pydicom_file("CT_small.dcm")], url="127.0.0.1:1", protocol="ftp",  # type: ignore[arg-type]
                      model_name="m", image_size=28)


PREDS = [
    Prediction(file="a.dcm", probability=0.91234, label="pneumonia", model_version="3"),
    Prediction(file="notes.txt", error="not_dicom: notes.txt is not a DICOM file"),
]


def test_table_has_one_aligned_row_per_file():
    lines = format_predictions(PREDS).splitlines()
    assert lines[0].split() == ["file", "label", "probability", "version", "error"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["a.dcm", "pneumonia", "0.9123", "3"]
    assert lines[3].split()[:4] == ["notes.txt", "-", "-", "-"]
    assert lines[3].endswith("not_dicom: notes.txt is not a DICOM file")
    # columns line up: the label column starts at the same offset on every row
    assert lines[2].index("pneumonia") == lines[0].index("label") == lines[3].index("-")


def test_json_lines_round_trip():
    text = to_json_lines(PREDS)
    assert text.endswith("\n") and len(text.splitlines()) == 2
    rows = [json.loads(line) for line in text.splitlines()]
    assert set(rows[0]) == {"file", "probability", "label", "model_version"}  # no null error
    assert rows[1] == {"file": "notes.txt", "error": "not_dicom: notes.txt is not a DICOM file"}
    assert [Prediction.model_validate(r) for r in rows] == PREDS


def test_requests_are_split_by_count_and_by_bytes():
    idx = [0, 2, 3, 5, 6]
    assert chunk_requests(idx, [0] * 5, max_items=2, max_bytes=10) == [[0, 2], [3, 5], [6]]
    assert chunk_requests(idx, [4, 4, 4, 20, 1], max_items=64, max_bytes=10) == [[0, 2], [3], [5], [6]]
    assert chunk_requests([], [], max_items=4, max_bytes=10) == []


# -- retries on connection errors only -------------------------------------------------------------

import asyncio  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from medops.serving.client import (  # noqa: E402
    acall_with_retries,
    apredict_files,
    aserved_thresholds,
    backoff_delays,
    call_with_retries,
    is_connection_error,
    served_thresholds,
)


def _real_unreachable_errors(url: str) -> list[BaseException]:
    """What each real client raises for a port nobody listens on: sync and asyncio, gRPC and HTTP."""
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as grpcaio
    import tritonclient.http as httpclient
    import tritonclient.http.aio as httpaio

    errors: list[BaseException] = []
    for client in (grpcclient.InferenceServerClient(url),
                   httpclient.InferenceServerClient(url, connection_timeout=3, network_timeout=3)):
        try:
            client.is_server_live()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            client.close()

    async def aio() -> None:
        for client in (grpcaio.InferenceServerClient(url),
                       httpaio.InferenceServerClient(url, conn_timeout=3)):
            try:
                await client.is_server_live()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
            finally:
                await client.close()

    asyncio.run(aio())
    return errors


def test_what_an_unreachable_server_raises_is_a_connection_error(free_port):
    errors = _real_unreachable_errors(f"127.0.0.1:{free_port()}")
    assert len(errors) == 4  # all four clients failed
    assert [is_connection_error(e) for e in errors] == [True] * 4, [repr(e) for e in errors]


def test_answers_from_the_server_and_timeouts_are_not_connection_errors():
    import aiohttp
    from tritonclient.utils import InferenceServerException

    # what Triton answers for an unknown model (gRPC and HTTP) and for bad input
    for status in ("StatusCode.NOT_FOUND", "404", "StatusCode.INVALID_ARGUMENT", "400"):
        assert not is_connection_error(InferenceServerException("no", status=status))
    assert is_connection_error(InferenceServerException("down", status="StatusCode.UNAVAILABLE"))
    assert not is_connection_error(
        InferenceServerException("slow", status="StatusCode.DEADLINE_EXCEEDED"))
    assert not is_connection_error(TimeoutError("timed out"))
    assert not is_connection_error(aiohttp.ServerTimeoutError("timed out"))
    assert not is_connection_error(ValueError("bad shape"))
    assert not is_connection_error(ServingError("model 'm' is not loaded"))
    assert is_connection_error(ConnectionResetError(104, "reset"))
    assert is_connection_error(aiohttp.ServerDisconnectedError())


def test_backoff_doubles_with_at_most_ten_percent_jitter():
    assert backoff_delays(3, 0.2, jitter=0.0) == pytest.approx([0.2, 0.4, 0.8])
    assert backoff_delays(0, 0.2) == []
    delays = backoff_delays(5, 0.1, rng=random.Random(7))
    for k, d in enumerate(delays):
        assert 0.1 * 2**k <= d <= 0.1 * 2**k * 1.1
    # the jitter is real: two draws differ
    assert backoff_delays(5, 0.1, rng=random.Random(1)) != backoff_delays(5, 0.1, rng=random.Random(2))
    with pytest.raises(ValueError, match="retries and backoff_s must be >= 0"):
        backoff_delays(-1, 0.2)


def test_connection_errors_are_retried_then_a_serving_error_names_the_url(free_port):
    import tritonclient.grpc as grpcclient

    url = f"127.0.0.1:{free_port()}"
    clients = [grpcclient.InferenceServerClient(url)]
    calls, reconnects = [], []

    def live() -> bool:
        calls.append(time.monotonic())
        return clients[0].is_server_live()

    def reconnect() -> None:
        reconnects.append(1)
        clients[0].close()
        clients[0] = grpcclient.InferenceServerClient(url)

    start = time.monotonic()
    with pytest.raises(ServingError, match=rf"cannot reach Triton at {url} over grpc after 4 tries"):
        call_with_retries(live, url=url, protocol="grpc", retries=3, backoff_s=0.05,
                          reconnect=reconnect)
    clients[0].close()
    assert len(calls) == 4 and len(reconnects) == 3
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    for k, gap in enumerate(gaps):  # the schedule: 0.05, 0.1, 0.2 (+ jitter)
        assert gap >= 0.05 * 2**k
    assert time.monotonic() - start < 3


def test_other_errors_are_raised_at_once_without_retry():
    calls = []

    def bad() -> None:
        calls.append(1)
        raise ValueError("input 'image' has shape [1, 3]")

    with pytest.raises(ValueError, match="has shape"):
        call_with_retries(bad, url="127.0.0.1:1", protocol="grpc", retries=5, backoff_s=1.0)
    assert calls == [1]


class _ConfigClient:
    """Answers get_model_config with the given outcomes in turn (exceptions are raised)."""

    def __init__(self, *outcomes) -> None:
        self.outcomes, self.calls = list(outcomes), 0

    def _next(self):
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def get_model_config(self, name):
        return self._next()


class _AsyncConfigClient(_ConfigClient):
    async def get_model_config(self, name):
        return self._next()


POSTPROCESS_CONFIG = {"parameters": {"threshold.2": {"string_value": "0.4"}}}


@pytest.mark.parametrize("aio", [False, True])
def test_served_thresholds_raise_connection_errors_for_the_retries(aio):
    from tritonclient.utils import InferenceServerException

    def read(client):
        if aio:
            return asyncio.run(aserved_thresholds(client, "http", "m"))
        return served_thresholds(client, "http", "m")

    # no postprocessing model deployed: an answer from the server, the documented default
    missing = InferenceServerException("unknown model", status="400")
    assert read((_AsyncConfigClient if aio else _ConfigClient)(missing)) == {}
    with pytest.raises(ConnectionRefusedError):
        read((_AsyncConfigClient if aio else _ConfigClient)(ConnectionRefusedError(111, "refused")))

    # through the retry wrapper: asked again, and the server's thresholds are the answer
    client = (_AsyncConfigClient if aio else _ConfigClient)(
        ConnectionResetError(104, "reset"), POSTPROCESS_CONFIG)
    if aio:
        got = asyncio.run(acall_with_retries(lambda: aserved_thresholds(client, "http", "m"),
                                             url="u", protocol="http", retries=2, backoff_s=0.01))
    else:
        got = call_with_retries(lambda: served_thresholds(client, "http", "m"), url="u",
                                protocol="http", retries=2, backoff_s=0.01)
    assert got == {"2": 0.4} and client.calls == 2


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_predict_files_retries_an_unreachable_server(free_port, protocol):
    url = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    unreachable = rf"cannot reach Triton at {url} over {protocol} after 3 tries"
    with pytest.raises(ServingError, match=unreachable):
        predict_files([pydicom_file("CT_small.dcm")], url=url, protocol=protocol, model_name="m",
                      image_size=28, timeout=3, retries=2, backoff_s=0.1)
    assert time.monotonic() - start >= 0.1 + 0.2
    with pytest.raises(ServingError, match=rf"cannot reach Triton at {url} over {protocol} after 1 try"):
        predict_files([pydicom_file("CT_small.dcm")], url=url, protocol=protocol, model_name="m",
                      image_size=28, timeout=3, retries=0)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_apredict_files_retries_an_unreachable_server(free_port, protocol):
    url = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    unreachable = rf"cannot reach Triton at {url} over {protocol} after 3 tries"
    with pytest.raises(ServingError, match=unreachable):
        asyncio.run(apredict_files([pydicom_file("CT_small.dcm")], url=url, protocol=protocol,
                                   model_name="m", image_size=28, timeout=3, retries=2,
                                   backoff_s=0.1))
    assert time.monotonic() - start >= 0.1 + 0.2


@pytest.mark.parametrize("via", ["ensemble", "tensor"])
def test_apredict_files_answers_unusable_files_without_a_server(tmp_path, free_port, via):
    missing = tmp_path / "missing.dcm"
    bad = tmp_path / "x.txt"
    bad.write_text("no")
    paths = [missing] if via == "ensemble" else [missing, bad]
    url = f"127.0.0.1:{free_port()}"
    preds = asyncio.run(apredict_files(paths, url=url, model_name="m", image_size=28, via=via))
    assert preds == predict_files(paths, url=url, model_name="m", image_size=28, via=via)
    assert all(p.error.startswith("not_dicom: ") for p in preds)


def test_apredict_files_refuses_bad_arguments():
    with pytest.raises(ValueError, match="via must be 'ensemble' or 'tensor'"):
        asyncio.run(apredict_files([], url="127.0.0.1:1", model_name="m", image_size=28,
                                   via="both"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        asyncio.run(apredict_files([], url="127.0.0.1:1", model_name="m", image_size=28,
                                   concurrency=0))


@pytest.mark.triton  # a few seconds: an empty repository starts fast
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_server_that_comes_up_during_the_retries_is_reached(tmp_path, free_port, protocol):
    """A real tritonserver started 0.5 s after the client began: the client's retries reach it,
    and the model it lacks is then reported at once (model-missing is never retried)."""
    from medops.config import ServingConfig
    from medops.serving.server import start_server, stop_server

    cfg = ServingConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        startup_timeout_s=60)
    url = f"127.0.0.1:{cfg.grpc_port if protocol == 'grpc' else cfg.http_port}"
    state = tmp_path / "state"
    started = threading.Event()

    def start_later() -> None:
        time.sleep(0.5)
        start_server(cfg, repository=tmp_path / "repo", state_dir=state, wait=False)
        started.set()

    thread = threading.Thread(target=start_later, daemon=True)
    thread.start()
    try:
        begin = time.monotonic()
        with pytest.raises(ServingError, match="model 'm_dicom' is not loaded or not ready") as err:
            predict_files([pydicom_file("CT_small.dcm")], url=url, protocol=protocol,
                          model_name="m", image_size=28, timeout=5, retries=8, backoff_s=0.1)
        assert started.is_set() and time.monotonic() - begin > 0.5
        assert "cannot reach" not in str(err.value)
        assert not isinstance(err.value, ServerUnreachableError)  # an answer: the server is there
    finally:
        thread.join(30)
        stop_server(state)
