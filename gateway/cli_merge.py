"""`loraplex merge`: adapters folded into a copy of the base model (a checkpoint that serves
without LoRA), offline, on local folders: no gateway needed (registry.merge_weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from registry.merge_weights import MergeInput


def merge(
    base: Annotated[Path, typer.Argument(help="The base model's folder (safetensors weights).")],
    adapters: Annotated[
        list[str],
        typer.Argument(
            help="PEFT adapter folders, each optionally :WEIGHT (default 1), e.g. "
            "adapters/support-bot adapters/safety-guard:0.5."
        ),
    ],
    out: Annotated[Path, typer.Option(help="The merged checkpoint's folder (must not exist).")],
    method: Annotated[
        str, typer.Option(help="linear (merge_and_unload; sums) or ties (TIES-Merging).")
    ] = "linear",
    density: Annotated[
        float, typer.Option(help="ties: the share of each delta's entries kept, (0, 1].")
    ] = 1.0,
) -> None:
    """Merge adapters into the base's weights; the compatibility gate checks each first."""
    from registry.errors import RegistryError
    from registry.merge_weights import METHODS, merge_into_base

    if method not in METHODS:
        _fail(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if not (math.isfinite(density) and 0 < density <= 1):
        _fail(f"--density {density} is not within (0, 1]")
    if method == "linear" and density != 1:
        _fail("--density applies to --method ties only")
    inputs = [_input(text) for text in adapters]
    try:
        record = merge_into_base(base, inputs, out, method=method, density=density)  # type: ignore[arg-type]
    except (ValueError, OSError, RegistryError) as exc:  # RegistryError: an unreadable base
        _fail(str(exc))
    typer.echo(json.dumps({"out": str(out), **record}, indent=2))


def _input(text: str) -> MergeInput:
    from registry.merge_weights import MergeInput

    path, sep, weight = text.rpartition(":")
    if sep and Path(path).is_dir():
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            _fail(f"{text!r}: the weight after ':' must be a number")
        return MergeInput(Path(path), value)
    if not Path(text).is_dir():
        _fail(f"{text}: no such adapter folder")
    return MergeInput(Path(text))


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
