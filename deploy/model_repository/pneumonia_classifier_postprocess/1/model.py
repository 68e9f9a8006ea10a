"""Triton Python-backend model: the classifier's probability -> a label, per item.

Copied as ``model.py`` into ``<name>_postprocess/<N>/``, one version per classifier version: version
N labels at the ``threshold.N`` parameter (the threshold classifier version N was deployed with),
so the ensemble, pinned to classifier N and postprocess N, switches probability and label in one
load. Without a ``threshold.N`` parameter the ``threshold`` one applies (the production template,
one version for whatever classifier is latest). With ``ood_action`` "withhold", an item the OOD
guard calls out of distribution gets an empty label too (the client reports label null and why).
Needs only numpy. An item that
preprocessing could not use (non-empty ``error``) gets an empty label: its probability is that of
a blank image and means nothing.
"""

from __future__ import annotations

import json

import numpy as np

PROBABILITY_INPUT = "probability"
IN_DISTRIBUTION_INPUT = "in_distribution"
ERROR_INPUT = "error"
LABEL_OUTPUT = "label"


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


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = {k: v["string_value"]
                  for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        key = f"threshold.{args['model_version']}"
        self.threshold = float(params[key] if key in params else params["threshold"])
        self.labels = tuple(params["labels"].split(","))
        self.withhold = params.get("ood_action", "flag") == "withhold"

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                probs = pb_utils.get_input_tensor_by_name(request, PROBABILITY_INPUT).as_numpy()
                errors = [bytes(e) for e in
                          pb_utils.get_input_tensor_by_name(request, ERROR_INPUT).as_numpy().reshape(-1)]
                inside = pb_utils.get_input_tensor_by_name(request, IN_DISTRIBUTION_INPUT).as_numpy()
                labels = label_items(probs, errors, threshold=self.threshold, labels=self.labels,
                                     in_distribution=inside, withhold=self.withhold)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(LABEL_OUTPUT, labels)]))
            except Exception as exc:  # noqa: BLE001 - one response per request, always
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"postprocessing failed: {type(exc).__name__}: {exc}")))
        return responses
