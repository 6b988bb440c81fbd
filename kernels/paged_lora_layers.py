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
- `set_lora` copies the adapter's rank rows into pages (`PagedLoraPool.load`; on CUDA on the
  worker's side stream, kernels.page_copier), `reset_lora` frees them.
- `_apply_lora_to_output` adds the delta, driven by the punica wrapper's per-token slot ids
  (-1 = no adapter, exactly zero delta), with the layer's kernel (`resolve_kernel`): the SGMV
  Triton kernels (`kernels.paged_lora_triton`, the CUDA path; on CPU only under
  TRITON_INTERPRET=1, for tests) or the torch path `kernels.paged_lora_cpu` (CPU).

vLLM has already folded alpha/r (or alpha/sqrt(r)) into B when it calls `set_lora`, so slots
hold scale 1. Tensor parallelism and fully sharded LoRA are refused, not half-served.
"""

from __future__ import annotations

import os
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

from kernels.page_copier import PageCopier
from kernels.paged_lora_cpu import paged_lora_pool_cpu
from kernels.paged_lora_triton import PagedSgmvRunner
from kernels.paged_pool import PagedLoraPool
from kernels.paged_stats import PagedPoolStats
from kernels.paged_step_rows import StepRows, split_rows

Weights = torch.Tensor | Sequence[torch.Tensor | None] | None
KERNELS = ("auto", "torch", "triton")


def resolve_kernel(requested: str, device: torch.device) -> str:
    """The kernel a paged layer on `device` runs: "triton" or "torch".

    auto picks Triton on CUDA and the torch path on CPU. The torch path is refused on CUDA (it
    syncs the host every layer) and Triton on CPU without TRITON_INTERPRET=1 (no CPU backend).
    """
    assert requested in KERNELS, f"kernel must be one of {KERNELS}, got {requested!r}"
    if device.type == "cuda":
        if requested == "torch":
            raise NotImplementedError(
                "loraplex paged LoRA: the torch path is for CPU; use LORAPLEX_PAGED_KERNEL=auto "
                "or triton on CUDA"
            )
        return "triton"
    if device.type != "cpu":
        raise NotImplementedError(f"loraplex paged LoRA runs on CPU or CUDA, not {device.type}")
    if requested == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise NotImplementedError(
                "LORAPLEX_PAGED_KERNEL=triton on CPU needs TRITON_INTERPRET=1 (Triton has no "
                "CPU backend; the interpreter is for tests)"
            )
        return "triton"
    return "torch"


def effective_rank(lora_a: Weights, lora_b: Weights) -> int:
    """Rank rows an adapter needs in one layer: the largest slice rank, 0 if it adds nothing.

    A slice whose A or B is absent or all zero contributes exactly zero, so it needs no pages;
    vLLM's warm-up adapters are all zeros and therefore cost no pool space.
    """
    if lora_a is None or lora_b is None:
        return 0
    a_list = [lora_a] if isinstance(lora_a, torch.Tensor) else list(lora_a)
    b_list = [lora_b] if isinstance(lora_b, torch.Tensor) else list(lora_b)
    return max((_slice_rank(a, b) for a, b in zip(a_list, b_list, strict=True)), default=0)


def _slice_rank(a: torch.Tensor | None, b: torch.Tensor | None) -> int:
    """One slice's rank, or 0 where it contributes exactly zero (A or B absent or all zero)."""
    if a is None or b is None or not bool(a.any()) or not bool(b.any()):
        return 0
    return int(a.shape[0])


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


def _sgmv_runner(wrapper: object, pool: PagedLoraPool) -> PagedSgmvRunner:
    """The wrapper's `PagedSgmvRunner`, made on first use at its max_num_batched_tokens."""
    runner = getattr(wrapper, "_loraplex_sgmv_runner", None)
    if runner is None:
        indices: torch.Tensor = wrapper._token_lora_indices  # type: ignore[attr-defined]
        runner = PagedSgmvRunner(
            max_tokens=indices.shape[0], num_slots=pool.num_slots, device=indices.device
        )
        wrapper._loraplex_sgmv_runner = runner  # type: ignore[attr-defined]
    assert isinstance(runner, PagedSgmvRunner)
    return runner


def _padded_token_slots(wrapper: object, num_rows: int) -> torch.Tensor:
    """Slot per row of x. Under CUDA-graph padding x has more rows than the mapping: the
    fixed buffer is sliced by x's rows (padding rows get some delta, and are discarded),
    never by the mapping's host-side length, so a captured step keeps fixed shapes."""
    indices: torch.Tensor = wrapper._token_lora_indices  # type: ignore[attr-defined]
    return indices[:num_rows]


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
    paged_kernel: str = "torch"

    def create_lora_weights(
        self, max_loras: int, lora_config: LoRAConfig, model_config: Any = None
    ) -> None:
        if self.tp_size > 1 or lora_config.fully_sharded_loras:
            raise NotImplementedError(
                "loraplex paged LoRA supports tensor parallel size 1 without fully sharded "
                "LoRA only; unset LORAPLEX_PAGED_LORA"
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

    def allocate_pool(
        self,
        num_pages: int,
        page_size: int,
        stats: PagedPoolStats,
        kernel: str = "auto",
        copier: PageCopier | None = None,
    ) -> None:
        """Allocate the layer's pages; `copier` is shared by the worker's layers (one side
        stream on CUDA, which the worker waits for once per step)."""
        g = self.paged_geometry
        self.paged_kernel = resolve_kernel(kernel, g.device)
        self.paged_pool = PagedLoraPool(
            num_pages=num_pages,
            page_size=page_size,
            num_slots=g.num_slots,
            max_rank=g.max_rank,
            hidden_in=g.hidden_in,
            slice_widths=g.slice_widths,
            dtype=g.dtype,
            device=g.device,
            copier=copier,
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
        slice_ranks = [_slice_rank(a, b) for a, b in zip(a_list, b_list, strict=True)]
        rank = max(slice_ranks, default=0)  # effective_rank
        if rank == 0:
            pool.evict(index)
            return
        g = self.paged_geometry
        a_full, b_full = [], []
        for i, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
            if (
                a is not None
                and b is not None
                and a.shape == (rank, g.hidden_in)
                and b.shape == (g.slice_widths[i], rank)
            ):  # the common case: nothing to pad; the pool stages it (and casts) as it is
                a_full.append(a)
                b_full.append(b)
                continue
            a_i = torch.zeros(rank, g.hidden_in, dtype=g.dtype)
            b_i = torch.zeros(g.slice_widths[i], rank, dtype=g.dtype)
            if a is not None and b is not None and slice_ranks[i] > 0:
                # A slice of lower rank (peft rank_pattern) is padded with zero rank rows. A
                # slice that adds nothing (all-zero A or B) stays zeros: its rank may exceed
                # the effective one and would not fit.
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
        if self.paged_kernel == "triton":
            _sgmv_runner(self.punica_wrapper, pool).apply(
                output, x, pool, _padded_token_slots(self.punica_wrapper, x.shape[0])
            )
            return output if original_shape is None else output.reshape(original_shape)
        token_slot = self.punica_wrapper.token_lora_indices  # type: ignore[attr-defined]
        rows = _step_rows(self.punica_wrapper, token_slot, pool.num_slots)
        if not rows.empty:
            paged_lora_pool_cpu(output, x, pool, token_slot, rows=rows)
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
