"""Triton Python-backend model: the exported ONNX classifier run by onnxruntime on the CPU.

Copied as ``model.py`` into each version folder of the embedded model repository, beside
``model.onnx``. The tritonserver in the nvidia-pytriton wheel has only the Python backend; in
production the same ONNX file is served by Triton's onnxruntime backend instead.

All requests of a dynamic batch go through one ``session.run``; each request gets exactly one
response, and a request that cannot be answered gets an error response instead of failing the batch
or the model. The batching logic (``classify_batch``) is plain numpy and is tested without Triton.
A model exported with the OOD guard answers ``probability``, ``ood_score`` and ``in_distribution``
from its one graph; an older model (``probability`` only) is still served: ``unguarded`` fills in
``ood_score`` NaN and ``in_distribution`` true.
Needs only numpy and onnxruntime.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAME = "probability"
OOD_SCORE = "ood_score"
IN_DISTRIBUTION = "in_distribution"
OUTPUTS = (OUTPUT_NAME, OOD_SCORE, IN_DISTRIBUTION)  # what config.pbtxt declares, in this order


def unguarded(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The answer of a model exported before the OOD guard: its probabilities, ``ood_score``
    NaN (no score: clients report null) and ``in_distribution`` true (nothing to flag)."""
    probs = np.asarray(probabilities, dtype=np.float32).reshape(-1, 1)
    return probs, np.full_like(probs, np.nan), np.ones(probs.shape, dtype=bool)


def classify_batch(
    run: Callable[[np.ndarray], np.ndarray | tuple[np.ndarray, ...]],
    images: list[np.ndarray],
    item_shape: tuple[int, ...],
) -> list[np.ndarray | tuple[np.ndarray, ...] | str]:
    """Classify the images of several requests with one call to ``run``.

    Args:
        run: maps a float32 array ``(N, *item_shape)`` to probabilities ``(N, 1)``, or to a tuple
            of ``(N, 1)`` arrays (probability, ood_score, in_distribution).
        images: one array per request, each ``(n_i, *item_shape)``.
        item_shape: the per-item input shape, e.g. ``(28, 28, 1)``.

    Returns:
        One entry per request, in order: its ``(n_i, 1)`` float32 probabilities (a tuple of its
        rows of each output, when ``run`` returns a tuple), or a message saying why that request
        could not be answered.
    """
    answers: list[np.ndarray | tuple[np.ndarray, ...] | str] = [""] * len(images)
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
        out = run(batch)
        several = isinstance(out, tuple)
        outs = [np.asarray(o).reshape(len(batch), 1) for o in (out if several else (out,))]
        outs[0] = outs[0].astype(np.float32, copy=False)
    except Exception as exc:  # noqa: BLE001 - reported to every affected request
        for i in good:
            answers[i] = f"inference failed: {type(exc).__name__}: {exc}"
        return answers
    start = 0
    for i in good:
        n = len(images[i])
        rows = tuple(o[start:start + n] for o in outs)
        answers[i] = rows if several else rows[0]
        start += n
    return answers


class Classifier:
    """An ONNX classifier file run by onnxruntime on the CPU, as Triton's model instances run it
    (this backend, and the embedded postprocessing model, which runs it inline)."""

    def __init__(self, path: str, config: dict) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # One Triton instance per CPU core (serving.instances): one thread each, no oversubscribing.
        opts.intra_op_num_threads = int(os.environ.get("MEDOPS_ORT_THREADS", "1"))
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        shape = self.session.get_inputs()[0].shape
        self.item_shape = tuple(int(d) for d in shape[1:])
        # a model exported with the OOD guard answers all three; an older one the probability only
        self.guarded = set(OUTPUTS) <= {o.name for o in self.session.get_outputs()}
        # Warm up at the largest batch Triton will form (as the production flavour's model_warmup
        # does): onnxruntime's memory arena reaches its full size at load, not in steps of a few
        # MB whenever a larger batch than any before arrives, which looked like a leak in the soak.
        largest = int(config.get("max_batch_size") or 0)
        if largest > 0 and all(d > 0 for d in self.item_shape):
            self.run(np.zeros((largest, *self.item_shape), np.float32))
        # Fail the load (Triton keeps serving the previous version) rather than every request.
        # (A model that prepares the images itself declares no image input: it checks its own.)
        declared = next((i for i in config.get("input", []) if i["name"] == INPUT_NAME), None)
        if declared is not None and tuple(int(d) for d in declared["dims"]) != self.item_shape:
            raise ValueError(
                f"model.onnx input {INPUT_NAME!r} has item shape {list(self.item_shape)}, "
                f"config.pbtxt declares {declared['dims']}"
            )

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.guarded:
            return tuple(self.session.run(list(OUTPUTS), {INPUT_NAME: batch}))
        return unguarded(self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])


class TritonPythonModel:
    """The Python-backend entry points Triton calls: initialize, execute, finalize."""

    def initialize(self, args: dict) -> None:
        # Triton hands the version folder via these args; model.onnx lies beside this file.
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.classifier = Classifier(os.path.join(version_dir, "model.onnx"),
                                     json.loads(args["model_config"]))
        self.session, self.item_shape = self.classifier.session, self.classifier.item_shape

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return self.classifier.run(batch)

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        images = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy() for r in requests]
        responses = []
        for answer in classify_batch(self._run, images, self.item_shape):
            if isinstance(answer, str):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(answer)))
            else:
                probs, scores, inside = answer
                outs = [pb_utils.Tensor(OUTPUT_NAME, probs.astype(np.float32)),
                        pb_utils.Tensor(OOD_SCORE, scores.astype(np.float32)),
                        pb_utils.Tensor(IN_DISTRIBUTION, inside.astype(bool))]
                responses.append(pb_utils.InferenceResponse(output_tensors=outs))
        return responses

    def finalize(self) -> None:
        self.session = self.classifier = None
