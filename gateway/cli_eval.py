"""`loraplex eval run`: an eval suite sent through the gateway with a tenant's key, judged
against release gates (gateway/evals/gates.py); the report is the evidence `loraplex adapters
evaluate NAME@V --report` hands in. `loraplex eval perplexity`: a dev set's prompt perplexity
under a version (gateway/evals/perplexity.py), the card's drift.dev_perplexity.

Reads LORAPLEX_URL (default http://127.0.0.1:8000) and LORAPLEX_API_KEY (a tenant's key).
Exit codes: 0 every gate passed, 1 a gate failed (or a prompt was refused), 2 usage or
connection error.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

eval_app = typer.Typer(
    help="Eval suites through the gateway (release gates).", no_args_is_help=True
)


@eval_app.command("run")
def run(
    suite: Annotated[Path, typer.Argument(help="Suite file: JSON, or JSON lines of cases.")],
    model: Annotated[str, typer.Option(help="The model under test, e.g. support-bot@3.")],
    baseline: Annotated[
        str | None,
        typer.Option(help="What it must do as well as: e.g. support-bot (its stable) or base."),
    ] = None,
    repeat: Annotated[int, typer.Option(min=1, max=100_000, help="Answers per case.")] = 1,
    concurrency: Annotated[int, typer.Option(min=1, max=256)] = 4,
    out: Annotated[Path | None, typer.Option(help="Write the report (JSON) here.")] = None,
    pin_sentinels: Annotated[
        Path | None,
        typer.Option(help="Write the suite with each unpinned sentinel pinned to its answer."),
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option(help="The key's tenant, if not the adapter's owner (checked as evidence)."),
    ] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds per request.")] = 300.0,
) -> None:
    """Send every case to MODEL (and BASELINE), judge the answers, print the gates."""
    from gateway.evals.gates import MAX_GENERATIONS, EvalReport
    from gateway.evals.runner import pin_sentinels as pinned_suite
    from gateway.evals.runner import run_suite
    from gateway.evals.suite import SuiteError, load_suite

    try:
        cases = load_suite(suite)
    except SuiteError as exc:
        _fail(str(exc))
    runs = 1 if baseline is None else 2
    if len(cases.cases) * repeat > MAX_GENERATIONS:
        _fail(f"{len(cases.cases)} cases x {repeat} repeats is over {MAX_GENERATIONS} answers")
    for target in (out, pin_sentinels):
        # Written after the run: a path that cannot be written is found now, not then.
        if target is not None and not os.access(target.parent.resolve(), os.W_OK):
            _fail(f"cannot write {target}: its folder is missing or read-only")
    http = _tenant_client(concurrency, timeout)

    async def go() -> EvalReport:
        async with http as client:
            await _probe(client)
            return await run_suite(
                client,
                cases,
                model=model,
                baseline=baseline,
                repeat=repeat,
                concurrency=concurrency,
                tenant=tenant,
            )

    typer.echo(f"{cases.name}: {len(cases.cases)} cases x {repeat} x {runs} model(s)", err=True)
    report = asyncio.run(go())
    if out is not None:
        out.write_text(report.model_dump_json(indent=2, by_alias=True), encoding="utf-8")
    if pin_sentinels is not None:
        pinned, unsteady = pinned_suite(cases, report.candidate)
        pin_sentinels.write_text(pinned.model_dump_json(indent=2, by_alias=True), encoding="utf-8")
        for case_id in unsteady:
            typer.echo(
                f"sentinel {case_id} left unpinned: its answers differed or failed", err=True
            )
    for gate in report.gates:
        mark = "pass" if gate.passed else ("FAIL" if gate.gated else "note")
        typer.echo(f"{mark:4}  {gate.name:24} {gate.detail}")
    typer.echo("passed" if report.passed else "failed")
    raise typer.Exit(0 if report.passed else 1)


@eval_app.command("perplexity")
def perplexity(
    dev_set: Annotated[
        Path, typer.Argument(help='Dev set: JSON lines of {"prompt": text or token ids}.')
    ],
    model: Annotated[str, typer.Option(help="The adapter version, e.g. support-bot@3.")],
    concurrency: Annotated[int, typer.Option(min=1, max=256)] = 4,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds per request.")] = 300.0,
    max_prompt_tokens: Annotated[
        int,
        typer.Option(
            min=1,
            help="Leave out longer prompts, as drift does (the gateway's "
            "LORAPLEX_DRIFT_MAX_PROMPT_TOKENS).",
        ),
    ] = 512,
) -> None:
    """The dev set's prompt perplexity under MODEL, as prompt drift measures live traffic: the
    value of the card's drift.dev_perplexity. Text prompts are tokenized as completions; give
    a chat adapter's prompts as the token ids of its rendered chat template."""
    from gateway.evals.perplexity import DevSetError, load_dev_set, measure

    try:
        prompts = load_dev_set(dev_set)
    except DevSetError as exc:
        _fail(str(exc))
    http = _tenant_client(concurrency, timeout)

    async def go() -> Any:
        async with http as client:
            await _probe(client)
            return await measure(client, model, prompts, concurrency, max_prompt_tokens)

    try:
        measured = asyncio.run(go())
    except (DevSetError, httpx.HTTPError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if measured.value is None:
        typer.echo(
            f"error: no prompt to score ({measured.skipped} over --max-prompt-tokens)", err=True
        )
        raise typer.Exit(1)
    result = {
        "model": model,
        "prompts": measured.prompts,
        "skipped_longer_prompts": measured.skipped,
        "tokens": measured.tokens,
        "perplexity": round(measured.value, 6),
        "card": {"drift": {"dev_perplexity": round(measured.value, 6)}},
    }
    typer.echo(json.dumps(result, indent=2))


def _tenant_client(concurrency: int, timeout: float) -> httpx.AsyncClient:
    """The gateway at LORAPLEX_URL with the tenant key LORAPLEX_API_KEY."""
    key = os.environ.get("LORAPLEX_API_KEY")
    if not key:
        _fail("set LORAPLEX_API_KEY to a tenant's key")
    return httpx.AsyncClient(
        base_url=os.environ.get("LORAPLEX_URL", "http://127.0.0.1:8000").rstrip("/"),
        headers={"Authorization": f"Bearer {key}"},
        timeout=timeout,
        limits=httpx.Limits(max_connections=concurrency),
    )


async def _probe(client: httpx.AsyncClient) -> None:
    """Connection and key first: a wrong URL or key is a usage error, not 100 failed answers."""
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the gateway: {exc}")
    if response.status_code in (401, 403):
        _fail(f"the gateway refused LORAPLEX_API_KEY ({response.status_code})")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
