"""`loraplex datasets ...`: dataset lineage through the admin HTTP API (see cli_admin for the
environment and exit codes; a revocation that left any version in service exits 1), and the
datasets' n-gram filters eval suites are checked against for contamination."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli_admin import _call, _print

datasets_app = typer.Typer(
    help="Which adapter versions a dataset went into; withdraw it; its n-gram filter for "
    "eval contamination checks (admin API).",
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


@datasets_app.command("build-filter")
def build_filter(
    dataset: Annotated[
        Path,
        typer.Argument(
            help="The training dataset: JSON lines (every string in each line is a text) or "
            "plain lines of text.",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="Write the filter here (default: DATASET.ngram-filter).")
    ] = None,
    register: Annotated[
        bool, typer.Option("--register", help="Register it for the dataset's sha256 (admin API).")
    ] = False,
    false_positive_rate: Annotated[
        float, typer.Option(min=1e-9, max=0.01, help="Target false-positive rate.")
    ] = 0.001,
    max_bytes: Annotated[
        int,
        typer.Option(
            min=8,
            max=512 * 1024**2,
            help="Cap on the filter's size (its rate rises to fit); the gateway's "
            "LORAPLEX_NGRAM_FILTER_MAX_BYTES.",
        ),
    ] = 64 * 1024**2,
) -> None:
    """Hash every 8-word sequence of the dataset into a Bloom filter (no text leaves this
    machine), so eval suites can be checked for contamination against it."""
    from registry.ngram_filter import MAX_FALSE_POSITIVE_RATE, BadFilter, build

    try:
        header, ngram_filter = build(dataset, false_positive_rate, max_bytes)
    except BadFilter as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    rate = ngram_filter.false_positive_rate()
    target = out or dataset.with_name(dataset.name + ".ngram-filter")
    target.write_bytes(ngram_filter.encode(header))
    summary = {**header.model_dump(), "false_positive_rate": rate, "file": str(target)}
    _print(summary)
    if rate > MAX_FALSE_POSITIVE_RATE:
        typer.echo(
            f"the filter's false-positive rate is {rate:.2%}, over the "
            f"{MAX_FALSE_POSITIVE_RATE:.0%} the gateway accepts: give it more --max-bytes",
            err=True,
        )
        raise typer.Exit(1)
    if register:
        path = f"/datasets/{header.dataset_sha256}/ngram-filter"
        headers = {"Content-Type": "application/octet-stream"}
        _print(_call("PUT", path, content=target.read_bytes(), headers=headers))


@datasets_app.command("show-filter")
def show_filter(sha256: Annotated[str, typer.Argument(help="The dataset's sha256.")]) -> None:
    """The dataset's registered n-gram filter."""
    _print(_call("GET", f"/datasets/{sha256}/ngram-filter"))


@datasets_app.command("delete-filter")
def delete_filter(sha256: Annotated[str, typer.Argument(help="The dataset's sha256.")]) -> None:
    """Forget the dataset's n-gram filter."""
    _call("DELETE", f"/datasets/{sha256}/ngram-filter")
    typer.echo(f"deleted the n-gram filter of {sha256}")


@datasets_app.command("contamination")
def contamination(
    sha256: Annotated[str, typer.Argument(help="The dataset's sha256.")],
    suite: Annotated[
        Path, typer.Option(help="The eval suite (as `loraplex eval run` reads it).", exists=True)
    ],
) -> None:
    """Check an eval suite against the dataset's registered filter; exit 1 when it holds any
    case (>= 70 % of the 8-word sequences of its input or reference answer)."""
    from gateway.evals.suite import SuiteError, load_suite

    try:
        loaded = load_suite(suite)
    except SuiteError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    body = loaded.model_dump(mode="json", by_alias=True)
    result = _call("POST", f"/datasets/{sha256}/contamination", json=body)
    _print(result)
    if result["contaminated"]:
        typer.echo(f"{len(result['contaminated'])} case(s) contaminated", err=True)
        raise typer.Exit(1)
