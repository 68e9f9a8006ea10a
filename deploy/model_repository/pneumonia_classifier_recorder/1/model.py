"""Triton Python-backend model: append one drift record per served image to the drift log.

Copied as ``model.py`` into ``<name>_recorder/1/``; the last step of the DICOM ensemble. It takes
the preprocessing model's ``drift_features`` (JSON per item: header categories and image
statistics, no PHI) and the classifier's ``probability`` (and ``ood_score`` when the classifier
declares one), and appends ``medops.drift.answer_record`` of each item to
``<record_dir>/requests.jsonl`` (``medops.drift.RequestLog``: locked appends, rotated at
``record_max_bytes``). A relative ``record_dir`` is resolved against the server's working folder
(the embedded server runs in its state folder, ``.medops``).

It also passes the preprocessing model's per-item ``error`` through as the ensemble's ``error``
(Triton's ensembles want each step's output used by a client). Recording must never fail an
answer: a recording error is logged (Triton's log) and the error tensor is passed on all the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medops.errors import PROCESS_EXITS, first_line
from medops.serving.contract import (DRIFT_TENSOR, ERROR_OUTPUT, OOD_SCORE, OUTPUT_NAME,
                                     RECORDER_ERROR)


def build_records(features: np.ndarray, probabilities: np.ndarray,
                  ood_scores: np.ndarray | None) -> list[dict]:
    """One ``medops.drift.answer_record`` per item of a request's tensors."""
    from medops.drift import answer_record

    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    ood = (np.asarray(ood_scores, dtype=np.float64).reshape(-1) if ood_scores is not None
           else [None] * len(probs))
    return [answer_record(bytes(f), p, o) for f, p, o in
            zip(np.asarray(features, dtype=np.object_).reshape(-1), probs, ood)]


def _log_warning(message: str) -> None:
    try:
        import triton_python_backend_utils as pb_utils

        pb_utils.Logger.log_warn(message)
    except Exception:  # noqa: BLE001 - outside Triton (tests): nowhere better to say it
        pass


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from medops.drift import RequestLog

        params = {k: v["string_value"]
                  for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        directory = Path(params.get("record_dir", "drift")).expanduser()
        self.log = RequestLog(directory.resolve(), max_bytes=int(params["record_max_bytes"]),
                              keep=int(params["record_keep"]))
        self.failures = 0

    def _record(self, request) -> int:
        import triton_python_backend_utils as pb_utils

        features = pb_utils.get_input_tensor_by_name(request, DRIFT_TENSOR).as_numpy()
        probs = pb_utils.get_input_tensor_by_name(request, OUTPUT_NAME).as_numpy()
        ood = pb_utils.get_input_tensor_by_name(request, OOD_SCORE)
        records = build_records(features, probs, None if ood is None else ood.as_numpy())
        self.log.append(records)
        return len(records)

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            errors = pb_utils.get_input_tensor_by_name(request, ERROR_OUTPUT).as_numpy()
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(RECORDER_ERROR, errors)]))
            try:
                self._record(request)
            except PROCESS_EXITS:
                raise
            except BaseException as exc:  # noqa: BLE001 - recording never fails a request
                self.failures += 1
                if self.failures <= 10 or self.failures % 1000 == 0:  # a full disk: not per request
                    _log_warning(f"drift recorder: {self.failures} request(s) not recorded; "
                                 f"last: {type(exc).__name__}: {first_line(exc)}")
        return responses
