"""Stacking LoRA adapters into one adapter, exactly, by concatenating their ranks.

Serving adapters 1..n together on one token means h = W0·x + Σ w_i·s_i·B_i·A_i·x, where s_i
is adapter i's scale (alpha_i/r_i, or alpha_i/√r_i for rsLoRA) and w_i the weight the stack
gives it. That sum is itself one LoRA of rank R = Σ r_i: A = [A_1; …; A_n] (R x in) and
B = [w_1·s_1·B_1 | … | w_n·s_n·B_n] (out x R) with scale 1 (alpha = R). So the engine serves a
stack as one ordinary adapter with one slot, and its output is the components' summed deltas
with no approximation, unlike a TIES or SVD merge, which would re-factor the sum at a lower
rank.

A module that only some components adapt gets zero rows from the others: the gate serves one
rank per adapter (PEFT's rank_pattern is refused), so every adapted module has rank R. Read and
written module by module by registry.lora_weights (float32 out, the scale applied in float64
and rounded once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from registry.errors import UploadTooLarge
from registry.lora_weights import LoraFile, ModuleShape, Pair, lora_bytes, write_lora


@dataclass(frozen=True)
class StackInput:
    """One component: its PEFT folder and the weight w_i the stack gives its delta."""

    folder: Path
    weight: float = 1.0


def write_stack(inputs: Sequence[StackInput], dest: Path, *, max_bytes: int | None = None) -> int:
    """Write the stack of `inputs` as a PEFT folder at `dest` (created; its parent must exist);
    returns its rank R. Raises UploadTooLarge, before writing anything, when its weights would
    exceed `max_bytes` (an upload's limit: a stack is an upload the registry makes).

    dest/adapter_config.json is the first component's config with r = alpha = R, no rsLoRA,
    and target_modules the union of the modules the components adapt."""
    if len(inputs) < 2:
        raise ValueError("a stack needs at least two components")
    components = [(LoraFile(item.folder), item.weight) for item in inputs]
    rank = sum(source.rank for source, _ in components)
    shapes: dict[str, ModuleShape] = {}
    for source, _ in components:
        for path, shape in source.shapes.items():
            if shapes.setdefault(path, shape) != shape:
                raise ValueError(f"{path}: the components disagree on its shape")
    if max_bytes is not None and lora_bytes(rank, shapes) > max_bytes:
        raise UploadTooLarge(max_bytes)

    def stacked(path: str) -> Pair:
        shape = shapes[path]
        a_blocks, b_blocks = [], []
        for source, weight in components:
            if path in source.shapes:
                a, b = source.module(path)
                a_blocks.append(a)
                b_blocks.append(b * (weight * source.scale))
            else:
                a_blocks.append(np.zeros((source.rank, shape.width_in)))
                b_blocks.append(np.zeros((shape.width_out, source.rank)))
        return np.concatenate(a_blocks, axis=0), np.concatenate(b_blocks, axis=1)

    write_lora(dest, template=components[0][0].config, rank=rank, shapes=shapes, module=stacked)
    return rank
