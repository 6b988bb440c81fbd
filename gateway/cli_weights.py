"""`loraplex adapters stack|spectrum|truncate|derived`: versions made from other versions' weights,
through the admin HTTP API (see cli_admin for the environment and exit codes)."""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer

from gateway.cli_admin import _call, _print, _split


def stack(
    components: Annotated[
        list[str],
        typer.Argument(
            help="Two or more adapters as the tenant addresses them, NAME or NAME@N, each "
            "optionally :WEIGHT (default 1), e.g. support-bot safety-guard@3:0.5."
        ),
    ],
    name: Annotated[str, typer.Option(help="The stack's adapter name (new or existing).")],
    tenant: Annotated[str, typer.Option(help="Owning tenant (required).")],
    shared: Annotated[bool, typer.Option("--shared", help="Usable by every tenant.")] = False,
    description: Annotated[str | None, typer.Option(help="For the stack's card.")] = None,
    rollback_path: Annotated[str, typer.Option(help="'base' or NAME[@N].")] = "base",
) -> None:
    """Register a version serving several adapters together (their cards must allow it)."""
    body: dict[str, Any] = {
        "name": name,
        "tenant": tenant,
        "components": [_component(text) for text in components],
        "rollback_path": rollback_path,
    }
    if shared:
        body["visibility"] = "shared"
    if description is not None:
        body["description"] = description
    _print(_call("POST", "/adapters/stack", json=body))


def _share(value: float | None) -> float | None:
    """Option callback: an energy share is a number in (0, 1]."""
    if value is not None and not (math.isfinite(value) and 0 < value <= 1):
        raise typer.BadParameter(f"{value} is not within (0, 1]")
    return value


def spectrum(
    address: Annotated[str, typer.Argument(help="NAME@VERSION")],
    energy: Annotated[
        float, typer.Option(callback=_share, help="Share of each module's delta kept, (0, 1].")
    ] = 0.95,
    singular_values: Annotated[
        bool, typer.Option("--singular-values", help="Print every module's singular values.")
    ] = False,
) -> None:
    """How much of its rank a version uses (the SVD rank diagnostic)."""
    name, version = _split(address)
    result = _call(
        "GET", f"/adapters/{name}/versions/{version}/spectrum", params={"energy": energy}
    )
    if not singular_values:
        for module in result["modules"]:
            module.pop("singular_values")
    _print(result)


def truncate(
    address: Annotated[str, typer.Argument(help="NAME@VERSION")],
    rank: Annotated[int | None, typer.Option(min=1, help="The new version's rank.")] = None,
    energy: Annotated[
        float | None,
        typer.Option(callback=_share, help="Or: the least rank keeping this share of each module."),
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Recorded in the new version's card.")] = None,
) -> None:
    """Register a new version cut to a lower rank (evaluate and roll it out like any)."""
    if (rank is None) == (energy is None):
        typer.echo("error: give exactly one of --rank or --energy", err=True)
        raise typer.Exit(2)
    name, version = _split(address)
    body = {"rank": rank, "energy": energy, "reason": reason}
    _print(_call("POST", f"/adapters/{name}/versions/{version}/truncate", json=body))


def _component(text: str) -> dict[str, Any]:
    address, sep, weight = text.partition(":")
    if not sep:
        return {"adapter": address}
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        typer.echo(f"error: {text!r}: the weight after ':' must be a number", err=True)
        raise typer.Exit(2)
    return {"adapter": address, "weight": value}


def derived(address: Annotated[str, typer.Argument(help="NAME@VERSION")]) -> None:
    """Versions made from this version's weights (stacks, truncations): retiring it leaves
    them serving."""
    name, version = _split(address)
    _print(_call("GET", f"/adapters/{name}/versions/{version}/derived"))


def add_weight_commands(app: typer.Typer) -> None:
    """Register these commands on `loraplex adapters`."""
    app.command("stack")(stack)
    app.command("spectrum")(spectrum)
    app.command("truncate")(truncate)
    app.command("derived")(derived)
