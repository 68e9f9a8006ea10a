"""Triton Python-backend model: the answer -> a label (and the drift record), per item.

Copied as ``model.py`` into ``<name>_postprocess/<N>/``, one version per classifier version: version
N labels at the ``threshold.N`` parameter (the threshold classifier version N was deployed with),
so the ensemble, pinned to classifier N and postprocess N, switches probability and label in one
load. Without a ``threshold.N`` parameter the ``threshold`` one applies (the production template,
one version for whatever classifier is latest). With ``ood_action`` "withhold", an item the OOD
guard calls out of distribution gets an empty label too (the client reports label null and why).
An item that preprocessing could not use (non-empty ``error``) gets an empty label: its
probability is that of a blank image and means nothing.

Embedded (a ``dicom`` input and a ``classifier`` parameter), this model is the whole DICOM path,
the ensemble's one step: it preprocesses the files of every request it is handed
(``dicom_preprocess.preprocess_items``, the training preprocessing, with the preprocessing
parameters and limits), runs ``<classifier>/N/model.onnx`` of the same repository (version N:
``onnx_classifier.Classifier``) once on all their images, labels them and records them, and
answers the ensemble's outputs; no tensor crosses a process between the steps. In production the
preprocessing model and the classifier (onnxruntime backend, GPU) are steps of their own and this
model takes their outputs.

With the ``record_dir`` parameter (``serving.record``) it appends one drift record per item
(``medops.drift.answer_record`` of the preprocessing model's ``drift_features`` and the answer) to
``<record_dir>/requests.jsonl`` (``medops.drift.RequestLog``: locked appends, rotated at
``record_max_bytes``), one append for all requests of a batch. Recording never fails an answer:
a recording error is logged (Triton's log).

All requests Triton hands over in one call (dynamic batching) are classified with one
onnxruntime call and labelled together; a request whose tensors cannot be read gets an error
response, the others their answers.
"""

from __future__ import annotations

import json
import os

import numpy as np

PROBABILITY_INPUT = "probability"
IN_DISTRIBUTION_INPUT = "in_distribution"
OOD_SCORE_INPUT = "ood_score"
IMAGE_INPUT = "image"
DICOM_INPUT = "dicom"
ERROR_INPUT = "error"
DRIFT_INPUT = "drift_features"
LABEL_OUTPUT = "label"
ANSWERS = (PROBABILITY_INPUT, OOD_SCORE_INPUT, IN_DISTRIBUTION_INPUT)


def label_items(probabilities: np.ndarray, errors: list[bytes], *, threshold: float,
                labels: tuple[str, str], in_distribution: np.ndarray | None = None,
                withhold: bool = False) -> np.ndarray:
    """``labels[1]`` where probability >= threshold, else ``labels[0]``; b"" for errored items,
    and with ``withhold`` also for items not ``in_distribution`` (serving.ood_action: withhold).

    Returns an ``(n, 1)`` object array of bytes, as Triton's TYPE_STRING wants.
    """
    probs = np.asarray(probabilities, dtype=np.float32).reshape(-1)
    inside = (np.ones(len(probs), dtype=bool) if in_distribution is None or not withhold
              else np.asarray(in_distribution, dtype=bool).reshape(-1))
    out = [b"" if err or not ok else labels[int(p >= threshold)].encode()
           for p, err, ok in zip(probs, errors, inside)]
    return np.array(out, dtype=np.object_).reshape(-1, 1)


def classify_requests(run, requests: list[dict], item_shape: tuple[int, ...]) -> None:
    """Add the classifier's answers (``probability``, ``ood_score``, ``in_distribution``) to each
    request's tensors ``{name: array}``, all images through one ``run`` (``classify_batch``); a
    request that cannot be classified is replaced by the message saying why."""
    from medops.serving.backends.onnx_classifier import classify_batch

    good = [i for i, r in enumerate(requests) if isinstance(r, dict)]
    answers = classify_batch(run, [requests[i][IMAGE_INPUT] for i in good], item_shape)
    for i, answer in zip(good, answers):
        if isinstance(answer, str):
            requests[i] = answer
        else:
            requests[i].update(zip(ANSWERS, answer))


def drift_records(requests: list) -> list[dict]:
    """The drift records of every answered request's items, in order (``build_records``)."""
    from medops.serving.backends.drift_recorder import build_records

    records: list[dict] = []
    for r in requests:
        if isinstance(r, dict) and r.get(DRIFT_INPUT) is not None:
            records += build_records(r[DRIFT_INPUT], r[PROBABILITY_INPUT], r.get(OOD_SCORE_INPUT))
    return records


def answer_files(files: list[list[bytes] | None], spec, limits, run, *, threshold: float,
                 labels: tuple[str, str], withhold: bool = False,
                 record: bool = False) -> tuple[list[dict | str | None], list[dict]]:
    """The embedded DICOM path for the files of several requests (None: a request that could
    not be read) at once: preprocess every file, one ``run`` (the classifier) for all images,
    label. Returns each request's outputs (``{name: (n, 1) array}``, the ensemble's outputs;
    a message when classification failed; None where its files were None) and, with
    ``record``, the drift records of all answered files in order."""
    from medops.drift import answer_record
    from medops.serving.backends.dicom_preprocess import feature_records, preprocess_items

    flat = [d for f in files if f is not None for d in f]
    headers: list | None = [] if record else None
    images, errors = preprocess_items(flat, spec, limits, headers)
    answers: list[dict | str | None] = [None] * len(files)
    try:
        probs, ood, inside = (np.asarray(o).reshape(len(flat), 1) for o in run(images)) if flat \
            else (np.zeros((0, 1), np.float32),) * 3
    except Exception as exc:  # noqa: BLE001 - reported to every request of the batch
        return [None if f is None else f"inference failed: {type(exc).__name__}: {exc}"
                for f in files], []
    encoded = [e.encode() for e in errors]
    labelled = label_items(probs, encoded, threshold=threshold, labels=labels,
                           in_distribution=inside, withhold=withhold)
    start = 0
    for i, f in enumerate(files):
        if f is None:
            continue
        rows = slice(start, start + len(f))
        answers[i] = {PROBABILITY_INPUT: probs[rows].astype(np.float32),
                      OOD_SCORE_INPUT: ood[rows].astype(np.float32),
                      IN_DISTRIBUTION_INPUT: inside[rows].astype(bool), LABEL_OUTPUT: labelled[rows],
                      ERROR_INPUT: np.array(encoded[rows], dtype=np.object_).reshape(-1, 1)}
        start += len(f)
    records = []
    if record:
        features = feature_records(flat, images, errors, headers)
        records = [answer_record(r, float(p), float(o))
                   for r, p, o in zip(features, probs.reshape(-1), ood.reshape(-1))]
    return answers, records


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        key = f"threshold.{args['model_version']}"
        self.threshold = float(params[key] if key in params else params["threshold"])
        self.labels = tuple(params["labels"].split(","))
        self.withhold = params.get("ood_action", "flag") == "withhold"
        self.inputs = [i["name"] for i in config.get("input", [])]
        self.dicom = DICOM_INPUT in self.inputs  # embedded: the whole DICOM path in this model
        if self.dicom:
            from medops.serving.backends.dicom_preprocess import Limits
            from medops.serving.contract import preprocessing_from_parameters

            self.spec = preprocessing_from_parameters(params)
            self.limits = Limits(params["max_bytes"], params["max_pixels"])
        self.classifier, self.unavailable = None, ""
        if params.get("classifier"):  # embedded: run classifier version N's ONNX here
            from medops.serving.backends.onnx_classifier import Classifier

            root = os.path.dirname(os.path.normpath(args["model_repository"]))
            path = os.path.join(root, params["classifier"], args["model_version"], "model.onnx")
            if os.path.isfile(path):
                self.classifier = Classifier(path, config)
                size = self.spec.image_size if self.dicom else None
                if size is not None and self.classifier.item_shape != (size, size, 1):
                    raise ValueError(f"{path} takes images of shape {list(self.classifier.item_shape)}, "
                                     f"the preprocessing prepares [{size}, {size}, 1]")
            else:  # a failed deploy's version, removed while an ensemble may still pin this one:
                # stay loadable (the undo re-pins the ensemble), answer nothing
                self.unavailable = (f"classifier {params['classifier']!r} version "
                                    f"{args['model_version']} is not in the repository")
        self.log, self.failures = None, 0
        if "record_dir" in params:
            from pathlib import Path

            from medops.drift import RequestLog

            directory = Path(params["record_dir"]).expanduser()
            self.log = RequestLog(directory.resolve(), max_bytes=int(params["record_max_bytes"]),
                                  keep=int(params["record_keep"]))

    def _read(self, request) -> dict:
        import triton_python_backend_utils as pb_utils

        out = {}
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            out[name] = None if tensor is None else tensor.as_numpy()
        return out

    def _label(self, r: dict) -> np.ndarray:
        errors = [bytes(e) for e in r[ERROR_INPUT].reshape(-1)]
        return label_items(r[PROBABILITY_INPUT], errors, threshold=self.threshold, labels=self.labels,
                           in_distribution=r[IN_DISTRIBUTION_INPUT], withhold=self.withhold)

    def _record(self, requests: list, records: list | None = None) -> None:
        from medops.errors import PROCESS_EXITS, first_line
        from medops.serving.backends.drift_recorder import _log_warning

        try:
            records = drift_records(requests) if records is None else records
            if records:
                self.log.append(records)
        except PROCESS_EXITS:
            raise
        except BaseException as exc:  # noqa: BLE001 - recording never fails a request
            self.failures += 1
            if self.failures <= 10 or self.failures % 1000 == 0:  # a full disk: not per request
                _log_warning(f"drift recorder: {self.failures} request(s) not recorded; "
                             f"last: {type(exc).__name__}: {first_line(exc)}")

    def _execute_dicom(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        files: list = []
        for request in requests:
            try:
                if self.unavailable:
                    raise RuntimeError(self.unavailable)
                raw = pb_utils.get_input_tensor_by_name(request, DICOM_INPUT).as_numpy()
                files.append([bytes(x) for x in raw.reshape(-1)])
            except Exception as exc:  # noqa: BLE001 - one response per request, always
                files.append(f"postprocessing failed: {type(exc).__name__}: {exc}")
        readable = [f if isinstance(f, list) else None for f in files]
        answers, records = answer_files(readable, self.spec, self.limits, self.classifier.run
                                        if self.classifier else None, threshold=self.threshold,
                                        labels=self.labels, withhold=self.withhold,
                                        record=self.log is not None)
        responses = []
        for f, answer in zip(files, answers):
            message = f if isinstance(f, str) else answer if isinstance(answer, str) else None
            if message is not None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(k, v) for k, v in answer.items()]))
        if self.log is not None:
            self._record([], records)
        return responses

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        if self.dicom:
            return self._execute_dicom(requests)
        tensors: list = []
        for request in requests:
            try:
                if self.unavailable:
                    raise RuntimeError(self.unavailable)
                tensors.append(self._read(request))
            except Exception as exc:  # noqa: BLE001 - one response per request, always
                tensors.append(f"postprocessing failed: {type(exc).__name__}: {exc}")
        if self.classifier is not None:
            classify_requests(self.classifier.run, tensors, self.classifier.item_shape)
        responses = []
        for r in tensors:
            try:
                if isinstance(r, str):
                    raise RuntimeError(r)
                outs = [pb_utils.Tensor(LABEL_OUTPUT, self._label(r))]
                if self.classifier is not None:
                    outs += [pb_utils.Tensor(PROBABILITY_INPUT, r[PROBABILITY_INPUT].astype(np.float32)),
                             pb_utils.Tensor(OOD_SCORE_INPUT, r[OOD_SCORE_INPUT].astype(np.float32)),
                             pb_utils.Tensor(IN_DISTRIBUTION_INPUT, r[IN_DISTRIBUTION_INPUT].astype(bool))]
                responses.append(pb_utils.InferenceResponse(output_tensors=outs))
            except Exception as exc:  # noqa: BLE001 - one response per request, always
                message = str(exc) if isinstance(r, str) else \
                    f"postprocessing failed: {type(exc).__name__}: {exc}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        if self.log is not None:
            self._record(tensors)
        return responses

    def finalize(self) -> None:
        self.classifier = None
