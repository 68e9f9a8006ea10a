"""A training run cut off from the Prefect server goes on in a new run, from its last finished stage.

Prefect's client retries each API call for about a minute, so a server restarted within that
(killed and brought back by a supervisor) costs a run nothing: it carries on. A longer outage
fails the run with the client's connection error (``httpx.ConnectError``) once the server is back,
or crashes it. Prefect's flow ``retries`` would retry every failure (a data-quality rejection,
emitting its event again), so instead this ``on_failure``/``on_crashed`` hook starts the run's own
deployment again, with the same parameters, when and only when the Prefect API was unreachable:
DVC makes every stage that finished a no-op, so the new run takes it from the last finished
stage. The new run carries the tag ``medops-restart-N`` (at most ``MAX_RESTARTS``), and the failed
run's log says which run continues it (the UI tells the story). Flows called directly (no
deployment) are not restarted.
"""

from typing import Any

RESTART_TAG = "medops-restart"
MAX_RESTARTS = 2
# what the client raises when the server is down or went away mid-request (httpx's names)
_UNREACHABLE = ("ConnectError", "ConnectTimeout", "ReadError", "RemoteProtocolError", "ReadTimeout",
                "WriteError", "PoolTimeout", "ServerUnavailable")


def api_unreachable(state: Any) -> bool:
    """Whether ``state`` (a Failed or Crashed flow-run state) came from an unreachable Prefect API."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - no result kept: judge by the message
        exc = None
    if isinstance(exc, BaseException):
        import httpx

        if isinstance(exc, httpx.TransportError):
            return True
        if type(exc).__name__ in _UNREACHABLE:
            return True
    message = state.message or ""
    return any(f"{name}:" in message or f"{name}(" in message for name in _UNREACHABLE)


def restarts_of(tags: list[str]) -> int:
    """How many runs before this one the chain of restarts holds (tag ``medops-restart-N``)."""
    prefix = f"{RESTART_TAG}-"
    return max((int(t[len(prefix):]) for t in tags
                if t.startswith(prefix) and t[len(prefix):].isdigit()), default=0)


def continue_after_api_outage(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_failure``/``on_crashed`` hook: see the module docstring. Never raises."""
    from prefect.logging.loggers import flow_run_logger

    log = flow_run_logger(flow_run, flow)
    try:
        if flow_run.deployment_id is None or not api_unreachable(state):
            return
        done = restarts_of(list(flow_run.tags or []))
        if done >= MAX_RESTARTS:
            log.error("the Prefect API was unreachable again; not restarting a %s time", done + 1)
            return
        from prefect.deployments import run_deployment

        tags = [t for t in flow_run.tags or [] if not t.startswith(f"{RESTART_TAG}-")]
        nxt = run_deployment(flow_run.deployment_id, parameters=dict(flow_run.parameters or {}),
                             timeout=0, as_subflow=False, tags=[*tags, f"{RESTART_TAG}-{done + 1}"])
        log.warning("the Prefect API was unreachable (%s); flow run %s (%s) continues this one "
                    "from its last finished stage", state.message, nxt.name, nxt.id)
    except Exception as exc:  # noqa: BLE001 - a hook must not fail the run's state a second time
        log.error("could not start a run to continue this one: %s", exc)
