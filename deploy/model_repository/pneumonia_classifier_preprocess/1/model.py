"""Triton Python-backend model: raw DICOM bytes -> the classifier's input image, per item.

Copied as ``model.py`` into ``<name>_preprocess/1/``. It calls
``medops.dicom.pixels.preprocess_bytes``, the same preprocessing ingest used for training, so the
served model sees an image exactly as training did (the stub runs in the medops environment).

A file that cannot be used (not DICOM, truncated, too many bytes or pixels, ...) is answered with a
zero image and ``error = "<quarantine reason>: <message>"`` for that item; the other items of the
batch are unaffected and the request does not fail, whatever the item raises (a decoder written in
Rust can raise what is no ``Exception``). The limits are checked before decoding, and the byte
limit also bounds what a deflated file may inflate to, so an oversized upload or a deflate bomb
costs no decoding work.

With the ``record`` parameter (``serving.record``) it also answers ``drift_features``: per item, a
JSON object of non-identifying header fields and statistics of the prepared image
(``medops.drift.item_features``), which the postprocessing model logs with the classifier's answer. A
failure there costs that item its features ({"error": "features_failed"}), never the request.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from medops.errors import PROCESS_EXITS, QuarantineReason, first_line
from medops.serving.contract import DICOM_INPUT, DRIFT_TENSOR, ERROR_OUTPUT, preprocessing_from_parameters
from medops.serving.contract import INPUT_NAME as IMAGE_OUTPUT  # the classifier's input

if TYPE_CHECKING:
    from medops.config import PreprocessSpec

TOO_LARGE = QuarantineReason.TOO_LARGE.value


class Limits:
    """What one item may cost: encoded bytes, and decoded pixels (rows x columns x frames x samples)."""

    def __init__(self, max_bytes: int, max_pixels: int) -> None:
        self.max_bytes, self.max_pixels = int(max_bytes), int(max_pixels)


def check_limits(data: bytes, limits: Limits) -> str | None:
    """Why ``data`` is refused before decoding, or None. Reads only the header for the pixel count."""
    try:
        return read_within_limits(data, limits)[0]
    except Exception:  # noqa: BLE001 - unreadable: its proper reason comes from preprocessing
        return None


def _pixel_refusal(ds: Any, limits: Limits) -> str | None:
    try:
        dims = [int(ds.get(k, 1) or 1) for k in ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel")]
    except Exception:  # noqa: BLE001 - an unreadable description gets its reason from decoding
        return None
    pixels = int(np.prod(dims, dtype=np.int64))
    if pixels > limits.max_pixels:
        return (f"{TOO_LARGE}: {dims[0]}x{dims[1]} pixels x {dims[2]} frames x {dims[3]} samples = "
                f"{pixels} values, over the limit of {limits.max_pixels}")
    return None


def read_within_limits(data: bytes, limits: Limits) -> tuple[str | None, Any]:
    """``(why data is refused before decoding or None, its data set or None)``, reading the
    file once (``medops.dicom.io.read_dataset``, values parsed when used, as ingest reads).
    The byte limit is checked first, and bounds what a deflated file may inflate to (checked
    before inflating it); the pixel limit is checked from the header, before any decoding.

    Raises:
        DicomReadError: the file cannot be read (not DICOM, truncated, no pixel data, ...).
    """
    if len(data) > limits.max_bytes:
        return f"{TOO_LARGE}: {len(data)} bytes, over the limit of {limits.max_bytes} bytes", None
    from medops.dicom.io import inflated_size_refusal, read_dataset

    inflated = inflated_size_refusal(io.BytesIO(data), limits.max_bytes)
    if inflated:  # before read_dataset, which would inflate it whole
        return f"{TOO_LARGE}: {inflated}", None
    ds = read_dataset(data, parse_all=False)
    return _pixel_refusal(ds, limits), ds


def preprocess_items(items: list[bytes], spec: "PreprocessSpec", limits: Limits,
                     headers: list | None = None) -> tuple[np.ndarray, list[str]]:
    """Preprocess each DICOM byte string as ``spec`` says. Returns ``(images (n, S, S, 1) float32,
    errors)``, where ``errors[i]`` is "" for a usable item and the reason otherwise (its image is
    zeros). ``headers``: a list to receive each item's header fields for the drift record
    (``medops.drift.header_features`` of the data set as read; None where none was read), which
    the drift features reuse. The data sets themselves are not kept: a batch of them held until
    recording made Python's garbage collector walk them, 0.2 ms a file. Each file is read once:
    limits, header and pixels from one read."""
    from medops.dicom import pixels
    from medops.errors import DicomReadError

    size = spec.image_size
    images = np.zeros((len(items), size, size, 1), dtype=np.float32)
    errors = [""] * len(items)
    for i, data in enumerate(items):
        header = None
        try:
            refused, header = read_within_limits(data, limits)
            if refused:
                errors[i] = refused
            else:
                images[i, ..., 0] = pixels.prepare_image(header, spec)
        except DicomReadError as exc:
            errors[i] = f"{exc.reason.value}: {exc}"
        except Exception as exc:  # noqa: BLE001 - never fail the batch for one file
            errors[i] = f"decode_error: {type(exc).__name__}: {exc}"
        except PROCESS_EXITS:
            raise
        except BaseException as exc:  # e.g. a native library's panic: still this item's failure
            errors[i] = f"decode_error: {type(exc).__name__}: {first_line(exc)}"
        if headers is not None:
            headers.append(_header_fields(header))
    return images, errors


def _header_fields(header: Any) -> dict | None:
    """``medops.drift.header_features`` of a data set read here (None: none was read, or its
    fields cannot be taken; the drift record then reads the header again)."""
    if header is None:
        return None
    from medops.drift import header_features

    try:
        return header_features(header)
    except PROCESS_EXITS:
        raise
    except BaseException:  # noqa: BLE001 - drift features never fail a request
        return None


def feature_records(items: list[bytes], images: np.ndarray, errors: list[str],
                    headers: list | None = None) -> list[dict]:
    """``medops.drift.item_features`` of each item; an item whose features cannot be computed
    gets ``{"error": "features_failed"}``. ``headers``: the header fields ``preprocess_items``
    took (the files' headers are not read again)."""
    from medops.drift import image_features_batch, item_features

    out = []
    headers = headers if headers is not None else [None] * len(items)
    answered = [i for i, e in enumerate(errors) if not e]
    try:  # the image statistics of the whole batch at once (the same numbers as one by one)
        stats = dict(zip(answered, image_features_batch(images[answered])))
    except PROCESS_EXITS:
        raise
    except BaseException:  # noqa: BLE001 - then item by item below
        stats = {}
    for i, (data, image, error, header) in enumerate(zip(items, images, errors, headers)):
        try:
            out.append(item_features(data, image, error, fields=header, stats=stats.get(i)))
        except PROCESS_EXITS:
            raise
        except BaseException:  # noqa: BLE001 - drift features never fail a request
            out.append({"error": "features_failed"})
    return out


def drift_features(items: list[bytes], images: np.ndarray, errors: list[str],
                   headers: list | None = None) -> np.ndarray:
    """:func:`feature_records` as JSON bytes, an ``(n, 1)`` object array (TYPE_STRING)."""
    out = []
    for record in feature_records(items, images, errors, headers):
        try:
            out.append(json.dumps(record, separators=(",", ":"), allow_nan=False).encode())
        except (TypeError, ValueError):  # never fail a request for its features
            out.append(b'{"error":"features_failed"}')
    return np.array(out, dtype=np.object_).reshape(-1, 1)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.spec = preprocessing_from_parameters(params)  # rendered from the EnsembleContract
        self.limits = Limits(params["max_bytes"], params["max_pixels"])
        self.record = params.get("record") == "true"

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, DICOM_INPUT).as_numpy()
                items = [bytes(x) for x in raw.reshape(-1)]
                headers: list | None = [] if self.record else None
                images, errors = preprocess_items(items, self.spec, self.limits, headers)
                err = np.array([e.encode() for e in errors], dtype=np.object_).reshape(-1, 1)
                outputs = [pb_utils.Tensor(IMAGE_OUTPUT, images), pb_utils.Tensor(ERROR_OUTPUT, err)]
                if self.record:
                    outputs.append(pb_utils.Tensor(DRIFT_TENSOR,
                                                   drift_features(items, images, errors, headers)))
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except PROCESS_EXITS:
                raise
            except BaseException as exc:  # noqa: BLE001 - one response per request, always
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"preprocessing failed: {type(exc).__name__}: "
                                               f"{first_line(exc)}")))
        return responses
