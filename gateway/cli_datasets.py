"""`loraplex datasets ...`: dataset lineage through the admin HTTP API (see cli_admin for the
environment and exit codes; a revocation that left any version in service exits 1)."""

from __future__ import annotations

from typing import Annotated

import typer

from gateway.cli_admin import _call, _print

datasets_app = typer.Typer(
    help="Which adapter versions a dataset went into; withdraw it (admin API).",
    no_args_is_help=True,
)


@datasets_app.command("adapters")
def adapters(sha256: Annotated[str, typer.Argument(help="The dataset's sha256.")]) -> None:
    """List every adapter version whose Adaptation Card lists the dataset."""
    _print(_call("GET", f"/datasets/{sha256}/adapters"))


@datasets_app.command("revoke")
def revoke(
    sha256: Annotated[str, typer.Argument(help="The dataset's sha256.")],
    delete: Annotated[
        bool, typer.Option("--delete", help="Delete the versions (and unused artifacts).")
    ] = False,
    reason: Annotated[str | None, typer.Option(help="Recorded in each version's audit.")] = None,
) -> None:
    """Retire (or delete) every adapter version trained on the dataset."""
    body = {"action": "delete" if delete else "retire", "reason": reason}
    result = _call("POST", f"/datasets/{sha256}/revoke", json=body)
    _print(result)
    if not result["complete"]:
        for version in result["versions"]:
            if version["outcome"] in ("refused", "failed", "skipped"):
                address = f"{version['adapter']}@{version['version']}"
                typer.echo(f"{version['outcome']}: {address}: {version['reason']}", err=True)
        typer.echo("some versions are still in service: fix the above, then run again", err=True)
        raise typer.Exit(1)
