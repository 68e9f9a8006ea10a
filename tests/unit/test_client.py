"""medops.serving.client without a server: labels, per-file errors, the table and JSON-lines
outputs, the retry steps, and whole predictions against a scripted client through both
transports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import pydicom_file
from medops.config import PreprocessSpec
from medops.serving.client import (
    Prediction,
    chunk_requests,
    format_predictions,
    withheld_reason,
    label_for,
    predict_files,
    preprocess_files,
    read_files,
    to_json_lines,
)
from medops.errors import ExitCode, ServerUnreachableError, ServingError

SPEC = PreprocessSpec(image_size=28)


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
    items = preprocess_files([text, ct, truncated, missing], SPEC)
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
    preds = predict_files(paths, url=f"127.0.0.1:{free_port()}", model_name="m", preprocessing=SPEC,
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
                      preprocessing=SPEC, timeout=3)
    assert isinstance(err.value, ServingError) and err.value.exit_code == ExitCode.UNAVAILABLE


def test_bad_via_is_refused():
    with pytest.raises(ValueError, match="via must be 'ensemble' or 'tensor'"):
        predict_files([], url="127.0.0.1:1", model_name="m", preprocessing=SPEC, via="both")  # type: ignore[arg-type]


def test_bad_protocol_is_refused():
    with pytest.raises(ValueError, match="protocol must be 'grpc' or 'http'"):
        predict_files([pydicom_file("CT_small.dcm")], url="127.0.0.1:1", protocol="ftp",  # type: ignore[arg-type]
                      model_name="m", preprocessing=SPEC)


PREDS = [
    Prediction(file="a.dcm", probability=0.91234, label="pneumonia", model_version="3"),
    Prediction(file="notes.txt", error="not_dicom: notes.txt is not a DICOM file"),
    Prediction(file="ct.dcm", probability=0.8, label="pneumonia", model_version="3",
               ood_score=3.2049, in_distribution=False),
    Prediction(file="mr.dcm", probability=0.1, model_version="3", ood_score=5.0,
               in_distribution=False, reason="out of distribution (ood_score 5.00 > 1): label withheld"),
]


def test_table_has_one_aligned_row_per_file():
    lines = format_predictions(PREDS).splitlines()
    assert lines[0].split() == ["file", "label", "probability", "ood_score", "version", "note"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["a.dcm", "pneumonia", "0.9123", "-", "3"]
    assert lines[3].split()[:5] == ["notes.txt", "-", "-", "-", "-"]
    assert lines[3].endswith("not_dicom: notes.txt is not a DICOM file")
    # an out-of-distribution answer says so plainly, with its score against the threshold
    assert lines[4].split()[:5] == ["ct.dcm", "pneumonia", "0.8000", "3.20", "3"]
    assert lines[4].endswith("OUT OF DISTRIBUTION (ood_score 3.20 > 1)")
    assert lines[5].split()[:2] == ["mr.dcm", "-"]
    assert lines[5].endswith("OUT OF DISTRIBUTION (ood_score 5.00 > 1): label withheld")
    # columns line up: the label column starts at the same offset on every row
    assert lines[2].index("pneumonia") == lines[0].index("label") == lines[3].index("-")


def test_json_lines_round_trip():
    text = to_json_lines(PREDS)
    assert text.endswith("\n") and len(text.splitlines()) == 4
    rows = [json.loads(line) for line in text.splitlines()]
    # an answer carries the guard's fields, null from a model exported before the guard; no error
    assert rows[0] == {"file": "a.dcm", "probability": 0.91234, "label": "pneumonia",
                       "model_version": "3", "ood_score": None, "in_distribution": None}
    assert rows[1] == {"file": "notes.txt", "error": "not_dicom: notes.txt is not a DICOM file"}
    assert rows[2]["ood_score"] == 3.2049 and rows[2]["in_distribution"] is False
    assert rows[3]["label"] is None and rows[3]["reason"].startswith("out of distribution")
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
    AsyncTransport,
    Call,
    Reconnect,
    RetryPolicy,
    Sleep,
    SyncTransport,
    apredict_files,
    backoff_delays,
    check_ready,
    is_connection_error,
    read_thresholds,
    with_retries,
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
    calls, reconnects = [], []

    def live():
        calls.append(time.monotonic())
        return check_ready(url=url, protocol="grpc", model_name="m")

    def connect():
        reconnects.append(1)
        return grpcclient.InferenceServerClient(url)

    transport = SyncTransport(grpcclient.InferenceServerClient(url), connect)
    start = time.monotonic()
    with pytest.raises(ServingError, match=rf"cannot reach Triton at {url} over grpc after 4 tries"):
        transport.run(with_retries(live, RetryPolicy(retries=3, backoff_s=0.05), url=url,
                                   protocol="grpc"))
    transport.close()
    assert len(calls) == 4 and len(reconnects) == 3
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    for k, gap in enumerate(gaps):  # the schedule: 0.05, 0.1, 0.2 (+ jitter)
        assert gap >= 0.05 * 2**k
    assert time.monotonic() - start < 3


def _take(steps, outcomes, seen):
    """Take ``steps`` by hand, no transport: each Call is answered with the next of ``outcomes``
    (raised into the steps if an exception); every step is appended to ``seen``."""
    reply, failure = None, None
    while True:
        try:
            step = steps.send(reply) if failure is None else steps.throw(failure)
        except StopIteration as done:
            return done.value
        seen.append(step)
        reply, failure = None, None
        if isinstance(step, Call):
            outcome = outcomes.pop(0)
            if isinstance(outcome, BaseException):
                failure = outcome
            else:
                reply = outcome


def _ask_live():
    return (yield Call("is_server_live"))


def test_retry_steps_back_off_reconnect_and_give_up_after_the_last_try():
    from tritonclient.utils import InferenceServerException

    policy = RetryPolicy(retries=2, backoff_s=0.1, jitter=0.0)
    refused = ConnectionRefusedError(111, "refused")
    live = Call("is_server_live")

    # two connection errors, then an answer: a doubling backoff, each time on a fresh connection
    seen = []
    assert _take(with_retries(_ask_live, policy, url="u", protocol="http"),
                 [refused, refused, True], seen) is True
    assert seen == [live, Sleep(0.1), Reconnect(), live, Sleep(0.2), Reconnect(), live]

    # one connection error more than the policy retries: given up at once, naming url and tries
    seen = []
    with pytest.raises(ServerUnreachableError,
                       match=r"cannot reach Triton at u over http after 3 tries in .*refused"):
        _take(with_retries(_ask_live, policy, url="u", protocol="http"), [refused] * 3, seen)
    assert seen == [live, Sleep(0.1), Reconnect(), live, Sleep(0.2), Reconnect(), live]

    # an answer from the server (bad input, unknown model) or a timeout: raised as it is, at once
    for exc in (InferenceServerException("bad input", status="400"), TimeoutError("slow"),
                InferenceServerException("slow", status="StatusCode.DEADLINE_EXCEEDED")):
        seen = []
        with pytest.raises(type(exc)) as err:
            _take(with_retries(_ask_live, policy, url="u", protocol="http"), [exc], seen)
        assert err.value is exc and seen == [live]


def test_no_retries_means_one_try():
    seen = []
    with pytest.raises(ServerUnreachableError, match="after 1 try in"):
        _take(with_retries(_ask_live, RetryPolicy(retries=0), url="u", protocol="grpc"),
              [ConnectionResetError(104, "reset")], seen)
    assert seen == [Call("is_server_live")]


def test_other_errors_are_raised_at_once_without_retry():
    class Client:
        calls = 0

        def infer(self, *args, **kwargs):
            Client.calls += 1
            raise ValueError("input 'image' has shape [1, 3]")

    def ask():
        return (yield Call("infer", ("m", [])))

    with pytest.raises(ValueError, match="has shape"):
        SyncTransport(Client()).run(with_retries(ask, RetryPolicy(retries=5, backoff_s=1.0),
                                                 url="127.0.0.1:1", protocol="grpc"))
    assert Client.calls == 1


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

    def close(self):
        pass


class _AsyncConfigClient(_ConfigClient):
    async def get_model_config(self, name):
        return self._next()

    async def close(self):
        pass


POSTPROCESS_CONFIG = {"parameters": {"threshold.2": {"string_value": "0.4"}}}


@pytest.mark.parametrize("aio", [False, True])
def test_thresholds_let_connection_errors_through_to_the_retries(aio):
    """The same steps through either transport: only the client differs."""
    from tritonclient.utils import InferenceServerException

    def run(client, steps):
        if aio:
            async def go():
                return await AsyncTransport(client, connect=lambda: client).run(steps)

            return asyncio.run(go())
        return SyncTransport(client, connect=lambda: client).run(steps)

    make = (_AsyncConfigClient if aio else _ConfigClient)
    # no postprocessing model deployed: an answer from the server, the documented default
    missing = InferenceServerException("unknown model", status="400")
    assert run(make(missing), read_thresholds("http", "m")) == {}
    with pytest.raises(ConnectionRefusedError):
        run(make(ConnectionRefusedError(111, "refused")), read_thresholds("http", "m"))

    # with the retries: asked again, and the server's thresholds are the answer
    client = make(ConnectionResetError(104, "reset"), POSTPROCESS_CONFIG)
    got = run(client, with_retries(lambda: read_thresholds("http", "m"),
                                   RetryPolicy(retries=2, backoff_s=0.01), url="u",
                                   protocol="http"))
    assert got == {"2": 0.4} and client.calls == 2


# -- the whole prediction against a scripted server, through both transports ---------------------

class _FakeTriton:
    """Answers as Triton's HTTP client does (configs and responses as dicts), from a script:
    ``answers``, one per infer call in turn, are ``(version, probabilities, errors)`` (errors
    only for the ensemble) or an exception to raise; ``thresholds``, one per read of the
    postprocessing config, are ``{version: threshold}``. Counts calls and connections."""

    def __init__(self, answers, *, thresholds=(), max_batch_size=2):
        self.answers, self.thresholds = list(answers), list(thresholds)
        self.max_batch_size, self.calls, self.connections = max_batch_size, [], 0

    def is_server_live(self):
        return True

    def is_model_ready(self, name):
        return True

    def get_model_config(self, name):
        self.calls.append(("config", name))
        if name.endswith("_postprocess"):
            return {"parameters": {f"threshold.{v}": {"string_value": str(t)}
                                   for v, t in self.thresholds.pop(0).items()}}
        return {"max_batch_size": self.max_batch_size}

    def infer(self, model_name, inputs, outputs=None, model_version="", **kwargs):
        self.calls.append(("infer", model_name, inputs[0].shape()[0]))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        version, probs, errors = answer
        out = {"probability": np.array(probs, dtype=np.float32).reshape(-1, 1)}
        if model_name.endswith("_dicom"):
            out["label"] = np.array([b"" if e else (b"pneumonia" if p >= 0.5 else b"normal")
                                     for p, e in zip(probs, errors)], dtype=np.object_)
            out["error"] = np.array([e.encode() for e in errors], dtype=np.object_)
        return _FakeResult(out, version)

    def close(self):
        pass


class _FakeResult:
    def __init__(self, outputs, version):
        self.outputs, self.version = outputs, version

    def as_numpy(self, name):
        return self.outputs.get(name)

    def get_response(self):
        return {"model_version": self.version}


class _AsyncFake:
    """The same fake with the asyncio client's coroutine methods."""

    def __init__(self, fake):
        self._fake = fake

    def __getattr__(self, name):
        method = getattr(self._fake, name)

        async def call(*args, **kwargs):
            return method(*args, **kwargs)

        return call


def _predict_with(fake, monkeypatch, aio, paths, **kwargs):
    """predict_files (or apredict_files) with every connection made to ``fake``."""
    import medops.serving.client as client

    def connect(*args):
        fake.connections += 1
        return fake

    monkeypatch.setattr(client, "_client", connect)
    monkeypatch.setattr(client, "_aclient", lambda *args: _AsyncFake(connect()))
    kwargs = dict(url="fake:1", protocol="http", model_name="m", preprocessing=SPEC, backoff_s=0.01,
                  **kwargs)
    if aio:
        return asyncio.run(apredict_files(paths, **kwargs))
    return predict_files(paths, **kwargs)


@pytest.mark.parametrize("aio", [False, True])
def test_ensemble_answers_per_file_errors_and_progress(tmp_path, monkeypatch, aio):
    files = [tmp_path / f"{n}.dcm" for n in ("a", "missing", "b", "c")]
    for f in (files[0], files[2], files[3]):
        f.write_bytes(b"DICM")
    fake = _FakeTriton([("3", [0.75, 0.0], ["", "not_dicom: no preamble"]), ("3", [0.125], [""])])
    progress = []
    preds = _predict_with(fake, monkeypatch, aio, files,
                          progress=lambda done, total: progress.append((done, total)))
    # the unreadable file is never sent; the others go two to a request (max_batch_size)
    assert [c for c in fake.calls if c[0] == "infer"] == [("infer", "m_dicom", 2),
                                                          ("infer", "m_dicom", 1)]
    assert preds == [
        Prediction(file=str(files[0]), probability=0.75, label="pneumonia", model_version="3"),
        Prediction(file=str(files[1]), error=preds[1].error),
        Prediction(file=str(files[2]), error="not_dicom: no preamble"),
        Prediction(file=str(files[3]), probability=0.125, label="normal", model_version="3"),
    ]
    assert preds[1].error.startswith("not_dicom: cannot read file:")
    assert progress == [(3, 4), (4, 4)]


@pytest.mark.parametrize("aio", [False, True])
def test_a_version_deployed_mid_run_is_labelled_with_its_own_threshold(monkeypatch, aio):
    """Tensors: the thresholds are read once, and again only when a version they do not name
    answers (a rollout); each answer is labelled at its own version's threshold."""
    ct = pydicom_file("CT_small.dcm")
    fake = _FakeTriton([("1", [0.5], []), ("2", [0.5], []), ("2", [0.5], [])],
                       thresholds=[{1: 0.4}, {1: 0.4, 2: 0.9}])
    preds = _predict_with(fake, monkeypatch, aio, [ct, ct, ct], via="tensor", batch_size=1)
    assert [(p.model_version, p.label) for p in preds] == [("1", "pneumonia"), ("2", "normal"),
                                                           ("2", "normal")]
    assert fake.calls.count(("config", "m_postprocess")) == 2
    assert fake.calls.count(("config", "m")) == 1  # read once: its outputs (is it guarded?)


@pytest.mark.parametrize("aio", [False, True])
def test_a_failed_request_is_a_serving_error_and_only_lost_connections_are_retried(
        tmp_path, monkeypatch, aio):
    from tritonclient.utils import InferenceServerException

    f = tmp_path / "a.dcm"
    f.write_bytes(b"DICM")
    # the connection lost once: asked again on a fresh connection, and answered
    fake = _FakeTriton([InferenceServerException("gone", status="StatusCode.UNAVAILABLE"),
                        ("1", [0.9], [""])])
    [pred] = _predict_with(fake, monkeypatch, aio, [f])
    assert (pred.label, pred.model_version) == ("pneumonia", "1") and fake.connections == 2
    assert [c[0] for c in fake.calls].count("infer") == 2

    # refused by the server: asked once, a ServingError naming the model and the url
    fake = _FakeTriton([InferenceServerException("unexpected shape", status="400")])
    with pytest.raises(ServingError, match=r"inference on 'm_dicom' at fake:1 failed: "
                                           r".*unexpected shape") as err:
        _predict_with(fake, monkeypatch, aio, [f])
    assert not isinstance(err.value, ServerUnreachableError)
    assert [c[0] for c in fake.calls].count("infer") == 1 and fake.connections == 1


class _PickyTriton(_FakeTriton):
    """A DICOM ensemble that fails a whole request holding a file ``fails`` picks (as Triton did
    when the preprocessing model raised for one file: status INTERNAL, a many-line message) and
    answers every other request with 0.25 from version 2, whatever the order of the requests."""

    def __init__(self, fails, **kwargs):
        super().__init__([], **kwargs)
        self.fails = fails

    def infer(self, model_name, inputs, outputs=None, model_version="", **kwargs):
        from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

        items = list(deserialize_bytes_tensor(inputs[0]._raw_data))
        self.calls.append(("infer", model_name, len(items)))
        if any(self.fails(b) for b in items):
            raise InferenceServerException("PanicException: index out of bounds\n  at src/lib.rs",
                                           status="StatusCode.INTERNAL")
        out = {"probability": np.full((len(items), 1), 0.25, dtype=np.float32),
               "label": np.array([b"normal"] * len(items), dtype=np.object_),
               "error": np.array([b""] * len(items), dtype=np.object_)}
        return _FakeResult(out, "2")


def _files(tmp_path, bodies):
    paths = []
    for name, body in bodies:
        (tmp_path / name).write_bytes(body)
        paths.append(tmp_path / name)
    return paths


@pytest.mark.parametrize("aio", [False, True])
def test_a_request_failed_for_one_file_is_sent_again_file_by_file(tmp_path, monkeypatch, aio):
    """The server fails the whole request of three files for one of them: the client sends each
    alone, answers the good ones and gives the bad one its error; progress counts each file once."""
    paths = _files(tmp_path, [("good1.dcm", b"GOOD1"), ("bad.dcm", b"BAD"), ("good2.dcm", b"GOOD2")])
    fake = _PickyTriton(lambda b: b == b"BAD")
    progress = []
    preds = _predict_with(fake, monkeypatch, aio, paths, batch_size=8,
                          progress=lambda done, total: progress.append((done, total)))
    assert [c[2] for c in fake.calls if c[0] == "infer"] == [3, 1, 1, 1]
    good1, bad, good2 = preds
    assert good1.probability == good2.probability == 0.25 and good1.model_version == "2"
    assert bad.probability is None and bad.label is None
    assert bad.error == ("inference_failed: inference on 'm_dicom' at fake:1 failed: "
                         "[StatusCode.INTERNAL] PanicException: index out of bounds")
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert fake.connections == 1  # an answer, not a lost connection: never a reconnect


@pytest.mark.parametrize("aio", [False, True])
def test_a_server_that_fails_every_file_sent_alone_is_a_serving_error(tmp_path, monkeypatch, aio):
    paths = _files(tmp_path, [(f"f{i}.dcm", b"x") for i in range(20)])
    fake = _PickyTriton(lambda b: True)
    with pytest.raises(ServingError, match=r"inference on 'm_dicom' at fake:1 failed: "
                                           r"\[StatusCode.INTERNAL\] PanicException") as err:
        _predict_with(fake, monkeypatch, aio, paths, batch_size=8,
                      **({"concurrency": 1} if aio else {}))
    assert not isinstance(err.value, ServerUnreachableError)
    assert err.value.__context__ is None  # no tritonclient exception kept
    sizes = [c[2] for c in fake.calls if c[0] == "infer"]
    # the first few files alone, not all 20 (with asyncio, a request already waiting for its turn
    # may be sent, and begin its own files alone, before the call is cancelled)
    assert sizes[:5] == [8, 1, 1, 1, 1] and sizes.count(1) < 20
    if not aio:
        assert sizes == [8, 1, 1, 1, 1]


@pytest.mark.parametrize("aio", [False, True])
def test_a_file_failed_alone_after_answers_does_not_fail_the_call(tmp_path, monkeypatch, aio):
    """Once the server has answered a file, files it fails are per-file errors however many."""
    paths = _files(tmp_path, [("good.dcm", b"GOOD")] + [(f"bad{i}.dcm", b"BAD") for i in range(6)])
    fake = _PickyTriton(lambda b: b == b"BAD")
    preds = _predict_with(fake, monkeypatch, aio, paths, batch_size=8)
    assert preds[0].probability == 0.25
    assert all(p.error.startswith("inference_failed: ") for p in preds[1:])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_predict_files_retries_an_unreachable_server(free_port, protocol):
    url = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    unreachable = rf"cannot reach Triton at {url} over {protocol} after 3 tries"
    with pytest.raises(ServingError, match=unreachable):
        predict_files([pydicom_file("CT_small.dcm")], url=url, protocol=protocol, model_name="m",
                      preprocessing=SPEC, timeout=3, retries=2, backoff_s=0.1)
    assert time.monotonic() - start >= 0.1 + 0.2
    with pytest.raises(ServingError, match=rf"cannot reach Triton at {url} over {protocol} after 1 try"):
        predict_files([pydicom_file("CT_small.dcm")], url=url, protocol=protocol, model_name="m",
                      preprocessing=SPEC, timeout=3, retries=0)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_apredict_files_retries_an_unreachable_server(free_port, protocol):
    url = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    unreachable = rf"cannot reach Triton at {url} over {protocol} after 3 tries"
    with pytest.raises(ServingError, match=unreachable):
        asyncio.run(apredict_files([pydicom_file("CT_small.dcm")], url=url, protocol=protocol,
                                   model_name="m", preprocessing=SPEC, timeout=3, retries=2,
                                   backoff_s=0.1))
    assert time.monotonic() - start >= 0.1 + 0.2


@pytest.mark.parametrize("via", ["ensemble", "tensor"])
def test_apredict_files_answers_unusable_files_without_a_server(tmp_path, free_port, via):
    missing = tmp_path / "missing.dcm"
    bad = tmp_path / "x.txt"
    bad.write_text("no")
    paths = [missing] if via == "ensemble" else [missing, bad]
    url = f"127.0.0.1:{free_port()}"
    preds = asyncio.run(apredict_files(paths, url=url, model_name="m", preprocessing=SPEC, via=via))
    assert preds == predict_files(paths, url=url, model_name="m", preprocessing=SPEC, via=via)
    assert all(p.error.startswith("not_dicom: ") for p in preds)


def test_apredict_files_refuses_bad_arguments():
    with pytest.raises(ValueError, match="via must be 'ensemble' or 'tensor'"):
        asyncio.run(apredict_files([], url="127.0.0.1:1", model_name="m", preprocessing=SPEC,
                                   via="both"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        asyncio.run(apredict_files([], url="127.0.0.1:1", model_name="m", preprocessing=SPEC,
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
                          model_name="m", preprocessing=SPEC, timeout=5, retries=8, backoff_s=0.1)
        assert started.is_set() and time.monotonic() - begin > 0.5
        assert "cannot reach" not in str(err.value)
        assert not isinstance(err.value, ServerUnreachableError)  # an answer: the server is there
    finally:
        thread.join(30)
        stop_server(state)


class _GuardedFake(_FakeTriton):
    """A server whose models declare the OOD guard's outputs; answers are ``(version, probs,
    errors, ood_scores)``; the ensemble withholds labels of out-of-distribution items when
    ``withhold``; ``nan`` scores are what a model exported before the guard answers."""

    def __init__(self, answers, *, withhold=False, **kwargs):
        super().__init__([a[:3] for a in answers], **kwargs)
        self.scores, self.withhold = [a[3] for a in answers], withhold
        self.requested = []

    def get_model_config(self, name):
        config = super().get_model_config(name)
        if not name.endswith("_postprocess"):
            config["output"] = [{"name": n} for n in ("probability", "ood_score", "in_distribution")]
        return config

    def infer(self, model_name, inputs, outputs=None, model_version="", **kwargs):
        self.requested.append(sorted(o.name() for o in outputs))
        result = super().infer(model_name, inputs, outputs, model_version, **kwargs)
        scores = np.array(self.scores.pop(0), dtype=np.float32).reshape(-1, 1)
        result.outputs["ood_score"], result.outputs["in_distribution"] = scores, scores <= 1.0
        if self.withhold and "label" in result.outputs:
            result.outputs["label"][~(scores <= 1.0).reshape(-1)] = b""
        return result


@pytest.mark.parametrize("aio", [False, True])
@pytest.mark.parametrize("via", ["ensemble", "tensor"])
def test_guarded_answers_carry_the_score_and_withhold_says_why(monkeypatch, aio, via):
    ct, mr = pydicom_file("CT_small.dcm"), pydicom_file("MR_small.dcm")
    fake = _GuardedFake([("2", [0.9, 0.2], ["", ""], [3.5, 0.4])], withhold=True,
                        thresholds=[{2: 0.5}])
    preds = _predict_with(fake, monkeypatch, aio, [ct, mr], via=via, ood_action="withhold")
    assert "ood_score" in fake.requested[0] and "in_distribution" in fake.requested[0]
    flagged, fine = preds
    assert (flagged.label, flagged.in_distribution, flagged.probability) == (None, False, pytest.approx(0.9))
    assert flagged.ood_score == pytest.approx(3.5)
    assert flagged.reason == withheld_reason(3.5) and flagged.reason.startswith("out of distribution (ood_score 3.50 > 1)")
    assert (fine.label, fine.in_distribution, fine.reason) == ("normal", True, None)


@pytest.mark.parametrize("aio", [False, True])
def test_a_nan_score_from_a_model_without_the_guard_is_no_score(monkeypatch, aio):
    ct = pydicom_file("CT_small.dcm")
    fake = _GuardedFake([("1", [0.9], [""], [float("nan")])])
    [pred] = _predict_with(fake, monkeypatch, aio, [ct])
    assert (pred.label, pred.ood_score, pred.in_distribution, pred.reason) == ("pneumonia", None, None, None)


@pytest.mark.parametrize("aio", [False, True])
def test_a_server_deployed_before_the_guard_is_not_asked_for_its_outputs(monkeypatch, aio):
    fake = _FakeTriton([("1", [0.9], [""])])
    calls = []
    real_infer = fake.infer

    def infer(model_name, inputs, outputs=None, **kwargs):
        calls.append(sorted(o.name() for o in outputs))
        return real_infer(model_name, inputs, outputs, **kwargs)

    fake.infer = infer
    [pred] = _predict_with(fake, monkeypatch, aio, [pydicom_file("CT_small.dcm")])
    assert calls == [["error", "label", "probability"]]
    assert pred.label == "pneumonia" and pred.ood_score is None
