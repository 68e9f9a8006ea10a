"""Triton Python-backend model: the exported ONNX classifier run by onnxruntime on the CPU.

Copied as ``model.py`` into each version folder of the embedded model repository, beside
``model.onnx``. The tritonserver in the nvidia-pytriton wheel has only the Python backend; in
production the same ONNX file is served by Triton's onnxruntime backend instead.

All requests of a dynamic batch go through one ``session.run``; each request gets exactly one
response, and a request that cannot be answered gets an error response instead of failing the batch
or the model. The batching logic (``classify_batch``) is plain numpy and is tested without Triton.
Needs only numpy and onnxruntime.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAME = "probability"


def classify_batch(
    run: Callable[[np.ndarray], np.ndarray],
    images: list[np.ndarray],
    item_shape: tuple[int, ...],
) -> list[np.ndarray | str]:
    """Classify the images of several requests with one call to ``run``.

    Args:
        run: maps a float32 array ``(N, *item_shape)`` to probabilities ``(N, 1)``.
        images: one array per request, each ``(n_i, *item_shape)``.
        item_shape: the per-item input shape, e.g. ``(28, 28, 1)``.

    Returns:
        One entry per request, in order: its ``(n_i, 1)`` float32 probabilities, or a message
        saying why that request could not be answered.
    """
    answers: list[np.ndarray | str] = [""] * len(images)
    good: list[int] = []
    for i, img in enumerate(images):
        if img.ndim != len(item_shape) + 1 or tuple(img.shape[1:]) != tuple(item_shape):
            answers[i] = f"input {INPUT_NAME!r} has shape {list(img.shape)}, expected [-1, {', '.join(map(str, item_shape))}]"
        elif not np.isfinite(img).all():
            answers[i] = f"input {INPUT_NAME!r} contains NaN or infinite values"
        else:
            good.append(i)
    if not good:
        return answers
    batch = np.concatenate([images[i].astype(np.float32, copy=False) for i in good])
    try:
        probs = np.asarray(run(batch), dtype=np.float32).reshape(len(batch), 1)
    except Exception as exc:  # noqa: BLE001 - reported to every affected request
        for i in good:
            answers[i] = f"inference failed: {type(exc).__name__}: {exc}"
        return answers
    start = 0
    for i in good:
        n = len(images[i])
        answers[i] = probs[start:start + n]
        start += n
    return answers


class TritonPythonModel:
    """The Python-backend entry points Triton calls: initialize, execute, finalize."""

    def initialize(self, args: dict) -> None:
        import onnxruntime as ort

        # Triton hands the version folder via these args; model.onnx lies beside this file.
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        opts = ort.SessionOptions()
        # One Triton instance per CPU core budget: keep onnxruntime from oversubscribing it.
        opts.intra_op_num_threads = int(os.environ.get("MEDOPS_ORT_THREADS", "1"))
        self.session = ort.InferenceSession(
            os.path.join(version_dir, "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        shape = self.session.get_inputs()[0].shape
        self.item_shape = tuple(int(d) for d in shape[1:])
        # Fail the load (Triton keeps serving the previous version) rather than every request.
        config = json.loads(args["model_config"])
        declared = next(i for i in config["input"] if i["name"] == INPUT_NAME)
        if tuple(int(d) for d in declared["dims"]) != self.item_shape:
            raise ValueError(
                f"model.onnx input {INPUT_NAME!r} has item shape {list(self.item_shape)}, "
                f"config.pbtxt declares {declared['dims']}"
            )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        images = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy() for r in requests]
        responses = []
        for answer in classify_batch(self._run, images, self.item_shape):
            if isinstance(answer, str):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(answer)))
            else:
                out = pb_utils.Tensor(OUTPUT_NAME, answer)
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self) -> None:
        self.session = None
