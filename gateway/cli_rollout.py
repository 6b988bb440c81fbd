"""`loraplex rollout ...` and `loraplex faults ...`: canary rollouts, shadows, rollback paths
and thresholds, and fault injection, through the admin HTTP API (same conventions as cli_admin)."""

from __future__ import annotations

from typing import Annotated

import typer

from gateway.cli_admin import _call, _print, _split, finite

rollout_app = typer.Typer(
    help="Canary rollouts of adapter versions (admin API).", no_args_is_help=True
)


@rollout_app.command("start")
def rollout_start(
    name: str,
    version: Annotated[int, typer.Option(help="The evaluated version to canary.")],
    percent: Annotated[int, typer.Option(help="Starting stage: 1, 10 or 50 (then promote).")] = 1,
    force: Annotated[bool, typer.Option(help="Restart a version rolled back before.")] = False,
    reason: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Start a canary of NAME@VERSION."""
    body = {"version": version, "percent": percent, "force": force, "reason": reason}
    _print(_call("POST", f"/rollouts/{name}/start", json=body))


@rollout_app.command("shadow")
def rollout_shadow(
    name: str,
    version: Annotated[int, typer.Option(help="The evaluated version to mirror traffic to.")],
    percent: Annotated[int, typer.Option(help="Share of the stable's callers (1-100).")],
    reason: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Mirror PERCENT % of NAME's stable traffic to NAME@VERSION (its output discarded)."""
    body = {"version": version, "percent": percent, "reason": reason}
    _print(_call("POST", f"/rollouts/{name}/shadow", json=body))


@rollout_app.command("shadow-stop")
def rollout_shadow_stop(name: str, reason: Annotated[str | None, typer.Option()] = None) -> None:
    """Stop mirroring NAME's traffic to its shadow version."""
    params = {"reason": reason} if reason else None
    _print(_call("DELETE", f"/rollouts/{name}/shadow", params=params))


@rollout_app.command("status")
def rollout_status(name: str) -> None:
    """Where NAME's traffic goes now, and its last rollout events."""
    _print(_call("GET", f"/rollouts/{name}"))


@rollout_app.command("promote")
def rollout_promote(
    name: str,
    to_percent: Annotated[int | None, typer.Option(help="Default: the next stage.")] = None,
) -> None:
    """Move the canary to its next stage; at 100 % it becomes the stable."""
    _print(_call("POST", f"/rollouts/{name}/promote", json={"to_percent": to_percent}))


@rollout_app.command("rollback")
def rollout_rollback(name: str, reason: Annotated[str | None, typer.Option()] = None) -> None:
    """All traffic back to the stable (or the stable's to its rollback target)."""
    _print(_call("POST", f"/rollouts/{name}/rollback", json={"reason": reason}))


@rollout_app.command("pause")
def rollout_pause(name: str) -> None:
    """Freeze the split (no promotion until resumed)."""
    _print(_call("POST", f"/rollouts/{name}/pause"))


@rollout_app.command("resume")
def rollout_resume(name: str) -> None:
    """Resume a paused rollout."""
    _print(_call("POST", f"/rollouts/{name}/resume"))


@rollout_app.command("restore")
def rollout_restore(name: str) -> None:
    """Send the stable's traffic back to it after a fallback."""
    _print(_call("POST", f"/rollouts/{name}/restore"))


@rollout_app.command("path")
def rollout_path(
    name: str,
    target: Annotated[
        str | None,
        typer.Argument(help='"base", "other", "other@N" or an earlier "name@N"; omit to clear.'),
    ] = None,
) -> None:
    """Set where NAME's stable goes when it breaches; setting one arms automatic fallback."""
    _print(_call("PUT", f"/rollouts/{name}/rollback-path", json={"target": target}))


@rollout_app.command("thresholds")
def rollout_thresholds(
    name: str,
    window: Annotated[int | None, typer.Option(help="Requests per sliding window.")] = None,
    max_error_rate: Annotated[
        float | None, typer.Option(help="E.g. 0.001 (0.1 %).", callback=finite)
    ] = None,
    sla_p95_ttft_ms: Annotated[float | None, typer.Option(callback=finite)] = None,
    sla_p95_e2e_ms: Annotated[float | None, typer.Option(callback=finite)] = None,
    margin_ms: Annotated[
        float | None, typer.Option(help="Allowed p95 above the SLA.", callback=finite)
    ] = None,
    max_p95_ttft_ms: Annotated[
        float | None, typer.Option(help="Absolute bound.", callback=finite)
    ] = None,
    max_p95_e2e_ms: Annotated[
        float | None, typer.Option(help="Absolute bound.", callback=finite)
    ] = None,
    min_task_success: Annotated[
        float | None,
        typer.Option(help="Lowest share of successful feedback, e.g. 0.9.", callback=finite),
    ] = None,
    min_tool_call_validity: Annotated[
        float | None,
        typer.Option(
            help="Lowest share of valid tool calls (tool_choice auto), e.g. 0.95.",
            callback=finite,
        ),
    ] = None,
    clear: Annotated[bool, typer.Option(help="Remove the override.")] = False,
) -> None:
    """Override the rollback thresholds judging NAME's versions (only the options given)."""
    given = {
        "window": window,
        "max_error_rate": max_error_rate,
        "sla_p95_ttft_ms": sla_p95_ttft_ms,
        "sla_p95_e2e_ms": sla_p95_e2e_ms,
        "margin_ms": margin_ms,
        "max_p95_ttft_ms": max_p95_ttft_ms,
        "max_p95_e2e_ms": max_p95_e2e_ms,
        "min_task_success": min_task_success,
        "min_tool_call_validity": min_tool_call_validity,
    }
    body = {k: v for k, v in given.items() if v is not None}
    if clear == bool(body):
        typer.echo("error: give threshold options, or --clear alone", err=True)
        raise typer.Exit(2)
    _print(_call("PUT", f"/rollouts/{name}/thresholds", json=body))  # {} clears


faults_app = typer.Typer(
    help="Fault injection (gateway started with LORAPLEX_ENABLE_FAULTS=1).", no_args_is_help=True
)


@faults_app.command("set")
def faults_set(
    address: str,
    latency_ms: Annotated[
        float, typer.Option(help="Added before the first token.", callback=finite)
    ] = 0,
    error_rate: Annotated[
        float, typer.Option(help="Share of requests failed (0-1).", callback=finite)
    ] = 0,
) -> None:
    """Delay or fail requests served by NAME@VERSION."""
    name, version = _split(address)
    body = {"adapter": name, "version": version, "latency_ms": latency_ms, "error_rate": error_rate}
    _print(_call("POST", "/faults", json=body))


@faults_app.command("clear")
def faults_clear(
    address: Annotated[str | None, typer.Argument(help="NAME@VERSION; all when omitted.")] = None,
) -> None:
    """Remove injected faults."""
    params = None
    if address is not None:
        name, version = _split(address)
        params = {"adapter": name, "version": version}
    _print(_call("DELETE", "/faults", params=params))
