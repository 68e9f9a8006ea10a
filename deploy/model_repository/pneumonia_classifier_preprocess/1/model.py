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
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING

import numpy as np

from medops.errors import PROCESS_EXITS, QuarantineReason, first_line
from medops.serving.contract import DICOM_INPUT, ERROR_OUTPUT, preprocessing_from_parameters
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
    if len(data) > limits.max_bytes:
        return f"{TOO_LARGE}: {len(data)} bytes, over the limit of {limits.max_bytes} bytes"
    import pydicom

    from medops.dicom.io import inflated_size_refusal

    inflated = inflated_size_refusal(io.BytesIO(data), limits.max_bytes)
    if inflated:  # before dcmread below, which would inflate it whole
        return f"{TOO_LARGE}: {inflated}"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        dims = [int(ds.get(k, 1) or 1) for k in ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel")]
    except Exception:  # noqa: BLE001 - unreadable headers get their proper reason from preprocessing
        return None
    pixels = int(np.prod(dims, dtype=np.int64))
    if pixels > limits.max_pixels:
        return (f"{TOO_LARGE}: {dims[0]}x{dims[1]} pixels x {dims[2]} frames x {dims[3]} samples = "
                f"{pixels} values, over the limit of {limits.max_pixels}")
    return None


def preprocess_items(items: list[bytes], spec: "PreprocessSpec",
                     limits: Limits) -> tuple[np.ndarray, list[str]]:
    """Preprocess each DICOM byte string as ``spec`` says. Returns ``(images (n, S, S, 1) float32,
    errors)``, where ``errors[i]`` is "" for a usable item and the reason otherwise (its image is
    zeros)."""
    from medops.dicom.pixels import preprocess_bytes
    from medops.errors import PROCESS_EXITS, DicomReadError, first_line

    size = spec.image_size
    images = np.zeros((len(items), size, size, 1), dtype=np.float32)
    errors = [""] * len(items)
    for i, data in enumerate(items):
        refused = check_limits(data, limits)
        if refused:
            errors[i] = refused
            continue
        try:
            images[i, ..., 0] = preprocess_bytes(data, spec)
        except DicomReadError as exc:
            errors[i] = f"{exc.reason.value}: {exc}"
        except Exception as exc:  # noqa: BLE001 - never fail the batch for one file
            errors[i] = f"decode_error: {type(exc).__name__}: {exc}"
        except PROCESS_EXITS:
            raise
        except BaseException as exc:  # e.g. a native library's panic: still this item's failure
            errors[i] = f"decode_error: {type(exc).__name__}: {first_line(exc)}"
    return images, errors


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.spec = preprocessing_from_parameters(params)  # rendered from the EnsembleContract
        self.limits = Limits(params["max_bytes"], params["max_pixels"])

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, DICOM_INPUT).as_numpy()
                items = [bytes(x) for x in raw.reshape(-1)]
                images, errors = preprocess_items(items, self.spec, self.limits)
                err = np.array([e.encode() for e in errors], dtype=np.object_).reshape(-1, 1)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(IMAGE_OUTPUT, images), pb_utils.Tensor(ERROR_OUTPUT, err)]))
            except PROCESS_EXITS:
                raise
            except BaseException as exc:  # noqa: BLE001 - one response per request, always
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"preprocessing failed: {type(exc).__name__}: "
                                               f"{first_line(exc)}")))
        return responses
