"""vLLM 0.32 LoRA linear layers whose adapter weights live in a `PagedLoraPool`.

vLLM gives every LoRA-wrapped linear layer `lora_a_stacked` / `lora_b_stacked`: per slice a
`[max_loras, 1, max_lora_rank, H]` buffer, so every slot costs the maximum rank. The classes
here (one per vLLM class a Llama uses: qkv fused or not, o_proj / down_proj, gate_up, plus the
plain column and replicated layers) keep vLLM's constructor, `can_replace_layer` and forward
wrapper and change only what touches the weights:

- `create_lora_weights` records the layer's geometry; the pool itself is allocated once every
  layer exists (`allocate_pool`), because the byte budget is shared by all of them.
  `lora_*_stacked` become zero-stride views with the old shapes: vLLM still reads their shape
  and dtype (dummy warm-up adapters) but any write to them raises instead of going nowhere.
- `set_lora` copies the adapter's rank rows into pages (`PagedLoraPool.load`), `reset_lora`
  frees them.
- `_apply_lora_to_output` adds the delta with `kernels.paged_lora_cpu`, driven by the punica
  wrapper's per-token slot ids (-1 = no adapter, exactly zero delta).

vLLM has already folded alpha/r (or alpha/sqrt(r)) into B when it calls `set_lora`, so slots
hold scale 1. Tensor parallelism, fully sharded LoRA and CUDA are refused, not half-served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config.lora import LoRAConfig
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)

from kernels.paged_lora_cpu import StepRows, paged_lora_linear_cpu, split_rows
from kernels.paged_pool import PagedLoraPool
from kernels.paged_stats import PagedPoolStats

Weights = torch.Tensor | Sequence[torch.Tensor | None] | None


def effective_rank(lora_a: Weights, lora_b: Weights) -> int:
    """Rank rows an adapter needs in one layer: the largest slice rank, 0 if it adds nothing.

    A slice whose A or B is absent or all zero contributes exactly zero, so it needs no pages;
    vLLM's warm-up adapters are all zeros and therefore cost no pool space.
    """
    if lora_a is None or lora_b is None:
        return 0
    a_list = [lora_a] if isinstance(lora_a, torch.Tensor) else list(lora_a)
    b_list = [lora_b] if isinstance(lora_b, torch.Tensor) else list(lora_b)
    rank = 0
    for a, b in zip(a_list, b_list, strict=True):
        if a is not None and b is not None and bool(a.any()) and bool(b.any()):
            rank = max(rank, a.shape[0])
    return rank


@dataclass(frozen=True)
class LayerGeometry:
    num_slots: int
    max_rank: int
    hidden_in: int
    slice_widths: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def page_bytes(self, page_size: int) -> int:
        return PagedLoraPool.page_bytes(
            page_size=page_size,
            hidden_in=self.hidden_in,
            slice_widths=self.slice_widths,
            dtype=self.dtype,
        )


def _step_rows(wrapper: object, token_slot: torch.Tensor, num_slots: int) -> StepRows:
    """Rows split by slot (`split_rows`), computed once per step and shared by every layer.

    vLLM rewrites the wrapper's index buffer in place (copy_) whenever the mapping changes,
    which bumps the tensor's version counter: (pointer, version, length) identifies a mapping.
    """
    key = (token_slot.data_ptr(), token_slot._version, token_slot.shape[0], num_slots)
    cached = getattr(wrapper, "_loraplex_step_rows", None)
    if cached is not None and cached[0] == key:
        rows: StepRows = cached[1]
        return rows
    rows = split_rows(token_slot, num_slots)
    wrapper._loraplex_step_rows = (key, rows)  # type: ignore[attr-defined]
    return rows


class PagedLinearMixin:
    """Paged storage for a `BaseLinearLayerWithLoRA`; put first in the bases."""

    # Provided by vLLM's layer classes.
    n_slices: int
    output_slices: tuple[int, ...]
    output_size: int
    input_size: int
    tp_size: int
    device: torch.device
    punica_wrapper: object

    paged_geometry: LayerGeometry
    paged_pool: PagedLoraPool | None = None
    paged_stats: PagedPoolStats | None = None

    def create_lora_weights(
        self, max_loras: int, lora_config: LoRAConfig, model_config: Any = None
    ) -> None:
        if self.tp_size > 1 or lora_config.fully_sharded_loras:
            raise NotImplementedError(
                "loraplex paged LoRA supports tensor parallel size 1 without fully sharded "
                "LoRA only; unset LORAPLEX_PAGED_LORA"
            )
        if torch.device(self.device).type != "cpu":
            raise NotImplementedError(
                "loraplex paged LoRA runs on CPU only so far (the CUDA path through "
                "kernels.sgmv_* is not wired into vLLM yet); unset LORAPLEX_PAGED_LORA"
            )
        self.lora_config = lora_config
        widths = tuple(self.output_slices) if self.n_slices > 1 else (self.output_size,)
        self.output_slices = widths
        max_rank = lora_config.max_lora_rank
        dtype = lora_config.lora_dtype
        assert isinstance(dtype, torch.dtype), f"vLLM resolves lora_dtype first, got {dtype!r}"
        self.paged_geometry = LayerGeometry(
            num_slots=max_loras,
            max_rank=max_rank,
            hidden_in=self.input_size,
            slice_widths=widths,
            dtype=dtype,
            device=torch.device(self.device),
        )
        zero = torch.zeros((), dtype=dtype, device=self.device)
        self.lora_a_stacked = tuple(
            zero.expand(max_loras, 1, max_rank, self.input_size) for _ in widths
        )
        self.lora_b_stacked = tuple(zero.expand(max_loras, 1, w, max_rank) for w in widths)

    def allocate_pool(self, num_pages: int, page_size: int, stats: PagedPoolStats) -> None:
        g = self.paged_geometry
        self.paged_pool = PagedLoraPool(
            num_pages=num_pages,
            page_size=page_size,
            num_slots=g.num_slots,
            max_rank=g.max_rank,
            hidden_in=g.hidden_in,
            slice_widths=g.slice_widths,
            dtype=g.dtype,
            device=g.device,
        )
        self.paged_stats = stats

    def _pool(self) -> PagedLoraPool:
        if self.paged_pool is None:
            raise RuntimeError("paged LoRA layer used before its pool was allocated")
        return self.paged_pool

    def _slices(
        self, lora_a: Weights, lora_b: Weights
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Per-slice lists (None = slice not adapted), packed groups expanded like vLLM."""
        if isinstance(lora_a, torch.Tensor) or isinstance(lora_b, torch.Tensor):
            # one unpacked slice: vLLM never mixes a tensor with a per-slice list
            assert not isinstance(lora_a, Sequence) and not isinstance(lora_b, Sequence)
            return [lora_a], [lora_b]
        a_list, b_list = list(lora_a or []), list(lora_b or [])
        if len(b_list) != self.n_slices:
            a_list, b_list = self.expand_packed_lora(a_list, b_list)  # type: ignore[attr-defined]
        return a_list, b_list

    def reset_lora(self, index: int) -> None:
        self._pool().evict(index)

    def set_lora(self, index: int, lora_a: Weights, lora_b: Weights) -> None:
        pool = self._pool()
        a_list, b_list = self._slices(lora_a, lora_b)
        rank = effective_rank(a_list, b_list)
        if rank == 0:
            pool.evict(index)
            return
        g = self.paged_geometry
        a_full, b_full = [], []
        for i, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
            a_i = torch.zeros(rank, g.hidden_in, dtype=g.dtype)
            b_i = torch.zeros(g.slice_widths[i], rank, dtype=g.dtype)
            if a is not None and b is not None:
                # A slice of lower rank (peft rank_pattern) is padded with zero rank rows.
                a_i[: a.shape[0], : a.shape[1]] = a
                b_i[: b.shape[0], : b.shape[1]] = b
            a_full.append(a_i)
            b_full.append(b_i)
        pages = pool.load(index, a_full, b_full, scale=1.0)
        if self.paged_stats is not None:
            self.paged_stats.bytes_in_total += len(pages) * g.page_bytes(pool.page_size)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        pool = self._pool()
        original_shape = output.shape if output.ndim == 3 else None
        if x.ndim == 3 and output.ndim == 3:  # transformers backend: [1, T, H]
            output = output.flatten(0, 1)
            x = x.flatten(0, 1)
        token_slot = self.punica_wrapper.token_lora_indices  # type: ignore[attr-defined]
        rows = _step_rows(self.punica_wrapper, token_slot, pool.num_slots)
        if not rows.empty:
            paged_lora_linear_cpu(
                output,
                x,
                pool.a_pages,
                pool.b_pages,
                pool.page_table,
                pool.slot_rank,
                pool.slot_scale,
                token_slot,
                pool.slice_widths,
                rows=rows,
            )
        if original_shape is not None:
            output = output.reshape(original_shape)
        return output


# vLLM class -> paged subclass. Only exact classes: the fully sharded variants subclass these
# but shard A and B across ranks, which the pool does not model.
_BASES = (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
)
PAGED_LAYER_CLASSES: dict[type, type] = {
    base: type(f"Paged{base.__name__}", (PagedLinearMixin, base), {}) for base in _BASES
}
