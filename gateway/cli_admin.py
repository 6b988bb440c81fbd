"""`loraplex adapters ...` and `loraplex tenants ...`: a thin client of the admin HTTP API.

Reads LORAPLEX_URL (default http://127.0.0.1:8000) and LORAPLEX_ADMIN_TOKEN. Exit codes:
0 success, 1 refused by the server (every reason printed), 2 usage or connection error.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

adapters_app = typer.Typer(help="Register and manage adapters (admin API).", no_args_is_help=True)
tenants_app = typer.Typer(help="Manage tenants (admin API).", no_args_is_help=True)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _client() -> httpx.Client:
    base = os.environ.get("LORAPLEX_URL", "http://127.0.0.1:8000").rstrip("/")
    token = os.environ.get("LORAPLEX_ADMIN_TOKEN")
    if not token:
        typer.echo("error: set LORAPLEX_ADMIN_TOKEN", err=True)
        raise typer.Exit(2)
    return httpx.Client(
        base_url=f"{base}/admin/v1", headers={"Authorization": f"Bearer {token}"}, timeout=600
    )


def _call(method: str, path: str, **kwargs: Any) -> Any:
    try:
        with _client() as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach the gateway: {exc}", err=True)
        raise typer.Exit(2) from exc
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"message": response.text}
    typer.echo(f"refused ({response.status_code}): {error.get('message')}", err=True)
    for problem in error.get("problems") or []:
        typer.echo(f"  - [{problem['code']}] {problem['message']}", err=True)
    raise typer.Exit(1)


def _print(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _split(address: str) -> tuple[str, int]:
    name, sep, version = address.partition("@")
    if not sep or not version.isdigit():
        typer.echo("error: give NAME@VERSION, e.g. support-bot@2", err=True)
        raise typer.Exit(2)
    return name, int(version)


@adapters_app.command("register")
def register(
    path: Annotated[Path, typer.Argument(help="PEFT folder, or a .tar/.zip of one.")],
    name: Annotated[str, typer.Option(help="Adapter name (new or existing).")],
    tenant: Annotated[str, typer.Option(help="Owning tenant.")] = "default",
    shared: Annotated[bool, typer.Option("--shared", help="Usable by every tenant.")] = False,
    card: Annotated[Path | None, typer.Option(help="Adaptation Card JSON file.")] = None,
) -> None:
    """Upload and register a new adapter version (the gate checks it; refusals list reasons)."""
    if not path.exists():
        typer.echo(f"error: {path} does not exist", err=True)
        raise typer.Exit(2)
    form = {"name": name, "tenant": tenant, "visibility": "shared" if shared else "private"}
    if card is not None:
        form["card"] = card.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        uploads = _upload_files(path, Path(tmp))
        handles = [(("files", (p.name, p.open("rb")))) for p in uploads]
        try:
            version = _call("POST", "/adapters", data=form, files=handles)
        finally:
            for _, (_, handle) in handles:
                handle.close()
    _print(version)


def _upload_files(path: Path, tmp: Path) -> list[Path]:
    if path.is_file():
        return [path]
    present = [path / name for name in PEFT_FILES if (path / name).is_file()]
    if len(present) == len(PEFT_FILES):
        return present
    # Not a flat PEFT folder: send it whole and let the server find (or refuse) the adapter.
    archive = tmp / f"{path.name}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(path, arcname=path.name)
    return [archive]


@adapters_app.command("list")
def list_adapters(tenant: Annotated[str | None, typer.Option()] = None) -> None:
    """List adapters (optionally those a tenant owns or may use)."""
    _print(_call("GET", "/adapters", params={"tenant": tenant} if tenant else None))


@adapters_app.command("show")
def show(name: str) -> None:
    """Show an adapter and all its versions."""
    _print(_call("GET", f"/adapters/{name}"))


@adapters_app.command("retire")
def retire(address: str, reason: Annotated[str | None, typer.Option()] = None) -> None:
    """Stop serving NAME@VERSION."""
    name, version = _split(address)
    _print(_call("POST", f"/adapters/{name}/versions/{version}/retire", json={"reason": reason}))


@adapters_app.command("delete")
def delete(address: str, reason: Annotated[str | None, typer.Option()] = None) -> None:
    """Delete NAME@VERSION (tombstone + artifact removal when unused)."""
    name, version = _split(address)
    params = {"reason": reason} if reason else None
    _print(_call("DELETE", f"/adapters/{name}/versions/{version}", params=params))


@tenants_app.command("create")
def create_tenant(name: str) -> None:
    """Create a tenant."""
    _print(_call("POST", "/tenants", json={"name": name}))


@tenants_app.command("list")
def list_tenants() -> None:
    """List tenants."""
    _print(_call("GET", "/tenants"))
