"""`loraplex adapters|tenants|keys ...`: a thin client of the admin HTTP API.

Reads LORAPLEX_URL (default http://127.0.0.1:8000) and LORAPLEX_ADMIN_TOKEN. Exit codes:
0 success, 1 refused by the server (every reason printed), 2 usage or connection error.
"""

from __future__ import annotations

import json
import math
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


def finite(value: float | None) -> float | None:
    """Option callback: inf and nan parse as floats but mean nothing as a limit, a delay or a
    rate (and JSON cannot carry them)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _split(address: str) -> tuple[str, int]:
    name, sep, version = address.partition("@")
    if not sep or not version.isdigit():
        typer.echo("error: give NAME@VERSION, e.g. support-bot@2", err=True)
        raise typer.Exit(2)
    return name, int(version)


@adapters_app.command("register")
def register(
    path: Annotated[
        str,
        typer.Argument(
            help="PEFT folder or a .tar/.zip of one (uploaded), or s3://bucket/prefix "
            "(fetched by the gateway from an allow-listed bucket)."
        ),
    ],
    name: Annotated[str, typer.Option(help="Adapter name (new or existing).")],
    tenant: Annotated[str, typer.Option(help="Owning tenant (required).")],
    shared: Annotated[bool, typer.Option("--shared", help="Usable by every tenant.")] = False,
    card: Annotated[Path | None, typer.Option(help="Adaptation Card JSON file.")] = None,
) -> None:
    """Upload and register a new adapter version (the gate checks it; refusals list reasons)."""
    if path.startswith("s3://"):
        body: dict[str, Any] = {"path": path, "name": name, "tenant": tenant}
        if shared:  # omitted: a new adapter is private, a new version keeps its adapter's
            body["visibility"] = "shared"
        if card is not None:
            body["card"] = _card_json(card)
        _print(_call("POST", "/adapters/import", json=body))
        return
    _register_upload(Path(path), name, tenant, shared, card)


def _card_text(card: Path) -> str:
    try:
        return card.read_text()
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8
        typer.echo(f"error: cannot read the card {card}: {exc}", err=True)
        raise typer.Exit(2) from exc


def _card_json(card: Path) -> Any:
    try:
        return json.loads(_card_text(card))
    except ValueError as exc:
        typer.echo(f"error: cannot read the card {card}: {exc}", err=True)
        raise typer.Exit(2) from exc


def _register_upload(path: Path, name: str, tenant: str, shared: bool, card: Path | None) -> None:
    if not path.exists():
        typer.echo(f"error: {path} does not exist", err=True)
        raise typer.Exit(2)
    form = {"name": name, "tenant": tenant}
    if shared:  # omitted: a new adapter is private, a new version keeps its adapter's
        form["visibility"] = "shared"
    if card is not None:
        form["card"] = _card_text(card)  # the server parses it and names what is wrong
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
def create_tenant(
    name: str,
    rps: Annotated[
        float | None, typer.Option("--rps", help="Requests per second.", callback=finite)
    ] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Concurrent requests.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Cap on max_tokens.")] = None,
    no_base: Annotated[bool, typer.Option("--no-base", help="Forbid the base model.")] = False,
) -> None:
    """Create a tenant, optionally with limits (unlimited by default)."""
    limits: dict[str, Any] = {
        "requests_per_second": rps,
        "tokens_per_minute": tpm,
        "max_concurrent": max_concurrent,
        "max_tokens": max_tokens,
    }
    limits = {k: v for k, v in limits.items() if v is not None}
    if no_base:
        limits["allow_base_model"] = False
    body: dict[str, Any] = {"name": name}
    if limits:
        body["limits"] = limits
    _print(_call("POST", "/tenants", json=body))


@tenants_app.command("list")
def list_tenants() -> None:
    """List tenants."""
    _print(_call("GET", "/tenants"))


keys_app = typer.Typer(
    help="Issue, list and revoke tenants' API keys (admin API).", no_args_is_help=True
)


@tenants_app.command("show")
def show_tenant(name: str) -> None:
    """Show a tenant and its limits."""
    _print(_call("GET", f"/tenants/{name}"))


LIMIT_FIELDS = (
    "requests_per_second",
    "burst",
    "tokens_per_minute",
    "max_concurrent",
    "max_tokens",
    "allow_base_model",
)


@tenants_app.command("limits")
def set_limits(
    name: str,
    rps: Annotated[
        float | None, typer.Option("--rps", help="Requests per second.", callback=finite)
    ] = None,
    burst: Annotated[int | None, typer.Option(help="Burst size for --rps.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Concurrent requests.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Cap on max_tokens.")] = None,
    allow_base: Annotated[
        bool | None, typer.Option("--allow-base/--no-allow-base", help="May use the base model.")
    ] = None,
    clear: Annotated[
        list[str] | None,
        typer.Option(help=f"Remove a limit (unlimited): {', '.join(LIMIT_FIELDS)}."),
    ] = None,
) -> None:
    """Change a tenant's limits; options not given stay as they are."""
    changes: dict[str, Any] = {}
    given = {
        "requests_per_second": rps,
        "burst": burst,
        "tokens_per_minute": tpm,
        "max_concurrent": max_concurrent,
        "max_tokens": max_tokens,
        "allow_base_model": allow_base,
    }
    changes.update({k: v for k, v in given.items() if v is not None})
    for field in clear or []:
        if field not in LIMIT_FIELDS:
            typer.echo(f"error: --clear takes one of {', '.join(LIMIT_FIELDS)}", err=True)
            raise typer.Exit(2)
        changes[field] = None
    if not changes:
        typer.echo("error: give at least one limit to change", err=True)
        raise typer.Exit(2)
    _print(_call("PATCH", f"/tenants/{name}/limits", json=changes))


@keys_app.command("create")
def create_key(
    tenant: Annotated[str, typer.Option(help="The key's tenant.")],
    label: Annotated[str | None, typer.Option(help="What the key is for.")] = None,
    expires_in_days: Annotated[
        float | None, typer.Option(help="Expire after N days.", callback=finite)
    ] = None,
) -> None:
    """Issue a key. Its details go first; the key itself is the LAST line of stdout (shown once)."""
    body: dict[str, Any] = {"label": label}
    if expires_in_days is not None:
        body["expires_in_days"] = expires_in_days
    issued = _call("POST", f"/tenants/{tenant}/keys", json=body)
    key = issued.pop("key")
    _print(issued)
    typer.echo(key)


@keys_app.command("list")
def list_keys(tenant: Annotated[str | None, typer.Option()] = None) -> None:
    """List keys (ids, status, expiry; never secrets)."""
    _print(_call("GET", "/keys", params={"tenant": tenant} if tenant else None))


@keys_app.command("revoke")
def revoke_key(
    key_id: Annotated[str, typer.Argument(help="The key id (shown by `keys list`) or the key.")],
    reason: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Revoke a key; it is refused from the next request on."""
    _print(_call("POST", f"/keys/{key_id_of(key_id)}/revoke", json={"reason": reason}))


def key_id_of(value: str) -> str:
    """Accept a whole key (generated or chosen) as well as its id, so an operator can paste a
    leaked key (surrounding blanks and quotes are dropped); only the id travels, in the URL
    path the server may log. Anything else is a usage error, never sent: it may be a secret."""
    from registry.tenancy import key_id_for

    key_id = key_id_for(value.strip().strip("'\"").strip())
    if key_id is None:
        typer.echo("error: not a key id (shown by `keys list`) nor a whole key", err=True)
        raise typer.Exit(2)
    return key_id


@adapters_app.command("share")
def share(name: str, tenant: Annotated[str, typer.Option(help="Tenant to share with.")]) -> None:
    """Let another tenant use a private adapter."""
    _print(_call("POST", f"/adapters/{name}/shares", json={"tenant": tenant}))


@adapters_app.command("unshare")
def unshare(
    name: str, tenant: Annotated[str, typer.Option(help="Tenant to stop sharing with.")]
) -> None:
    """Stop sharing an adapter with a tenant."""
    _print(_call("DELETE", f"/adapters/{name}/shares/{tenant}"))


@adapters_app.command("evaluate")
def evaluate(
    address: str,
    reason: Annotated[str | None, typer.Option()] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="An eval report from `loraplex eval run` (checked by the gateway)."),
    ] = None,
) -> None:
    """Mark NAME@VERSION evaluated (passed its evals): it may then start a canary."""
    name, version = _split(address)
    body: dict[str, Any] = {"reason": reason}
    if report is not None:
        try:
            body["report"] = json.loads(report.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            typer.echo(f"error: cannot read the report {report}: {exc!r}", err=True)
            raise typer.Exit(2) from exc
    _print(_call("POST", f"/adapters/{name}/versions/{version}/evaluate", json=body))
