"""Ask a running Triton about DICOM files.

By default the files' bytes go to the DICOM ensemble (``<model>_dicom``), whose preprocessing
model runs ``medops.dicom.pixels.preprocess_bytes`` on the server: the same function ingest used
to build the training arrays, so a file is seen by the served model as it was seen in training,
whichever client sends it. ``via="tensor"`` preprocesses here with the same module and sends image
tensors to the classifier. A file that cannot be used becomes a ``Prediction`` with ``error`` set;
the other files are still answered. A server that cannot be reached, or a model that is not
ready, is a ServingError. Connection errors (server not reachable, gRPC UNAVAILABLE) are retried
with exponential backoff, a fresh connection each time; bad input and missing models never are.
``apredict_files`` is the asyncio twin of ``predict_files`` (``tritonclient.grpc.aio`` /
``tritonclient.http.aio``), with the same request building, answers and per-file errors.

Imports neither TensorFlow nor the Triton client libraries until a prediction is asked for.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Literal, Sequence, TypeVar

import numpy as np
from pydantic import BaseModel

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
    LABELS,
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
    """The answer for one file: its probability of pneumonia and label, or why there is none."""

    file: str
    probability: float | None = None
    label: str | None = None
    model_version: str | None = None
    error: str | None = None


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


def _unreachable(url: str, protocol: Protocol, tries: int, waited: float,
                 exc: BaseException) -> ServerUnreachableError:
    return ServerUnreachableError(
        f"cannot reach Triton at {url} over {protocol} after {tries} "
        f"{'try' if tries == 1 else 'tries'} in {waited:.1f} s: {first_line(exc)}; is the server "
        "running (`medops serve start`) and is the url right?"
    )


def call_with_retries(call: Callable[[], T], *, url: str, protocol: Protocol,
                      retries: int = DEFAULT_RETRIES, backoff_s: float = DEFAULT_BACKOFF_S,
                      reconnect: Callable[[], None] | None = None) -> T:
    """``call()``, asked again after a connection error up to ``retries`` times with exponential
    backoff (``backoff_delays``); ``reconnect()`` runs before each retry (a gRPC channel that
    failed waits out its own reconnect backoff, so a fresh client is made instead).

    Raises:
        ServerUnreachableError: still no connection after ``retries + 1`` tries, naming ``url``.
        Exception: any other error from ``call`` as it is, at once.
    """
    delays = backoff_delays(retries, backoff_s)
    start = time.monotonic()
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - sorted by is_connection_error
            if not is_connection_error(exc):
                raise
            if attempt == retries:
                raise _unreachable(url, protocol, attempt + 1, time.monotonic() - start, exc) from None
        time.sleep(delays[attempt])
        if reconnect is not None:
            reconnect()
    raise AssertionError("unreachable")  # pragma: no cover


async def acall_with_retries(call: Callable[[], Awaitable[T]], *, url: str, protocol: Protocol,
                             retries: int = DEFAULT_RETRIES, backoff_s: float = DEFAULT_BACKOFF_S,
                             reconnect: Callable[[], Awaitable[None]] | None = None) -> T:
    """``call_with_retries`` for coroutines: the same policy, waiting with ``asyncio.sleep``."""
    delays = backoff_delays(retries, backoff_s)
    start = time.monotonic()
    for attempt in range(retries + 1):
        try:
            return await call()
        except Exception as exc:  # noqa: BLE001 - sorted by is_connection_error
            if not is_connection_error(exc):
                raise
            if attempt == retries:
                raise _unreachable(url, protocol, attempt + 1, time.monotonic() - start, exc) from None
        await asyncio.sleep(delays[attempt])
        if reconnect is not None:
            await reconnect()
    raise AssertionError("unreachable")  # pragma: no cover


# -- readiness -----------------------------------------------------------------------------------

def _max_batch_size_of(config: Any, protocol: Protocol) -> int:
    if protocol == "grpc":
        return int(config.config.max_batch_size)
    return int(config.get("max_batch_size", 0))


def _max_batch_size(client: Any, protocol: Protocol, model_name: str) -> int:
    return _max_batch_size_of(client.get_model_config(model_name), protocol)


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


def served_thresholds(client: Any, protocol: Protocol, model_name: str) -> dict[str, float]:
    """The decision thresholds the served versions were deployed with, ``{version: threshold}``
    (see ``_thresholds_of``); empty when no postprocessing model is deployed.

    A connection error is raised as it is, for ``call_with_retries`` to judge: an unreachable
    server says nothing about the thresholds, and labelling at the default would be wrong."""
    try:
        return _thresholds_of(client.get_model_config(f"{model_name}_postprocess"), protocol)
    except Exception as exc:  # noqa: BLE001 - no postprocessing model deployed: the default
        if is_connection_error(exc):
            raise
        return {}


async def aserved_thresholds(client: Any, protocol: Protocol, model_name: str) -> dict[str, float]:
    """``served_thresholds`` with an asyncio client."""
    try:
        return _thresholds_of(await client.get_model_config(f"{model_name}_postprocess"), protocol)
    except Exception as exc:  # noqa: BLE001
        if is_connection_error(exc):
            raise
        return {}


def knows_threshold(thresholds: dict[str, float], version: str) -> bool:
    """Whether ``thresholds`` (``served_thresholds``) says how to label ``version``'s answers;
    if not, a version deployed since they were read answered: read them again."""
    return version in thresholds or "" in thresholds


def threshold_for(thresholds: dict[str, float], version: str) -> float:
    """The threshold for an answer from ``version``: the one it was deployed with (deploy
    serves postprocess version N beside classifier version N, so the served config names the
    threshold of every version that can answer), else the one for any version, else 0.5."""
    return thresholds.get(version, thresholds.get("", DEFAULT_THRESHOLD))


def _judge_live(live: bool, url: str) -> None:
    if not live:
        raise ServerUnreachableError(f"Triton at {url} is not live")


def _judge_ready(ready: bool, url: str, model_name: str) -> None:
    if not ready:
        raise ServingError(
            f"model {model_name!r} is not loaded or not ready on Triton at {url}; deploy it first "
            "(`medops deploy`)"
        )


def _not_live_error(exc: BaseException, url: str, protocol: Protocol) -> ServerUnreachableError:
    return ServerUnreachableError(
        f"cannot reach Triton at {url} over {protocol}: {first_line(exc)}; is the server running "
        "(`medops serve start`) and is the url right?"
    )


def _not_reporting_error(exc: BaseException, url: str, model_name: str) -> ServingError:
    return ServingError(f"Triton at {url} could not report on model {model_name!r}: {first_line(exc)}")


def _check_ready(client: Any, *, url: str, protocol: Protocol, model_name: str) -> None:
    """Live server and ready model, or a ServingError. A connection error is raised as it is, for
    ``call_with_retries`` to judge."""
    try:
        live = client.is_server_live()
    except Exception as exc:  # noqa: BLE001 - every transport failure means the same to a user
        if is_connection_error(exc):
            raise
        raise _not_live_error(exc, url, protocol) from None
    _judge_live(live, url)
    try:
        ready = client.is_model_ready(model_name)
    except Exception as exc:  # noqa: BLE001
        if is_connection_error(exc):
            raise
        raise _not_reporting_error(exc, url, model_name) from None
    _judge_ready(ready, url, model_name)


async def _acheck_ready(client: Any, *, url: str, protocol: Protocol, model_name: str) -> None:
    """``_check_ready`` with an asyncio client."""
    try:
        live = await client.is_server_live()
    except Exception as exc:  # noqa: BLE001
        if is_connection_error(exc):
            raise
        raise _not_live_error(exc, url, protocol) from None
    _judge_live(live, url)
    try:
        ready = await client.is_model_ready(model_name)
    except Exception as exc:  # noqa: BLE001
        if is_connection_error(exc):
            raise
        raise _not_reporting_error(exc, url, model_name) from None
    _judge_ready(ready, url, model_name)


# -- one request: built and read the same way by the sync and asyncio clients ---------------------

def _images_request(images: np.ndarray, protocol: Protocol) -> tuple[list[Any], list[Any]]:
    tc = _tc(protocol)
    inp = tc.InferInput(INPUT_NAME, list(images.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return [inp], [tc.InferRequestedOutput(OUTPUT_NAME)]


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


def _dicom_request(items: Sequence[bytes], protocol: Protocol) -> tuple[list[Any], list[Any]]:
    tc = _tc(protocol)
    data = np.array([bytes(b) for b in items], dtype=np.object_).reshape(-1, 1)
    inp = tc.InferInput(DICOM_INPUT, list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    return [inp], [tc.InferRequestedOutput(n) for n in (OUTPUT_NAME, LABEL_OUTPUT, ERROR_OUTPUT)]


def _dicom_response(result: Any, protocol: Protocol) -> tuple[list[float], list[str], list[str], str]:
    probs = result.as_numpy(OUTPUT_NAME).reshape(-1)
    labels = [_text(x) for x in result.as_numpy(LABEL_OUTPUT).reshape(-1)]
    errors = [_text(x) for x in result.as_numpy(ERROR_OUTPUT).reshape(-1)]
    return [float(p) for p in probs], labels, errors, _version_of(result, protocol)


def infer_images(
    client: Any,
    images: np.ndarray,
    *,
    protocol: Protocol,
    model_name: str,
    model_version: str = "",
    timeout: float = 30.0,
) -> tuple[np.ndarray, str]:
    """One inference request for ``images`` ``(n, S, S, 1)`` float32.

    Returns:
        ``(probabilities (n,), model_version that answered)``.
    """
    inputs, outputs = _images_request(images, protocol)
    result = client.infer(model_name, inputs, model_version=model_version, outputs=outputs,
                          **_infer_kwargs(protocol, timeout))
    return _images_response(result, protocol, model_name, images.shape[0])


async def ainfer_images(
    client: Any,
    images: np.ndarray,
    *,
    protocol: Protocol,
    model_name: str,
    model_version: str = "",
    timeout: float = 30.0,
) -> tuple[np.ndarray, str]:
    """``infer_images`` with an asyncio client (``tritonclient.grpc.aio`` / ``.http.aio``)."""
    inputs, outputs = _images_request(images, protocol)
    result = await client.infer(model_name, inputs, model_version=model_version, outputs=outputs,
                                **_infer_kwargs(protocol, timeout))
    return _images_response(result, protocol, model_name, images.shape[0])


def infer_dicom(
    client: Any,
    items: Sequence[bytes],
    *,
    protocol: Protocol,
    model_name: str,
    timeout: float = 30.0,
) -> tuple[list[float], list[str], list[str], str]:
    """One request to the DICOM ensemble with raw file contents.

    Returns:
        ``(probabilities, labels, errors, model_version)``, one entry per item; ``errors[i]`` is ""
        for an answered item. The ensemble's version is the classifier version it serves.
    """
    inputs, outputs = _dicom_request(items, protocol)
    result = client.infer(model_name, inputs, outputs=outputs, **_infer_kwargs(protocol, timeout))
    return _dicom_response(result, protocol)


async def ainfer_dicom(
    client: Any,
    items: Sequence[bytes],
    *,
    protocol: Protocol,
    model_name: str,
    timeout: float = 30.0,
) -> tuple[list[float], list[str], list[str], str]:
    """``infer_dicom`` with an asyncio client."""
    inputs, outputs = _dicom_request(items, protocol)
    result = await client.infer(model_name, inputs, outputs=outputs,
                                **_infer_kwargs(protocol, timeout))
    return _dicom_response(result, protocol)


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
    paths: Iterable[Path | str], *, image_size: int, window: Any = None, frame: str = "middle",
    pixel_spacing: float | None = None,
) -> list[tuple[str, np.ndarray | None, str | None]]:
    """``(file, image (S, S) float32 or None, error or None)`` per path, in order."""
    from medops.dicom.pixels import preprocess_file

    out: list[tuple[str, np.ndarray | None, str | None]] = []
    for p in paths:
        name = str(p)
        try:
            out.append((name, preprocess_file(Path(p), image_size=image_size, window=window,
                                              frame=frame, pixel_spacing=pixel_spacing), None))
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
                 image_size: int, window: Any, frame: str = "middle",
                 pixel_spacing: float | None = None) -> None:
        if via == "ensemble":
            self.target = ensemble_name(model_name)
            self.items: list[tuple[str, Any, str | None]] = list(read_files(paths))
        elif via == "tensor":
            self.target = model_name
            self.items = list(preprocess_files(paths, image_size=image_size, window=window,
                                               frame=frame, pixel_spacing=pixel_spacing))
        else:
            raise ValueError(f"via must be 'ensemble' or 'tensor', got {via!r}")
        self.via = via
        self.preds = [Prediction(file=f, error=e) for f, _, e in self.items]
        self.todo = [i for i, (_, payload, _) in enumerate(self.items) if payload is not None]
        self.done = len(self.items) - len(self.todo)  # files answered, or known bad before sending

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

    def answer(self, chunk: Sequence[int], probs: Sequence[float], labels: Sequence[str],
               errors: Sequence[str], version: str) -> None:
        for i, prob, label, error in zip(chunk, probs, labels, errors):
            name = self.items[i][0]
            self.preds[i] = (Prediction(file=name, error=error) if error else
                             Prediction(file=name, probability=prob, label=label,
                                        model_version=version))

    def answer_images(self, chunk: Sequence[int], arr: np.ndarray, version: str,
                      threshold: float) -> None:
        probs = [float(p) for p in arr]
        self.answer(chunk, probs, [label_for(p, threshold) for p in probs], [""] * len(chunk),
                    version)


def _inference_failed(target: str, url: str, exc: BaseException) -> ServingError:
    return ServingError(f"inference on {target!r} at {url} failed: {first_line(exc)}")


def predict_files(
    paths: Iterable[Path | str],
    *,
    url: str,
    protocol: Protocol = "grpc",
    model_name: str,
    image_size: int,
    window: Any = None,
    frame: str = "middle",
    pixel_spacing: float | None = None,
    threshold: float | None = None,
    timeout: float = 30.0,
    batch_size: int | None = None,
    via: Via = "ensemble",
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    progress: Callable[[int, int], None] | None = None,
) -> list[Prediction]:
    """Classify DICOM files with the model served by Triton at ``url``.

    Args:
        paths: DICOM files.
        url: ``host:port`` of Triton's gRPC (protocol "grpc") or HTTP (protocol "http") endpoint.
        model_name: the classifier (``serving.model_name``); the ensemble is ``<name>_dicom``.
        image_size: model input size (``ingest.image_size``), for ``via="tensor"``.
        window: VOI window override (``ingest.window``), for ``via="tensor"``; the ensemble
            applies the window it was deployed with.
        frame, pixel_spacing: ``ingest.frame`` and ``ingest.pixel_spacing``, for
            ``via="tensor"`` (the ensemble uses the ones it was deployed with).
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

    Returns:
        One Prediction per path, in order; unusable files carry ``error`` instead of a
        probability.

    Raises:
        ServingError: the server cannot be reached (after the retries), the model is not
            ready, or a request fails.
    """
    plan = _Plan(paths, via=via, model_name=model_name, image_size=image_size, window=window,
                 frame=frame, pixel_spacing=pixel_spacing)
    if not plan.todo:
        return plan.preds
    target = plan.target
    clients = [_client(url, protocol, timeout)]

    def reconnect() -> None:
        clients[0].close()
        clients[0] = _client(url, protocol, timeout)

    def retried(call: Callable[[], T]) -> T:
        return call_with_retries(call, url=url, protocol=protocol, retries=retries,
                                 backoff_s=backoff_s, reconnect=reconnect)

    try:
        retried(lambda: _check_ready(clients[0], url=url, protocol=protocol, model_name=target))
        size = batch_size or retried(lambda: _max_batch_size(clients[0], protocol, target)) or 1
        thresholds = ({"": threshold} if threshold is not None else
                      retried(lambda: served_thresholds(clients[0], protocol, model_name))
                      if via == "tensor" else {})
        for chunk in plan.chunks(size):
            payload = plan.payload(chunk)
            try:
                if via == "ensemble":
                    plan.answer(chunk, *retried(lambda: infer_dicom(
                        clients[0], payload, protocol=protocol, model_name=target,
                        timeout=timeout)))
                else:
                    arr, version = retried(lambda: infer_images(
                        clients[0], payload, protocol=protocol, model_name=target,
                        timeout=timeout))
                    if not knows_threshold(thresholds, version):
                        thresholds = retried(lambda: served_thresholds(clients[0], protocol,
                                                                       model_name))
                    plan.answer_images(chunk, arr, version, threshold_for(thresholds, version))
            except ServingError:
                raise
            except Exception as exc:  # noqa: BLE001 - tritonclient raises its own exception types
                raise _inference_failed(target, url, exc) from None
            plan.report(chunk, progress)
    finally:
        clients[0].close()
    return plan.preds


async def apredict_files(
    paths: Iterable[Path | str],
    *,
    url: str,
    protocol: Protocol = "grpc",
    model_name: str,
    image_size: int,
    window: Any = None,
    frame: str = "middle",
    pixel_spacing: float | None = None,
    threshold: float | None = None,
    timeout: float = 30.0,
    batch_size: int | None = None,
    via: Via = "ensemble",
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    concurrency: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> list[Prediction]:
    """``predict_files`` with asyncio: the same arguments, answers, order and errors, with up to
    ``concurrency`` requests in flight at once on one connection.

    Reading and preprocessing the files (``via="tensor"``) run in a worker thread so the event
    loop stays free.

    Raises:
        ServingError: as ``predict_files``; the first failed request cancels the others.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    plan = await asyncio.to_thread(_Plan, paths, via=via, model_name=model_name,
                                   image_size=image_size, window=window, frame=frame,
                                   pixel_spacing=pixel_spacing)
    if not plan.todo:
        return plan.preds
    target = plan.target
    clients = [_aclient(url, protocol, timeout)]
    lock = asyncio.Lock()

    async def reconnect(seen: Any) -> None:
        # one fresh client for all the requests that failed on the same old one
        async with lock:
            if clients[0] is seen:
                await seen.close()
                clients[0] = _aclient(url, protocol, timeout)

    async def retried(make: Callable[[Any], Awaitable[T]]) -> T:
        used: list[Any] = []

        async def call() -> T:
            used[:] = [clients[0]]
            return await make(clients[0])

        return await acall_with_retries(call, url=url, protocol=protocol, retries=retries,
                                        backoff_s=backoff_s,
                                        reconnect=lambda: reconnect(used[0]))

    try:
        await retried(lambda c: _acheck_ready(c, url=url, protocol=protocol, model_name=target))

        async def max_batch(c: Any) -> int:
            return _max_batch_size_of(await c.get_model_config(target), protocol)

        size = batch_size or await retried(max_batch) or 1
        thresholds = ({"": threshold} if threshold is not None else
                      await retried(lambda c: aserved_thresholds(c, protocol, model_name))
                      if via == "tensor" else {})
        gate = asyncio.Semaphore(concurrency)

        async def send(chunk: list[int]) -> None:
            payload = plan.payload(chunk)
            async with gate:
                try:
                    if via == "ensemble":
                        plan.answer(chunk, *await retried(lambda c: ainfer_dicom(
                            c, payload, protocol=protocol, model_name=target, timeout=timeout)))
                    else:
                        arr, version = await retried(lambda c: ainfer_images(
                            c, payload, protocol=protocol, model_name=target, timeout=timeout))
                        if not knows_threshold(thresholds, version):
                            fresh = await retried(
                                lambda c: aserved_thresholds(c, protocol, model_name))
                            thresholds.clear()
                            thresholds.update(fresh)
                        plan.answer_images(chunk, arr, version,
                                           threshold_for(thresholds, version))
                except ServingError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise _inference_failed(target, url, exc) from None
                plan.report(chunk, progress)

        tasks = [asyncio.ensure_future(send(chunk)) for chunk in plan.chunks(size)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await clients[0].close()
    return plan.preds


def format_predictions(preds: Sequence[Prediction]) -> str:
    """A plain-text table: file, label, probability, model version, error."""
    header = ("file", "label", "probability", "version", "error")
    rows = [
        (p.file, p.label or "-", "-" if p.probability is None else f"{p.probability:.4f}",
         p.model_version or "-", p.error or "")
        for p in preds
    ]
    widths = [max(len(h), *(len(r[c]) for r in rows)) if rows else len(h)
              for c, h in enumerate(header)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    return "\n".join(out)


def to_json_lines(preds: Sequence[Prediction]) -> str:
    """One JSON object per line, one line per file (``medops predict --json``): ``file``,
    ``probability``, ``label`` and ``model_version`` for an answer, ``file`` and ``error`` else."""
    return "".join(json.dumps(p.model_dump(mode="json", exclude_none=True), sort_keys=True) + "\n"
                   for p in preds)
