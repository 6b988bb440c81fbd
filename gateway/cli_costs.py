"""`loraplex break-even`: when distilling a teacher model's task into a served adapter pays
for itself (seed §10, 000:248-264). The documents' formula, V = fixed / (T · (P_teacher -
P_student)), in tokens: fixed / (P_teacher - P_student) with prices per token. Their worked
example ($5,700 fixed, $15 against $0.15 per million tokens) gives about 384 million tokens;
the 23.1 million they print does not follow from it."""

from __future__ import annotations

import math
from typing import Annotated

import typer

TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens, as providers quote them


def break_even_tokens(fixed_cost: float, teacher_price: float, student_price: float) -> float:
    """Tokens after which the student's savings repay `fixed_cost` (prices per million
    tokens); infinity when the student costs as much as the teacher or more."""
    saving = teacher_price - student_price
    if saving <= 0:
        return math.inf
    return fixed_cost / saving * TOKENS_PER_PRICE_UNIT


def _finite(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter(f"{value} is not a finite number >= 0")
    return value


def break_even(
    fixed_cost: Annotated[
        float, typer.Option(help="One-off cost: data, training, evaluation ($).", callback=_finite)
    ],
    teacher_price: Annotated[
        float, typer.Option(help="The teacher's price per million tokens ($).", callback=_finite)
    ],
    student_price: Annotated[
        float,
        typer.Option(help="The served adapter's cost per million tokens ($).", callback=_finite),
    ],
    tokens_per_request: Annotated[
        float | None, typer.Option(help="T: tokens per request, for V in requests.")
    ] = None,
    tokens_per_day: Annotated[
        float | None, typer.Option(help="Traffic, for the days until break-even.")
    ] = None,
) -> None:
    """Tokens (and requests, days) after which the distilled adapter has paid for itself."""
    for name, value in (
        ("--tokens-per-request", tokens_per_request),
        ("--tokens-per-day", tokens_per_day),
    ):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise typer.BadParameter(f"{name} {value} is not a finite number > 0")
    tokens = break_even_tokens(fixed_cost, teacher_price, student_price)
    if math.isinf(tokens):
        typer.echo("never: the student costs as much per token as the teacher, or more")
        raise typer.Exit(1)
    typer.echo(f"break-even after {tokens:,.0f} tokens ({tokens / 1e6:,.1f} M)")
    if tokens_per_request is not None:
        typer.echo(
            f"  = {tokens / tokens_per_request:,.0f} requests of {tokens_per_request:g} tokens"
        )
    if tokens_per_day is not None:
        typer.echo(f"  = {tokens / tokens_per_day:,.1f} days at {tokens_per_day:,.0f} tokens a day")
