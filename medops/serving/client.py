"""Ask a running Triton about DICOM files.

By default the files' bytes go to the DICOM ensemble (``<model>_dicom``), whose preprocessing
model runs ``medops.dicom.pixels.preprocess_bytes`` on the server: the same function ingest used
to build the training arrays, so a file is seen by the served model as it was seen in training,
whichever client sends it. ``via="tensor"`` preprocesses here with the same module and sends image
tensors to the classifier. A file that cannot be used becomes a ``Prediction`` with ``error`` set;
the other files are still answered, also when the server fails a whole request (its files are
then sent one by one, so that only the file it cannot take fails). A server that cannot be
reached, a model that is not ready, or one that fails every request, is a ServingError.
Connection errors (server not reachable, gRPC UNAVAILABLE) are retried
with exponential backoff, a fresh connection each time; bad input and missing models never are.
``apredict_files`` is the asyncio twin of ``predict_files`` (``tritonclient.grpc.aio`` /
``tritonclient.http.aio``), with the same request building, answers and per-file errors.

One core, two transports: what to ask the server is written once, as *steps* (generators that
yield a ``Call`` of a tritonclient method, a ``Sleep`` or a ``Reconnect``, are sent the call's
result or have its error thrown back in, and return the answer): the readiness check, the
thresholds, one inference request, the retries (``with_retries`` under a ``RetryPolicy``) and the
whole prediction (``_PredictSteps``: batching, answers, per-file errors, a failed request's files
sent again one by one). ``SyncTransport`` and
``AsyncTransport`` take the steps with the blocking and the asyncio client; they are the only
code that does I/O.

Imports neither TensorFlow nor the Triton client libraries until a prediction is asked for.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Literal, Sequence, TypeVar

import numpy as np
from pydantic import BaseModel

from medops.config import PreprocessSpec
from medops.errors import (
    DicomReadError,
    MedopsError,
    QuarantineReason,
    ServerUnreachableError,
    ServingError,
    first_line,
)
from medops.serving.contract import (
    DICOM_INPUT,
    ERROR_OUTPUT,
    INPUT_NAME,
    LABEL_OUTPUT,
    GUARDED_OUTPUTS,
    IN_DISTRIBUTION_OUTPUT,
    LABELS,
    OOD_SCORE_OUTPUT,
    OUTPUT_NAME,
    THRESHOLD_PARAM,
    ensemble_name,
    version_threshold_param,
)

Protocol = Literal["grpc", "http"]
Via = Literal["ensemble", "tensor"]
T = TypeVar("T")

DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.2
BACKOFF_JITTER = 0.1  # up to +10 % per delay, so clients cut off together do not retry together




class Prediction(BaseModel):
    """The answer for one file: its probability of pneumonia and label, or why there is none.

    ``ood_score`` and ``in_distribution`` are the OOD guard's (None from a model exported before
    it); ``reason`` says why an answered file has no label (its image is out of distribution and
    the server withholds such labels: ``serving.ood_action: withhold``).
    """

    file: str
    probability: float | None = None
    label: str | None = None
    model_version: str | None = None
    error: str | None = None
    ood_score: float | None = None
    in_distribution: bool | None = None
    reason: str | None = None

    @property
    def ood_flag(self) -> str | None:
        """``OUT OF DISTRIBUTION (ood_score 3.20 > 1.0)`` for an out-of-distribution answer."""
        if self.in_distribution is not False:
            return None
        score = "?" if self.ood_score is None else f"{self.ood_score:.2f}"
        return f"OUT OF DISTRIBUTION (ood_score {score} > {OOD_THRESHOLD:g})"


OOD_THRESHOLD = 1.0  # ood_score is the guard's combined score over its threshold (medops.learn.ood)


def ood_fields(score: float | None, inside: bool | None) -> tuple[float | None, bool | None]:
    """``(ood_score, in_distribution)`` of one answer as a Prediction holds them: a NaN score (a
    model exported before the guard, served by the embedded backend) or none at all is None."""
    if score is None or not np.isfinite(score):
        return None, None
    return float(score), bool(inside)


def withheld_reason(score: float | None) -> str:
    return (f"out of distribution (ood_score {score:.2f} > {OOD_THRESHOLD:g}): label withheld "
            f"(serving.ood_action: withhold)")


def label_for(probability: float, threshold: float, labels: Sequence[str] = LABELS) -> str:
    """``labels[1]`` ("pneumonia") when ``probability >= threshold``, else ``labels[0]``."""
    return labels[1] if probability >= threshold else labels[0]


def _client(url: str, protocol: Protocol, timeout: float) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(url)
    if protocol == "http":
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(url, connection_timeout=timeout,
                                                network_timeout=timeout)
    raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")


def _aclient(url: str, protocol: Protocol, timeout: float) -> Any:
    """The asyncio client; must be made inside the running event loop."""
    if protocol == "grpc":
        import tritonclient.grpc.aio as grpcaio

        return grpcaio.InferenceServerClient(url)
    if protocol == "http":
        import tritonclient.http.aio as httpaio

        return httpaio.InferenceServerClient(url, conn_timeout=timeout)
    raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")


def _tc(protocol: Protocol) -> Any:
    """The tritonclient module whose InferInput/InferRequestedOutput the protocol takes (the
    aio clients take the same classes)."""
    if protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    return tc


# -- steps: what to ask the server, without doing the asking -------------------------------------

@dataclass(frozen=True)
class Call:
    """Ask the server: ``client.<method>(*args, **kwargs)``; the same for the blocking and the
    asyncio tritonclient, whose methods have the same names and arguments."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sleep:
    """Wait ``seconds`` before the next step (a retry's backoff)."""

    seconds: float


@dataclass(frozen=True)
class Reconnect:
    """Replace the connection that a call just failed on with a fresh one."""


# Sent the result of each Call (None after a Sleep or a Reconnect), or thrown its error.
Steps = Generator[Call | Sleep | Reconnect, Any, T]


# -- retries -------------------------------------------------------------------------------------


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` means the server could not be reached, so asking again may work.

    gRPC reports it as status UNAVAILABLE (tritonclient's InferenceServerException); HTTP as a
    refused or reset connection (ConnectionError; aiohttp's ClientConnectionError). A timeout is
    not one (the server may be working on the request), nor is any answer from the server (bad
    input, unknown model).
    """
    if isinstance(exc, TimeoutError):  # also socket.timeout and asyncio.TimeoutError
        return False
    if isinstance(exc, ConnectionError):
        return True
    status = getattr(exc, "status", None)
    if callable(status) and type(exc).__name__ == "InferenceServerException":
        return status() == "StatusCode.UNAVAILABLE"
    if type(exc).__module__.startswith("aiohttp"):
        import aiohttp

        return (isinstance(exc, aiohttp.ClientConnectionError)
                and not isinstance(exc, aiohttp.ServerTimeoutError))
    return False


def backoff_delays(retries: int, backoff_s: float, *, jitter: float = BACKOFF_JITTER,
                   rng: random.Random | None = None) -> list[float]:
    """Seconds to wait before each retry: ``backoff_s * 2**k``, k = 0 .. retries-1, each
    lengthened by up to ``jitter`` of itself at random."""
    if retries < 0 or backoff_s < 0:
        raise ValueError(f"retries and backoff_s must be >= 0, got {retries} and {backoff_s}")
    draw = (rng or random).random
    return [backoff_s * 2**k * (1.0 + jitter * draw()) for k in range(retries)]


@dataclass(frozen=True)
class RetryPolicy:
    """Which errors are asked again (connection errors only, ``retries_on``), how long to wait
    (``delays``: ``backoff_s`` doubled each time, plus jitter), and when to give up (after
    ``retries`` retries, ``retries + 1`` tries in all)."""

    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S
    jitter: float = BACKOFF_JITTER

    def retries_on(self, exc: BaseException) -> bool:
        return is_connection_error(exc)

    def delays(self, rng: random.Random | None = None) -> list[float]:
        return backoff_delays(self.retries, self.backoff_s, jitter=self.jitter, rng=rng)


def _unreachable(url: str, protocol: Protocol, tries: int, waited: float,
                 exc: BaseException) -> ServerUnreachableError:
    return ServerUnreachableError(
        f"cannot reach Triton at {url} over {protocol} after {tries} "
        f"{'try' if tries == 1 else 'tries'} in {waited:.1f} s: {first_line(exc)}; is the server "
        "running (`medops serve start`) and is the url right?"
    )


def with_retries(make: Callable[[], Steps[T]], policy: RetryPolicy, *, url: str,
                 protocol: Protocol) -> Steps[T]:
    """``make()``'s steps, made and taken again after an error ``policy`` retries on, each time
    after a ``Sleep`` (the backoff) and a ``Reconnect`` (a gRPC channel that failed waits out its
    own reconnect backoff, so a fresh client is made instead).

    Raises:
        ServerUnreachableError: still no connection after ``policy.retries + 1`` tries, naming
            ``url``.
        Exception: any other error from the steps as it is, at once.
    """
    delays = policy.delays()
    start = time.monotonic()
    for attempt in range(policy.retries + 1):
        try:
            return (yield from make())
        except Exception as exc:  # noqa: BLE001 - sorted by the policy
            if not policy.retries_on(exc):
                raise
            if attempt == policy.retries:
                raise _unreachable(url, protocol, attempt + 1, time.monotonic() - start, exc) from None
        yield Sleep(delays[attempt])
        yield Reconnect()
    raise AssertionError("unreachable")  # pragma: no cover


# -- readiness -----------------------------------------------------------------------------------

def read_max_batch_size(protocol: Protocol, model_name: str) -> Steps[int]:
    config = yield Call("get_model_config", (model_name,))
    if protocol == "grpc":
        return int(config.config.max_batch_size)
    return int(config.get("max_batch_size", 0))


def read_model_info(protocol: Protocol, model_name: str) -> Steps[tuple[int, bool]]:
    """``(max_batch_size, guarded)`` of ``model_name``: ``guarded`` whether it declares the OOD
    guard's outputs (a server deployed before the guard does not: then they are not asked for,
    and answers carry no ood_score)."""
    config = yield Call("get_model_config", (model_name,))
    if protocol == "grpc":
        names = {o.name for o in config.config.output}
        size = int(config.config.max_batch_size)
    else:
        names = {o.get("name") for o in config.get("output", [])}
        size = int(config.get("max_batch_size", 0))
    return size, {OOD_SCORE_OUTPUT, IN_DISTRIBUTION_OUTPUT} <= names


DEFAULT_THRESHOLD = 0.5  # when no postprocessing model says otherwise


def _thresholds_of(config: Any, protocol: Protocol) -> dict[str, float]:
    """``{model version: threshold}`` from a postprocessing model's config: its ``threshold.N``
    parameters (deploy's, one per served version), and a plain ``threshold`` under "" (one for
    whichever version answers: the production template)."""
    if protocol == "grpc":
        params = {k: v.string_value for k, v in config.config.parameters.items()}
    else:
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    prefix = version_threshold_param("")
    out = {k[len(prefix):]: float(v) for k, v in params.items() if k.startswith(prefix)}
    if THRESHOLD_PARAM in params:
        out[""] = float(params[THRESHOLD_PARAM])
    return out


def read_thresholds(protocol: Protocol, model_name: str) -> Steps[dict[str, float]]:
    """The decision thresholds the served versions were deployed with, ``{version: threshold}``
    (see ``_thresholds_of``); empty when no postprocessing model is deployed.

    A connection error is raised as it is, for ``with_retries`` to judge: an unreachable
    server says nothing about the thresholds, and labelling at the default would be wrong."""
    try:
        return _thresholds_of((yield Call("get_model_config", (f"{model_name}_postprocess",))),
                              protocol)
    except Exception as exc:  # noqa: BLE001 - no postprocessing model deployed: the default
        if is_connection_error(exc):
            raise
        return {}


def knows_threshold(thresholds: dict[str, float], version: str) -> bool:
    """Whether ``thresholds`` (``read_thresholds``) says how to label ``version``'s answers;
    if not, a version deployed since they were read answered: read them again."""
    return version in thresholds or "" in thresholds


def threshold_for(thresholds: dict[str, float], version: str) -> float:
    """The threshold for an answer from ``version``: the one it was deployed with (deploy
    serves postprocess version N beside classifier version N, so the served config names the
    threshold of every version that can answer), else the one for any version, else 0.5."""
    return thresholds.get(version, thresholds.get("", DEFAULT_THRESHOLD))


def check_ready(*, url: str, protocol: Protocol, model_name: str) -> Steps[None]:
    """Live server and ready model, or a ServingError. A connection error is raised as it is, for
    ``with_retries`` to judge."""
    try:
        live = yield Call("is_server_live")
    except Exception as exc:  # noqa: BLE001 - every transport failure means the same to a user
        if is_connection_error(exc):
            raise
        raise ServerUnreachableError(
            f"cannot reach Triton at {url} over {protocol}: {first_line(exc)}; is the server "
            "running (`medops serve start`) and is the url right?"
        ) from None
    if not live:
        raise ServerUnreachableError(f"Triton at {url} is not live")
    try:
        ready = yield Call("is_model_ready", (model_name,))
    except Exception as exc:  # noqa: BLE001
        if is_connection_error(exc):
            raise
        raise ServingError(
            f"Triton at {url} could not report on model {model_name!r}: {first_line(exc)}"
        ) from None
    if not ready:
        raise ServingError(
            f"model {model_name!r} is not loaded or not ready on Triton at {url}; deploy it first "
            "(`medops deploy`)"
        )


# -- one request: built and read the same way whichever transport sends it ------------------------

def _images_request(images: np.ndarray, protocol: Protocol,
                    with_ood: bool = False) -> tuple[list[Any], list[Any]]:
    tc = _tc(protocol)
    inp = tc.InferInput(INPUT_NAME, list(images.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return [inp], [tc.InferRequestedOutput(n) for n in (GUARDED_OUTPUTS if with_ood else (OUTPUT_NAME,))]


def _ood_response(result: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ood_score (n,) float, in_distribution (n,) bool)`` of a guarded answer."""
    scores, inside = result.as_numpy(OOD_SCORE_OUTPUT), result.as_numpy(IN_DISTRIBUTION_OUTPUT)
    if scores is None or inside is None or scores.size != n or inside.size != n:
        raise ServingError(f"the model answered no {OOD_SCORE_OUTPUT!r}/{IN_DISTRIBUTION_OUTPUT!r} "
                           f"for {n} items")
    return scores.reshape(n).astype(np.float64), inside.reshape(n).astype(bool)


def _infer_kwargs(protocol: Protocol, timeout: float) -> dict[str, Any]:
    # gRPC: a client-side deadline; HTTP: the request's timeout in microseconds (the sync client
    # also has its network timeout, the asyncio one its session timeout)
    return {"client_timeout": timeout} if protocol == "grpc" else {"timeout": int(timeout * 1e6)}


def _version_of(result: Any, protocol: Protocol) -> str:
    if protocol == "grpc":
        return str(result.get_response().model_version)
    return str(result.get_response().get("model_version", ""))


def _images_response(result: Any, protocol: Protocol, model_name: str,
                     n: int) -> tuple[np.ndarray, str]:
    probs = result.as_numpy(OUTPUT_NAME)
    if probs is None or probs.shape[0] != n:
        raise ServingError(
            f"model {model_name!r} answered output {OUTPUT_NAME!r} with shape "
            f"{None if probs is None else list(probs.shape)} for {n} images"
        )
    return probs.reshape(n), _version_of(result, protocol)


def _dicom_request(items: Sequence[bytes], protocol: Protocol,
                   with_ood: bool = False) -> tuple[list[Any], list[Any]]:
    tc = _tc(protocol)
    data = np.array([bytes(b) for b in items], dtype=np.object_).reshape(-1, 1)
    inp = tc.InferInput(DICOM_INPUT, list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    names = (GUARDED_OUTPUTS if with_ood else (OUTPUT_NAME,)) + (LABEL_OUTPUT, ERROR_OUTPUT)
    return [inp], [tc.InferRequestedOutput(n) for n in names]


def _dicom_response(result: Any, protocol: Protocol) -> tuple[list[float], list[str], list[str], str]:
    probs = result.as_numpy(OUTPUT_NAME).reshape(-1)
    labels = [_text(x) for x in result.as_numpy(LABEL_OUTPUT).reshape(-1)]
    errors = [_text(x) for x in result.as_numpy(ERROR_OUTPUT).reshape(-1)]
    return [float(p) for p in probs], labels, errors, _version_of(result, protocol)


def classify_images(images: np.ndarray, *, protocol: Protocol, model_name: str,
                    model_version: str = "", timeout: float = 30.0,
                    with_ood: bool = False) -> Steps[tuple]:
    """One inference request for ``images`` ``(n, S, S, 1)`` float32.

    Returns:
        ``(probabilities (n,), model_version that answered)``; ``with_ood``: also
        ``(ood_score (n,), in_distribution (n,))`` as a third element.
    """
    inputs, outputs = _images_request(images, protocol, with_ood)
    result = yield Call("infer", (model_name, inputs),
                        {"model_version": model_version, "outputs": outputs,
                         **_infer_kwargs(protocol, timeout)})
    answer = _images_response(result, protocol, model_name, images.shape[0])
    return (*answer, _ood_response(result, images.shape[0])) if with_ood else answer


def classify_dicom(items: Sequence[bytes], *, protocol: Protocol, model_name: str,
                   timeout: float = 30.0, with_ood: bool = False) -> Steps[tuple]:
    """One request to the DICOM ensemble with raw file contents.

    Returns:
        ``(probabilities, labels, errors, model_version)``, one entry per item; ``errors[i]`` is ""
        for an answered item. The ensemble's version is the classifier version it serves.
        ``with_ood``: also ``(ood_score (n,), in_distribution (n,))`` as a fifth element.
    """
    inputs, outputs = _dicom_request(items, protocol, with_ood)
    result = yield Call("infer", (model_name, inputs),
                        {"outputs": outputs, **_infer_kwargs(protocol, timeout)})
    answer = _dicom_response(result, protocol)
    return (*answer, _ood_response(result, len(items))) if with_ood else answer


def infer_images(client: Any, images: np.ndarray, *, protocol: Protocol, model_name: str,
                 model_version: str = "", timeout: float = 30.0, with_ood: bool = False) -> tuple:
    """``classify_images`` with a blocking tritonclient ``client``, no retries (deploy's checks)."""
    return SyncTransport(client).run(classify_images(
        images, protocol=protocol, model_name=model_name, model_version=model_version,
        timeout=timeout, with_ood=with_ood))


def infer_dicom(client: Any, items: Sequence[bytes], *, protocol: Protocol, model_name: str,
                timeout: float = 30.0, with_ood: bool = False) -> tuple:
    """``classify_dicom`` with a blocking tritonclient ``client``, no retries."""
    return SyncTransport(client).run(classify_dicom(items, protocol=protocol,
                                                    model_name=model_name, timeout=timeout,
                                                    with_ood=with_ood))
def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def read_files(paths: Iterable[Path | str]) -> list[tuple[str, bytes | None, str | None]]:
    """``(file, contents or None, error or None)`` per path: the ensemble path sends bytes."""
    out: list[tuple[str, bytes | None, str | None]] = []
    for p in paths:
        try:
            out.append((str(p), Path(p).read_bytes(), None))
        except OSError as exc:
            out.append((str(p), None, f"{QuarantineReason.NOT_DICOM.value}: cannot read file: {exc}"))
    return out


def preprocess_files(
    paths: Iterable[Path | str], spec: PreprocessSpec,
) -> list[tuple[str, np.ndarray | None, str | None]]:
    """``(file, image (S, S) float32 or None, error or None)`` per path, in order, prepared as
    ``spec`` says."""
    from medops.dicom.pixels import preprocess_file

    out: list[tuple[str, np.ndarray | None, str | None]] = []
    for p in paths:
        name = str(p)
        try:
            out.append((name, preprocess_file(Path(p), spec), None))
        except DicomReadError as exc:
            out.append((name, None, f"{exc.reason.value}: {exc}"))
        except (OSError, MedopsError) as exc:
            out.append((name, None, f"{type(exc).__name__}: {exc}"))
    return out


# Keep each ensemble request well under gRPC's 2 GiB message limit however large the files are.
MAX_REQUEST_BYTES = 256 * 1024 * 1024


def chunk_requests(indices: Sequence[int], weights: Sequence[int], *, max_items: int,
                   max_bytes: int) -> list[list[int]]:
    """Split ``indices`` in order into requests of at most ``max_items`` items and (unless a single
    item is larger on its own) at most ``max_bytes`` of summed ``weights``."""
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, weight in zip(indices, weights):
        if current and (len(current) >= max_items or total + weight > max_bytes):
            chunks.append(current)
            current, total = [], 0
        current.append(index)
        total += weight
    if current:
        chunks.append(current)
    return chunks


# -- many files: the plan and the answers, shared by predict_files and apredict_files -------------

class _Plan:
    """What to send where: per-file payloads (bytes or images), the files already known bad, and
    the Prediction list the answers are written into, in the order of the paths."""

    def __init__(self, paths: Iterable[Path | str], *, via: Via, model_name: str,
                 preprocessing: PreprocessSpec) -> None:
        if via == "ensemble":
            self.target = ensemble_name(model_name)
            self.items: list[tuple[str, Any, str | None]] = list(read_files(paths))
        elif via == "tensor":
            self.target = model_name
            self.items = list(preprocess_files(paths, preprocessing))
        else:
            raise ValueError(f"via must be 'ensemble' or 'tensor', got {via!r}")
        self.via = via
        self.preds = [Prediction(file=f, error=e) for f, _, e in self.items]
        self.todo = [i for i, (_, payload, _) in enumerate(self.items) if payload is not None]
        self.done = len(self.items) - len(self.todo)  # files answered, or known bad before sending
        self.answered = 0  # files the server answered (with a probability or its own error)
        self.failed: list[ServingError] = []  # why each request of a single file failed

    def report(self, chunk: Sequence[int], progress: Callable[[int, int], None] | None) -> None:
        """Count ``chunk`` as answered and tell ``progress(done, total)``, if given."""
        self.done += len(chunk)
        if progress is not None:
            progress(self.done, len(self.items))

    def chunks(self, size: int) -> list[list[int]]:
        weights = [len(self.items[i][1]) if self.via == "ensemble" else 0 for i in self.todo]
        return chunk_requests(self.todo, weights, max_items=size, max_bytes=MAX_REQUEST_BYTES)

    def payload(self, chunk: Sequence[int]) -> Any:
        """The request's content: file bytes for the ensemble, an image batch for the tensor."""
        if self.via == "ensemble":
            return [self.items[i][1] for i in chunk]
        return np.stack([self.items[i][1] for i in chunk])[..., np.newaxis]

    def fail(self, chunk: Sequence[int], error: ServingError) -> list[list[int]]:
        """A request failed with something else than a connection error: the requests to send
        instead (each file alone, so that one file the server cannot take fails alone), or none
        for a single file, which then carries the error.

        Raises:
            ServingError: ``error`` of the first file sent alone, when the server has answered
                nothing yet and the first ``_SPLIT_PROBE`` files sent alone (all of them, if
                fewer) failed too: the server, not a file, is the problem (a model that refuses
                every input), and the call fails as a whole.
        """
        if len(chunk) > 1:
            return [[i] for i in chunk]
        self.failed.append(error)
        self.preds[chunk[0]] = Prediction(file=self.items[chunk[0]][0],
                                          error=f"inference_failed: {error}")
        if not self.answered and len(self.failed) >= min(len(self.todo), _SPLIT_PROBE):
            raise self.failed[0]
        return []

    def answer(self, chunk: Sequence[int], probs: Sequence[float], labels: Sequence[str],
               errors: Sequence[str], version: str, ood: tuple | None = None) -> None:
        """Write the answers; ``ood``: ``(ood_scores, in_distribution)`` of a guarded model.
        An out-of-distribution answer without a label had it withheld by the server."""
        self.answered += len(chunk)
        scores, inside = ood if ood is not None else ([None] * len(chunk), [None] * len(chunk))
        for i, prob, label, error, score, ok in zip(chunk, probs, labels, errors, scores, inside):
            name = self.items[i][0]
            if error:
                self.preds[i] = Prediction(file=name, error=error)
                continue
            score, ok = ood_fields(score, ok)
            withheld = ok is False and not label
            self.preds[i] = Prediction(file=name, probability=prob, label=label or None,
                                       model_version=version, ood_score=score, in_distribution=ok,
                                       reason=withheld_reason(score) if withheld else None)

    def answer_images(self, chunk: Sequence[int], arr: np.ndarray, version: str,
                      threshold: float, ood: tuple | None = None, withhold: bool = False) -> None:
        probs = [float(p) for p in arr]
        labels = [label_for(p, threshold) for p in probs]
        if ood is not None and withhold:
            labels = [lab if ood_fields(s, ok)[1] is not False else ""
                      for lab, s, ok in zip(labels, *ood)]
        self.answer(chunk, probs, labels, [""] * len(chunk), version, ood)


# When a request of several files fails, each file is sent alone; when this many files sent alone
# (or all of them, if fewer) failed before any file was answered, the call fails as a whole.
_SPLIT_PROBE = 4


def _inference_failed(target: str, url: str, exc: BaseException) -> ServingError:
    return ServingError(f"inference on {target!r} at {url} failed: {first_line(exc)}")


class _PredictSteps:
    """What ``predict_files`` and ``apredict_files`` ask the server, in which order and with which
    retries, and how its answers become the plan's Predictions; their transports only take the
    steps."""

    def __init__(self, plan: _Plan, *, url: str, protocol: Protocol, model_name: str,
                 threshold: float | None, timeout: float, batch_size: int | None,
                 policy: RetryPolicy, progress: Callable[[int, int], None] | None,
                 ood_action: str = "flag") -> None:
        self.plan, self.url, self.protocol, self.model_name = plan, url, protocol, model_name
        self.threshold, self.timeout, self.batch_size = threshold, timeout, batch_size
        self.policy, self.progress = policy, progress
        self.withhold = ood_action == "withhold"  # the tensor path labels here (the ensemble there)
        self.with_ood = False  # the served model declares the OOD guard's outputs
        self.thresholds: dict[str, float] = {}  # read once, again when a version they miss answers

    def _retried(self, make: Callable[[], Steps[T]]) -> Steps[T]:
        return with_retries(make, self.policy, url=self.url, protocol=self.protocol)

    def _read_thresholds(self) -> Steps[dict[str, float]]:
        return self._retried(lambda: read_thresholds(self.protocol, self.model_name))

    def start(self) -> Steps[list[list[int]]]:
        """Live server, ready model, the batch size and (tensors) the thresholds; returns the
        requests to send, as lists of file indices."""
        target, protocol = self.plan.target, self.protocol
        yield from self._retried(lambda: check_ready(url=self.url, protocol=protocol,
                                                     model_name=target))
        served_size, self.with_ood = yield from self._retried(
            lambda: read_model_info(protocol, target))
        size = self.batch_size or served_size or 1
        if self.threshold is not None:
            self.thresholds = {"": self.threshold}
        elif self.plan.via == "tensor":
            self.thresholds = yield from self._read_thresholds()
        return self.plan.chunks(size)

    def answer(self, chunk: list[int]) -> Steps[None]:
        """One request for the files ``chunk``: their answers written into the plan, progress
        told. A request the server fails (not a connection error) is sent again one file per
        request, so that a file it cannot take fails alone, as ``inference_failed: ...`` (see
        ``_Plan.fail``, which raises the ServingError, naming the model and the url, when the
        server answers no file at all)."""
        try:
            yield from self._request(chunk)
        except ServingError:
            raise
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own exception types
            failure = _inference_failed(self.plan.target, self.url, exc)
        else:
            self.plan.report(chunk, self.progress)
            return
        alone = self.plan.fail(chunk, failure)  # outside the handler: no foreign context
        if not alone:  # a single file, which now carries the error
            self.plan.report(chunk, self.progress)
        for one in alone:
            yield from self.answer(one)

    def _request(self, chunk: list[int]) -> Steps[None]:
        """The request itself, retried on connection errors; its answers written into the plan."""
        payload = self.plan.payload(chunk)
        target = self.plan.target
        kwargs = {"protocol": self.protocol, "timeout": self.timeout, "with_ood": self.with_ood}
        if self.plan.via == "ensemble":
            self.plan.answer(chunk, *(yield from self._retried(
                lambda: classify_dicom(payload, model_name=target, **kwargs))))
            return
        probs, version, *ood = yield from self._retried(
            lambda: classify_images(payload, model_name=target, **kwargs))
        if not knows_threshold(self.thresholds, version):
            self.thresholds = yield from self._read_thresholds()
        self.plan.answer_images(chunk, probs, version, threshold_for(self.thresholds, version),
                                ood[0] if ood else None, self.withhold)


# -- the two transports: the only code that talks to the server -----------------------------------

class SyncTransport:
    """Takes steps with a blocking tritonclient (``tritonclient.grpc`` / ``.http``)."""

    def __init__(self, client: Any, connect: Callable[[], Any] | None = None) -> None:
        self.client, self._connect = client, connect  # connect: a fresh client, for Reconnect

    @classmethod
    def open(cls, url: str, protocol: Protocol, timeout: float) -> SyncTransport:
        return cls(_client(url, protocol, timeout), lambda: _client(url, protocol, timeout))

    def run(self, steps: Steps[T]) -> T:
        """Take ``steps`` to their end and return what they return; a call's error is thrown
        back into them."""
        reply: Any = None
        failure: Exception | None = None
        while True:
            try:
                step = steps.send(reply) if failure is None else steps.throw(failure)
            except StopIteration as done:
                return done.value
            reply, failure = None, None
            try:
                if isinstance(step, Call):
                    reply = getattr(self.client, step.method)(*step.args, **step.kwargs)
                elif isinstance(step, Sleep):
                    time.sleep(step.seconds)
                else:
                    self.client.close()
                    self.client = self._connect()
            except Exception as exc:  # noqa: BLE001 - the steps judge it
                failure = exc

    def close(self) -> None:
        self.client.close()


class AsyncTransport:
    """Takes steps with an asyncio tritonclient (``tritonclient.grpc.aio`` / ``.http.aio``);
    several ``run`` may share it, each awaiting its own calls."""

    def __init__(self, client: Any, connect: Callable[[], Any] | None = None) -> None:
        self.client, self._connect = client, connect
        self._lock = asyncio.Lock()

    @classmethod
    def open(cls, url: str, protocol: Protocol, timeout: float) -> AsyncTransport:
        """Must be made inside the running event loop."""
        return cls(_aclient(url, protocol, timeout), lambda: _aclient(url, protocol, timeout))

    async def run(self, steps: Steps[T]) -> T:
        """``SyncTransport.run``, awaiting each call and sleep."""
        reply: Any = None
        failure: Exception | None = None
        used = self.client  # the client the last call went to
        while True:
            try:
                step = steps.send(reply) if failure is None else steps.throw(failure)
            except StopIteration as done:
                return done.value
            reply, failure = None, None
            try:
                if isinstance(step, Call):
                    used = self.client
                    reply = await getattr(used, step.method)(*step.args, **step.kwargs)
                elif isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                else:
                    await self._reconnect(used)
            except Exception as exc:  # noqa: BLE001 - the steps judge it
                failure = exc

    async def _reconnect(self, seen: Any) -> None:
        # one fresh client for all the requests that failed on the same old one
        async with self._lock:
            if self.client is seen:
                await seen.close()
                self.client = self._connect()

    async def close(self) -> None:
        await self.client.close()


# -- many files ----------------------------------------------------------------------------------

def predict_files(
    paths: Iterable[Path | str],
    *,
    url: str,
    protocol: Protocol = "grpc",
    model_name: str,
    preprocessing: PreprocessSpec,
    threshold: float | None = None,
    timeout: float = 30.0,
    batch_size: int | None = None,
    via: Via = "ensemble",
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    progress: Callable[[int, int], None] | None = None,
    ood_action: str = "flag",
) -> list[Prediction]:
    """Classify DICOM files with the model served by Triton at ``url``.

    Args:
        paths: DICOM files.
        url: ``host:port`` of Triton's gRPC (protocol "grpc") or HTTP (protocol "http") endpoint.
        model_name: the classifier (``serving.model_name``); the ensemble is ``<name>_dicom``.
        preprocessing: ``ingest.preprocessing``, for ``via="tensor"`` (the ensemble prepares
            pixels as it was deployed to).
        threshold: probability at or above which the label is "pneumonia", for
            ``via="tensor"``; default: the threshold the version that answered was deployed
            with (the ensemble always labels with that one), read from the postprocessing
            model's config, again when a version it does not name answers (a rollout).
        timeout: seconds per request.
        batch_size: files per request; default the model's max_batch_size.
        via: "ensemble" (default): send the files' bytes to the DICOM ensemble, which
            preprocesses on the server; "tensor": preprocess here with the same
            ``medops.dicom.pixels`` and send image tensors to the classifier.
        retries: times a call is asked again after a connection error (server not reachable,
            gRPC UNAVAILABLE), each on a fresh connection; never after any other error.
        backoff_s: wait before the first retry; doubled before each next one (plus up to 10 %
            jitter).
        progress: ``progress(done, total)`` after each answered request (files known bad
            before sending count as done), e.g. the CLI's progress bar.
        ood_action: ``serving.ood_action`` for ``via="tensor"`` (labels are made here):
            "withhold" gives an out-of-distribution answer no label, with the reason; the
            ensemble applies the action it was deployed with.

    Returns:
        One Prediction per path, in order; unusable files carry ``error`` instead of a
        probability. A request of several files that fails (not a connection error) is sent
        again one file per request, so a file the server cannot take fails alone, as
        ``inference_failed: ...``, and the others are answered.

    Raises:
        ServingError: the server cannot be reached (after the retries), the model is not
            ready, or requests fail before any file is answered (the first few files sent
            alone all failed: the server, not a file, is the problem).
    """
    plan = _Plan(paths, via=via, model_name=model_name, preprocessing=preprocessing)
    if not plan.todo:
        return plan.preds
    steps = _PredictSteps(plan, url=url, protocol=protocol, model_name=model_name,
                          threshold=threshold, timeout=timeout, batch_size=batch_size,
                          policy=RetryPolicy(retries, backoff_s), progress=progress,
                          ood_action=ood_action)
    transport = SyncTransport.open(url, protocol, timeout)
    try:
        for chunk in transport.run(steps.start()):
            transport.run(steps.answer(chunk))
    finally:
        transport.close()
    return plan.preds


async def apredict_files(
    paths: Iterable[Path | str],
    *,
    url: str,
    protocol: Protocol = "grpc",
    model_name: str,
    preprocessing: PreprocessSpec,
    threshold: float | None = None,
    timeout: float = 30.0,
    batch_size: int | None = None,
    via: Via = "ensemble",
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    concurrency: int = 4,
    progress: Callable[[int, int], None] | None = None,
    ood_action: str = "flag",
) -> list[Prediction]:
    """``predict_files`` with asyncio: the same arguments, answers, order and errors, with up to
    ``concurrency`` requests in flight at once on one connection.

    Reading and preprocessing the files (``via="tensor"``) run in a worker thread so the event
    loop stays free.

    Raises:
        ServingError: as ``predict_files``; the first request that fails the call cancels
            the others.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    plan = await asyncio.to_thread(_Plan, paths, via=via, model_name=model_name,
                                   preprocessing=preprocessing)
    if not plan.todo:
        return plan.preds
    steps = _PredictSteps(plan, url=url, protocol=protocol, model_name=model_name,
                          threshold=threshold, timeout=timeout, batch_size=batch_size,
                          policy=RetryPolicy(retries, backoff_s), progress=progress,
                          ood_action=ood_action)
    transport = AsyncTransport.open(url, protocol, timeout)
    gate = asyncio.Semaphore(concurrency)

    async def send(chunk: list[int]) -> None:
        async with gate:
            await transport.run(steps.answer(chunk))

    try:
        tasks = [asyncio.ensure_future(send(chunk)) for chunk in await transport.run(steps.start())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await transport.close()
    return plan.preds


def _note(p: Prediction) -> str:
    """The error, else the OOD flag (and that the label was withheld), else nothing."""
    if p.error:
        return p.error
    flag = p.ood_flag
    if flag and p.reason:
        return f"{flag}: label withheld"
    return flag or ""


def format_predictions(preds: Sequence[Prediction]) -> str:
    """A plain-text table: file, label, probability, ood_score, model version, and a note: the
    error, or ``OUT OF DISTRIBUTION (ood_score 3.20 > 1.0)`` for an image unlike the training
    data."""
    header = ("file", "label", "probability", "ood_score", "version", "note")
    rows = [
        (p.file, p.label or "-", "-" if p.probability is None else f"{p.probability:.4f}",
         "-" if p.ood_score is None else f"{p.ood_score:.2f}", p.model_version or "-", _note(p))
        for p in preds
    ]
    widths = [max(len(h), *(len(r[c]) for r in rows)) if rows else len(h)
              for c, h in enumerate(header)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    return "\n".join(out)


def to_json_lines(preds: Sequence[Prediction]) -> str:
    """One JSON object per line, one line per file: ``file``, ``probability``, ``label``,
    ``model_version``, ``ood_score`` and ``in_distribution`` for an answer (the last two null from
    a model without the OOD guard; ``label`` null with a ``reason`` when it was withheld),
    ``file`` and ``error`` else."""
    def row(p: Prediction) -> dict[str, Any]:
        if p.error:
            return p.model_dump(mode="json", exclude_none=True)
        return p.model_dump(mode="json", exclude={"error"} | ({"reason"} if p.reason is None else set()))
    return "".join(json.dumps(row(p), sort_keys=True) + "\n" for p in preds)
