"""The drift records of served images, as the DICOM ensemble's postprocessing model writes them.

Once a Triton model (the ensemble's fourth step); now the postprocessing model (``postprocess.py``)
calls these functions in its own step, which saves the recorder's process hop per request. It
takes the preprocessing model's ``drift_features`` (JSON per item: header categories and image
statistics, no PHI) and the classifier's ``probability`` (and ``ood_score`` when the classifier
declares one): ``medops.drift.answer_record`` of each item, appended to
``<record_dir>/requests.jsonl`` (``medops.drift.RequestLog``). A relative ``record_dir`` is
resolved against the server's working folder (the embedded server runs in its state folder,
``.medops``).
"""

from __future__ import annotations

import numpy as np


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
