"""Ask a running Triton about DICOM files.

By default the files' bytes go to the DICOM ensemble (``<model>_dicom``), whose preprocessing
model runs ``medops.dicom.pixels.preprocess_bytes`` on the server: the same function ingest used
to build the training arrays, so a file is seen by the served model as it was seen in training,
whichever client sends it. ``via="tensor"`` preprocesses here with the same module and sends image
tensors to the classifier. A file that cannot be used becomes a ``Prediction`` with ``error`` set;
the other files are still answered. A server that cannot be reached, or a model that is not
ready, is a ServingError.

Imports neither TensorFlow nor the Triton client libraries until a prediction is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
from pydantic import BaseModel

from medops.errors import DicomReadError, MedopsError, QuarantineReason, ServingError
from medops.serving.contract import (
    DICOM_INPUT,
    ERROR_OUTPUT,
    INPUT_NAME,
    LABEL_OUTPUT,
    LABELS,
    OUTPUT_NAME,
    ensemble_name,
)

Protocol = Literal["grpc", "http"]
Via = Literal["ensemble", "tensor"]


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


def _max_batch_size(client: Any, protocol: Protocol, model_name: str) -> int:
    if protocol == "grpc":
        return int(client.get_model_config(model_name).config.max_batch_size)
    return int(client.get_model_config(model_name).get("max_batch_size", 0))


def served_threshold(client: Any, protocol: Protocol, model_name: str, default: float = 0.5) -> float:
    """The decision threshold the served model was deployed with (its postprocessing model's
    ``threshold`` parameter), or ``default`` when there is none."""
    name = f"{model_name}_postprocess"
    try:
        config = client.get_model_config(name)
        if protocol == "grpc":
            value = config.config.parameters["threshold"].string_value
        else:
            value = config["parameters"]["threshold"]["string_value"]
        return float(value)
    except Exception:  # noqa: BLE001 - no postprocessing model deployed: the documented default
        return default


def _check_ready(client: Any, *, url: str, protocol: Protocol, model_name: str) -> None:
    try:
        live = client.is_server_live()
    except Exception as exc:  # noqa: BLE001 - every transport failure means the same to a user
        raise ServingError(
            f"cannot reach Triton at {url} over {protocol}: {_short(exc)}; is the server running "
            "(`medops serve start`) and is the url right?"
        ) from None
    if not live:
        raise ServingError(f"Triton at {url} is not live")
    try:
        ready = client.is_model_ready(model_name)
    except Exception as exc:  # noqa: BLE001
        raise ServingError(f"Triton at {url} could not report on model {model_name!r}: {_short(exc)}") from None
    if not ready:
        raise ServingError(
            f"model {model_name!r} is not loaded or not ready on Triton at {url}; deploy it first "
            "(`medops deploy`)"
        )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
    if protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    inp = tc.InferInput(INPUT_NAME, list(images.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    out = tc.InferRequestedOutput(OUTPUT_NAME)
    if protocol == "grpc":
        result = client.infer(model_name, [inp], model_version=model_version, outputs=[out],
                              client_timeout=timeout)
        version = result.get_response().model_version
    else:
        result = client.infer(model_name, [inp], model_version=model_version, outputs=[out],
                              timeout=int(timeout * 1e6))
        version = result.get_response().get("model_version", "")
    probs = result.as_numpy(OUTPUT_NAME)
    if probs is None or probs.shape[0] != images.shape[0]:
        raise ServingError(
            f"model {model_name!r} answered output {OUTPUT_NAME!r} with shape "
            f"{None if probs is None else list(probs.shape)} for {images.shape[0]} images"
        )
    return probs.reshape(images.shape[0]), str(version)


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
    if protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    data = np.array([bytes(b) for b in items], dtype=np.object_).reshape(-1, 1)
    inp = tc.InferInput(DICOM_INPUT, list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    outs = [tc.InferRequestedOutput(n) for n in (OUTPUT_NAME, LABEL_OUTPUT, ERROR_OUTPUT)]
    if protocol == "grpc":
        result = client.infer(model_name, [inp], outputs=outs, client_timeout=timeout)
        version = result.get_response().model_version
    else:
        result = client.infer(model_name, [inp], outputs=outs, timeout=int(timeout * 1e6))
        version = result.get_response().get("model_version", "")
    probs = result.as_numpy(OUTPUT_NAME).reshape(-1)
    labels = [_text(x) for x in result.as_numpy(LABEL_OUTPUT).reshape(-1)]
    errors = [_text(x) for x in result.as_numpy(ERROR_OUTPUT).reshape(-1)]
    return [float(p) for p in probs], labels, errors, str(version)


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
    paths: Iterable[Path | str], *, image_size: int, window: Any = None
) -> list[tuple[str, np.ndarray | None, str | None]]:
    """``(file, image (S, S) float32 or None, error or None)`` per path, in order."""
    from medops.dicom.pixels import preprocess_file

    out: list[tuple[str, np.ndarray | None, str | None]] = []
    for p in paths:
        name = str(p)
        try:
            out.append((name, preprocess_file(Path(p), image_size=image_size, window=window), None))
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


def predict_files(
    paths: Iterable[Path | str],
    *,
    url: str,
    protocol: Protocol = "grpc",
    model_name: str,
    image_size: int,
    window: Any = None,
    threshold: float | None = None,
    timeout: float = 30.0,
    batch_size: int | None = None,
    via: Via = "ensemble",
) -> list[Prediction]:
    """Classify DICOM files with the model served by Triton at ``url``.

    Args:
        paths: DICOM files.
        url: ``host:port`` of Triton's gRPC (protocol "grpc") or HTTP (protocol "http") endpoint.
        model_name: the classifier (``serving.model_name``); the ensemble is ``<name>_dicom``.
        image_size: model input size (``ingest.image_size``), for ``via="tensor"``.
        window: VOI window override (``ingest.window``), for ``via="tensor"``; the ensemble
            applies the window it was deployed with.
        threshold: probability at or above which the label is "pneumonia", for
            ``via="tensor"``; default: the threshold the served model was deployed with (the
            ensemble always labels with that one).
        timeout: seconds per request.
        batch_size: files per request; default the model's max_batch_size.
        via: "ensemble" (default): send the files' bytes to the DICOM ensemble, which
            preprocesses on the server; "tensor": preprocess here with the same
            ``medops.dicom.pixels`` and send image tensors to the classifier.

    Returns:
        One Prediction per path, in order; unusable files carry ``error`` instead of a
        probability.

    Raises:
        ServingError: the server cannot be reached, the model is not ready, or a request fails.
    """
    if via == "ensemble":
        target = ensemble_name(model_name)
        items: list[tuple[str, Any, str | None]] = list(read_files(paths))
    elif via == "tensor":
        target = model_name
        items = list(preprocess_files(paths, image_size=image_size, window=window))
    else:
        raise ValueError(f"via must be 'ensemble' or 'tensor', got {via!r}")
    preds = [Prediction(file=f, error=e) for f, _, e in items]
    todo = [i for i, (_, payload, _) in enumerate(items) if payload is not None]
    if not todo:
        return preds
    client = _client(url, protocol, timeout)
    try:
        _check_ready(client, url=url, protocol=protocol, model_name=target)
        size = batch_size or _max_batch_size(client, protocol, target) or 1
        if via == "tensor" and threshold is None:
            threshold = served_threshold(client, protocol, model_name)
        weights = [len(items[i][1]) if via == "ensemble" else 0 for i in todo]
        for chunk in chunk_requests(todo, weights, max_items=size, max_bytes=MAX_REQUEST_BYTES):
            try:
                if via == "ensemble":
                    probs, labels, errors, version = infer_dicom(
                        client, [items[i][1] for i in chunk], protocol=protocol,
                        model_name=target, timeout=timeout)
                else:
                    images = np.stack([items[i][1] for i in chunk])[..., np.newaxis]
                    arr, version = infer_images(client, images, protocol=protocol,
                                                model_name=target, timeout=timeout)
                    probs = [float(p) for p in arr]
                    labels = [label_for(p, threshold) for p in probs]
                    errors = [""] * len(chunk)
            except ServingError:
                raise
            except Exception as exc:  # noqa: BLE001 - tritonclient raises its own exception types
                raise ServingError(f"inference on {target!r} at {url} failed: {_short(exc)}") from None
            for i, prob, label, error in zip(chunk, probs, labels, errors):
                preds[i] = (Prediction(file=items[i][0], error=error) if error else
                            Prediction(file=items[i][0], probability=prob, label=label,
                                       model_version=version))
    finally:
        client.close()
    return preds


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
    """One JSON object per line, one line per file."""
    return "".join(json.dumps(p.model_dump(mode="json"), sort_keys=True) + "\n" for p in preds)
