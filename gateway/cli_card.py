"""`loraplex card lint`: an Adaptation Card held to the design documents' numbers, offline
(registry/card_lint.py). Exit codes: 0 no error (warnings printed), 1 an error (or, with
--strict, a warning), 2 a card that does not validate or a file that cannot be read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn, cast

import typer

card_app = typer.Typer(help="Adaptation Cards, offline.", no_args_is_help=True)


@card_app.command("lint")
def lint(
    card: Annotated[Path, typer.Argument(help="The Adaptation Card (JSON).")],
    adapter: Annotated[
        Path | None,
        typer.Option(help="The adapter's PEFT folder: its adapter_config.json gives the rank."),
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="A warning fails too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Findings as JSON.")] = False,
) -> None:
    """Check a card's training record against the documents' ranges (learning rate, batch,
    warmup, dropout, κ, MinHash, DPO/KTO settings, data split) and flag rank above 32."""
    from registry.card import parse_card
    from registry.card_lint import lint_card

    parsed, problems = parse_card(_read(card))
    if parsed is None:
        for problem in problems:
            typer.echo(f"error: {card}: {problem.message}", err=True)
        raise typer.Exit(2)
    findings = lint_card(parsed, rank=_rank(adapter) if adapter is not None else None)
    if as_json:
        typer.echo(json.dumps([finding.as_dict() for finding in findings], indent=2))
    else:
        for f in findings:
            typer.echo(f"{f.severity:7}  {f.field}: {f.message} ({f.source})")
        typer.echo(f"{len(findings)} finding(s)" if findings else "no findings")
    failing = {"error", "warning"} if strict else {"error"}
    raise typer.Exit(1 if any(f.severity in failing for f in findings) else 0)


@card_app.command("dpo-check")
def dpo_check(
    dataset: Annotated[
        Path, typer.Argument(help="Preference pairs (JSON lines: prompt, chosen, rejected).")
    ],
    scope: Annotated[
        str | None,
        typer.Option(help="narrow (500-1k pairs) or broad (5k-20k); unset: 500-20k."),
    ] = None,
    audit: Annotated[
        Path | None,
        typer.Option(help='Audited pairs (JSON lines: {"pair": N, "verdict": "correct|wrong"}).'),
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="A warning fails too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Figures and findings as JSON.")] = False,
) -> None:
    """Measure a DPO dataset against the documents' limits: pair count for its scope, chosen
    vs rejected length (at most 20 % apart), audit error rate (at most 15 %), empty, identical
    and duplicate pairs. The figures are the card's dpo_pairs, pair_length_diff and
    audit_error_rate."""
    from registry.dpo_check import PAIRS, Scope, check_pairs

    if scope is not None and scope not in PAIRS:
        _fail(f"--scope is narrow or broad, not {scope!r}")
    try:
        report = check_pairs(dataset, cast(Scope | None, scope), audit)
    except OSError as exc:
        _fail(f"cannot read {exc.filename}: {exc.strerror}")
    findings = report.findings
    if as_json:
        body = {"figures": report.figures(), "findings": [f.as_dict() for f in findings]}
        typer.echo(json.dumps(body, indent=2))
    else:
        for key, value in report.figures().items():
            typer.echo(f"{key:22} {value}")
        for f in findings:
            typer.echo(f"{f.severity:7}  {f.field}: {f.message} ({f.source})")
        typer.echo(f"{len(findings)} finding(s)" if findings else "no findings")
    failing = {"error", "warning"} if strict else {"error"}
    raise typer.Exit(1 if any(f.severity in failing for f in findings) else 0)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc}")


def _rank(folder: Path) -> int:
    config = folder / "adapter_config.json"
    try:
        rank = json.loads(config.read_text(encoding="utf-8")).get("r")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError) as exc:
        _fail(f"cannot read the rank from {config}: {exc!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        _fail(f"{config}: r is {rank!r}, not a positive integer")
    return rank


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
