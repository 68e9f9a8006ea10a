"""The Prefect events medops emits, one place for their names. Payloads carry versions, counts
and the gate's or the quality suite's reasons, never a path or a value of the export.

- ``medops.export.changed``: studies landed in the export folder (``medops watch``, one per
  delivery); the ingest-studies deployment's trigger starts an ingest.
- ``medops.dataset.versioned``: ingest-studies made a new data version; the training-pipeline
  deployment's trigger starts a training run for it.
- ``medops.model.deployed``: a model version is served (its version, data version, gate).
- ``medops.model.rejected``: the gate refused the candidate (the failed checks).
- ``medops.data.rejected``: a critical data-quality expectation failed (the check that failed).
- ``medops.drift.detected``: the drift monitor saw the last served images differ from the training
  reference (the tests that fired, with their statistics and p-values); wire it to retraining or
  to a person in the UI.

Attach a Prefect automation (email, Slack or webhook block) to any of them in the UI.
"""

from typing import Any

from medops.ops.watch import EXPORT_CHANGED

DATASET_VERSIONED = "medops.dataset.versioned"
MODEL_DEPLOYED = "medops.model.deployed"
MODEL_REJECTED = "medops.model.rejected"
DATA_REJECTED = "medops.data.rejected"
DRIFT_DETECTED = "medops.drift.detected"

__all__ = ["DATASET_VERSIONED", "DATA_REJECTED", "DRIFT_DETECTED", "EXPORT_CHANGED", "MODEL_DEPLOYED", "MODEL_REJECTED", "emit"]


def emit(event: str, resource_id: str, payload: dict[str, Any]) -> Any:
    """``prefect.events.emit_event`` with medops' resource naming (``medops.<what>``)."""
    from prefect.events import emit_event

    return emit_event(event=event, resource={"prefect.resource.id": resource_id}, payload=payload)
