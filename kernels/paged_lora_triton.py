"""The paged LoRA delta through the SGMV Triton kernels: the paged layers' CUDA path.

    output[t] += scale_a · (x[t] · A_aᵀ) · B_aᵀ     a = token_slot[t], rank r_a rows only

per layer call: `SgmvMetadataBuilder.build` groups the rows by slot on the device (no host
sync), `sgmv_shrink` writes the rank columns into a float32 buffer and `sgmv_expand` adds the
result into `output` in place. Rows whose slot is -1 (no adapter) or holds rank 0 (nothing
paged in this layer) are in no segment and keep exactly the base output.

One `PagedSgmvRunner` serves every layer of a punica wrapper: the builder's buffers and the
shrink buffer are allocated once at the wrapper's `max_num_batched_tokens`, so the shapes a
step sees are fixed and the step can be captured in a CUDA graph. Metadata is rebuilt per
layer because an adapter's rank differs between layers (a layer it does not adapt holds 0).

On CPU the same code runs under `TRITON_INTERPRET=1` (slow; for tests of this path through a
real engine, `LORAPLEX_PAGED_KERNEL=triton`); `kernels.paged_lora_cpu` is the CPU path.
"""

from __future__ import annotations

import torch

from kernels.paged_pool import PagedLoraPool
from kernels.sgmv_expand import sgmv_expand
from kernels.sgmv_metadata import SgmvMetadataBuilder
from kernels.sgmv_shrink import sgmv_shrink


class PagedSgmvRunner:
    """Metadata builder and shrink buffer shared by the paged layers of one punica wrapper."""

    def __init__(self, *, max_tokens: int, num_slots: int, device: torch.device | str) -> None:
        self.max_tokens = max_tokens
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.builder = SgmvMetadataBuilder(
            max_tokens=max_tokens, num_slots=num_slots, device=self.device
        )
        # (num_slices, rank columns) -> [num_slices, max_tokens, columns] float32
        self._shrink_out: dict[tuple[int, int], torch.Tensor] = {}

    def _h(self, num_slices: int, columns: int, num_tokens: int) -> torch.Tensor:
        key = (num_slices, columns)
        buf = self._shrink_out.get(key)
        if buf is None:
            buf = torch.zeros(
                num_slices, self.max_tokens, columns, dtype=torch.float32, device=self.device
            )
            self._shrink_out[key] = buf
        return buf[:, :num_tokens]

    def apply(
        self,
        output: torch.Tensor,
        x: torch.Tensor,
        pool: PagedLoraPool,
        token_slot: torch.Tensor,
    ) -> torch.Tensor:
        """Add the delta of every row's adapter into `output` in place; returns `output`.

        output:     [T, sum(pool.slice_widths)], the pool's dtype
        x:          [T, pool.hidden_in], the pool's dtype
        token_slot: [T] integer slot per row, -1 = no adapter
        Raises ValueError on inputs that do not fit the pool or the runner.
        """
        # Raised, not asserted (`python -O` strips asserts): a slot id past the runner's slots
        # would index past the pool's page table.
        t = x.shape[0]
        if output.shape != (t, pool.hidden_out):
            raise ValueError(f"output must be [{t}, {pool.hidden_out}], got {tuple(output.shape)}")
        if token_slot.shape != (t,):
            raise ValueError(f"token_slot must be [{t}], got {tuple(token_slot.shape)}")
        if pool.num_slots != self.num_slots:
            raise ValueError(f"pool has {pool.num_slots} slots, the runner {self.num_slots}")
        if x.dtype != pool.a_pages.dtype or output.dtype != pool.b_pages.dtype:
            raise ValueError(
                f"x {x.dtype} and output {output.dtype} must be the pool's {pool.a_pages.dtype}"
            )
        if t == 0:
            return output
        meta = self.builder.build(token_slot, pool.slot_rank, pool.slot_scale)
        columns = pool.page_table.shape[1] * pool.page_size
        h = self._h(len(pool.slice_widths), columns, t)
        sgmv_shrink(x, pool.a_pages, pool.page_table, meta, out=h)
        sgmv_expand(h, pool.b_pages, pool.page_table, meta, output, pool.slice_widths)
        return output
