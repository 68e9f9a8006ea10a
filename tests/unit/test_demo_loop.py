"""How the demo follows the event-driven loop (medops.ops.demo._Loop): it names the step it waits
for, and stops at the first flow run that failed, naming it and its link. Flow runs here are
Prefect's own FlowRun objects, as the API returns them."""

from __future__ import annotations

from uuid import uuid4

import pytest

from medops.errors import MedopsError
from medops.ops.demo import _Loop


def run(name: str, state: str, message: str = ""):
    from prefect.client.schemas.objects import FlowRun, State, StateType

    kind = StateType[state.upper()]
    return FlowRun(id=uuid4(), flow_id=uuid4(), name=name, state_type=kind, state_name=state,
                   state=State(type=kind, name=state, message=message))


def test_the_step_follows_the_runs_the_events_started():
    loop, lines = _Loop("http://ui"), []
    loop.see([], lines.append)
    assert loop.step.startswith("the watcher's event medops.export.changed")
    ingest = run("brave-fox", "Running")
    loop.see([("ingest-studies", ingest)], lines.append)
    assert loop.step.startswith("the ingest-studies run")
    done = run("brave-fox", "Completed")
    done.id = ingest.id
    loop.see([("ingest-studies", done)], lines.append)
    assert loop.step.startswith("medops.dataset.versioned") and loop.ingest_done is not None
    loop.see([("ingest-studies", done), ("training-pipeline", run("calm-owl", "Running"))], lines.append)
    assert loop.step.startswith("the training-pipeline run")
    # one line per state a run reached, with its link in the UI
    assert lines == [f"  ingest-studies: flow run 'brave-fox' Running  (http://ui/runs/flow-run/{ingest.id})",
                     f"  ingest-studies: flow run 'brave-fox' Completed  (http://ui/runs/flow-run/{ingest.id})",
                     lines[2]]
    assert lines[2].startswith("  training-pipeline: flow run 'calm-owl' Running")


@pytest.mark.parametrize("state", ["Failed", "Crashed", "Cancelled"])
def test_a_run_that_failed_stops_the_demo_naming_the_step(state):
    failed = run("calm-owl", state, "gate refused: auc 0.61 < 0.80")
    with pytest.raises(MedopsError, match=rf"stopped at training-pipeline: flow run 'calm-owl' ended "
                                          rf"{state}: gate refused: auc 0.61 < 0.80; its logs: "
                                          rf"http://ui/runs/flow-run/{failed.id}"):
        _Loop("http://ui").see([("ingest-studies", run("brave-fox", "Completed")),
                                ("training-pipeline", failed)], lambda line: None)
