"""flows.recover: which failed training runs are continued by a new run (only those cut off from
the Prefect API), and how many times."""

from __future__ import annotations

import httpx
from prefect.states import Crashed, Failed

from flows.recover import MAX_RESTARTS, RESTART_TAG, api_unreachable, restarts_of
from medops.errors import DataQualityError, ServerUnreachableError


def test_only_an_unreachable_prefect_api_counts() -> None:
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    assert api_unreachable(Failed(data=refused, message=f"Flow run encountered an exception: "
                                                        f"ConnectError: {refused}"))
    # the result may be gone (another process reports the state): the message decides
    assert api_unreachable(Crashed(message="Execution was interrupted by an unexpected exception: "
                                           "ReadError: "))
    assert not api_unreachable(Failed(data=DataQualityError("expect_column ... failed"),
                                      message="Flow run encountered an exception: DataQualityError: "
                                              "expect_column_values_to_not_be_null failed"))
    # Triton unreachable is the deploy task's own retry policy, not a reason to run again
    assert not api_unreachable(Failed(data=ServerUnreachableError("cannot reach Triton"),
                                      message="ServerUnreachableError: cannot reach Triton at x: "
                                              "connection refused"))


def test_restarts_are_counted_by_tag() -> None:
    assert restarts_of(["medops"]) == 0
    assert restarts_of(["medops", f"{RESTART_TAG}-1"]) == 1
    # a restarted run's restart carries only the newest tag
    assert restarts_of(["medops", f"{RESTART_TAG}-2"]) == 2 == MAX_RESTARTS
