"""SGMV expand: y[t, slice i columns] += h[i, t, :r] · B_{s,i}ᵀ for every token t of segment s.

K is the rank: each program loops over its segment's own rank in BLOCK_K steps, gathering
B's rank rows through the page table, so bytes and FLOPs follow the adapter's real rank.
Fused layers (q/k/v with unequal GQA widths, gate/up) run as one launch, one grid slice per
output slice. The scale was applied by shrink.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.sgmv_metadata import SgmvMetadata, check_metadata, check_page_table


@dataclass(frozen=True)
class ExpandConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _sgmv_expand_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    token_ids_ptr,
    seg_indptr_ptr,
    seg_adapter_ptr,
    seg_rank_ptr,
    page_table_ptr,
    slice_bounds_ptr,
    stride_hs,
    stride_hm,
    stride_hk,
    stride_bp,
    stride_br,
    stride_bn,
    stride_ym,
    stride_yn,
    stride_pt,
    PAGE_SIZE: tl.constexpr,
    MAX_RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BF16_DOT: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_n = tl.program_id(1)
    slice_id = tl.program_id(2)

    adapter = tl.load(seg_adapter_ptr + seg)
    rank = tl.minimum(tl.load(seg_rank_ptr + seg), MAX_RANK)
    start = tl.load(seg_indptr_ptr + seg)
    end = tl.load(seg_indptr_ptr + seg + 1)
    col_lo = tl.load(slice_bounds_ptr + slice_id)
    col_hi = tl.load(slice_bounds_ptr + slice_id + 1)
    n0 = col_lo + pid_n * BLOCK_N
    if (adapter < 0) | (rank <= 0) | (end <= start) | (n0 >= col_hi):
        return

    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < col_hi
    pt_row = page_table_ptr + adapter.to(tl.int64) * stride_pt
    h_slice = h_ptr + slice_id * stride_hs

    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        tok = tl.load(token_ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)  # not tl.zeros: see shrink
        for k0 in range(0, rank, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < rank
            page = tl.load(pt_row + offs_k // PAGE_SIZE, mask=k_mask, other=-1)
            k_mask = k_mask & (page >= 0)
            h_tile = tl.load(
                h_slice + tok[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b_tile = tl.load(
                b_ptr
                + page.to(tl.int64)[:, None] * stride_bp
                + (offs_k % PAGE_SIZE)[:, None] * stride_br
                + offs_n[None, :] * stride_bn,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            if IEEE_DOT:  # fp32 weights
                acc += tl.dot(h_tile, b_tile, input_precision="ieee")
            elif BF16_DOT:  # bf16 has fp32's exponent range: h rounds without overflowing
                acc += tl.dot(h_tile.to(b_tile.dtype), b_tile)
            else:
                # fp16 weights: h (scale applied) can pass fp16's 65504 where y does not, so
                # h stays fp32 and B widens exactly; tf32 keeps fp16's 10-bit mantissa.
                acc += tl.dot(h_tile, b_tile.to(tl.float32), input_precision="tf32")
        y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
        y_mask = m_mask[:, None] & n_mask[None, :]
        # Segments partition the tokens and there is no split-K: a plain read-add-write is exact.
        y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=y_mask)


def default_config(meta: SgmvMetadata, *, max_width: int, on_gpu: bool) -> ExpandConfig:
    """Heuristic tiles: 16-wide rank steps (the tl.dot minimum), wide column tiles."""
    block_m = max(16, min(64, triton.next_power_of_2(max(meta.max_seg_len, 1))))
    block_n = max(16, min(128 if on_gpu else 64, triton.next_power_of_2(max_width)))
    return ExpandConfig(block_m=block_m, block_n=block_n, block_k=16)


_BOUNDS_CACHE: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}


def _slice_bounds(widths: Sequence[int], device: torch.device) -> torch.Tensor:
    """[num_slices + 1] int32 column bounds, made once per (device, widths) and cached, so a
    step launched under CUDA-graph capture finds it made (the first, eager call makes it).

    Made with one fill kernel per entry on the current stream, ordered before the launch that
    reads it, never with torch.tensor(list, device=...): that is a pageable host-to-device copy,
    which synchronizes the host (refused by torch.cuda.set_sync_debug_mode("error")) and cannot
    be recorded by a graph capture.
    """
    bounds = [0]
    for w in widths:
        bounds.append(bounds[-1] + int(w))
    key = (device, tuple(bounds))
    cached = _BOUNDS_CACHE.get(key)
    if cached is None:
        cached = torch.empty(len(bounds), dtype=torch.int32, device=device)
        for i, b in enumerate(bounds):
            cached[i].fill_(b)
        _BOUNDS_CACHE[key] = cached
    return cached


def _check(
    h: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    meta: SgmvMetadata,
    y: torch.Tensor,
    slice_widths: Sequence[int],
) -> None:
    # Raised, not asserted: these keep the kernel's loads and stores in bounds, and `python -O`
    # strips asserts. Shapes, dtypes, strides and devices only: no device sync.
    if h.dim() != 3 or h.dtype != torch.float32:
        raise ValueError(f"h must be float32 [slices, T, max_rank], got {h.dtype} {tuple(h.shape)}")
    if b_pages.dim() != 3:
        raise ValueError(f"b_pages must be [pages, P, H_out], got {tuple(b_pages.shape)}")
    if y.dim() != 2:
        raise ValueError(f"y must be [T, H_out], got {tuple(y.shape)}")
    if y.dtype != b_pages.dtype:
        raise ValueError(f"y is {y.dtype}, b_pages is {b_pages.dtype}")
    if y.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported {y.dtype}")
    if len(slice_widths) != h.shape[0]:
        raise ValueError(f"{len(slice_widths)} slice widths, h has {h.shape[0]}")
    if not all(w > 0 for w in slice_widths):
        raise ValueError(f"slice widths must be positive: {list(slice_widths)}")
    h_out = sum(slice_widths)
    if y.shape != (h.shape[1], h_out):
        raise ValueError(f"y must be [{h.shape[1]}, {h_out}], got {tuple(y.shape)}")
    if b_pages.shape[2] != h_out:
        raise ValueError(f"b_pages hold {b_pages.shape[2]} columns, slices sum {h_out}")
    check_page_table(page_table, h.device, "h")
    max_rank = page_table.shape[1] * b_pages.shape[1]
    if h.shape[2] != max_rank:
        raise ValueError(f"h has {h.shape[2]} rank columns, the pool {max_rank}")
    if meta.num_tokens != h.shape[1]:
        raise ValueError(f"metadata for {meta.num_tokens} tokens, h has {h.shape[1]}")
    for name, t in (("b_pages", b_pages), ("y", y)):
        if t.device != h.device:
            raise ValueError(f"{name} on {t.device}, h on {h.device}")
    check_metadata(meta, h.device, "h")


def sgmv_expand(
    h: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    meta: SgmvMetadata,
    y: torch.Tensor,
    slice_widths: Sequence[int],
    *,
    config: ExpandConfig | None = None,
) -> torch.Tensor:
    """y[t, c_i : c_i + w_i] += h[i, t, :r_s] · Bᵀ rows of slot a_s for t in segment s, in place.

    h:            [num_slices, T, max_pages·P] float32, from sgmv_shrink (scale applied)
    b_pages:      [num_pages, P, H_out] fp16 / bf16 / fp32 (see kernels.paged_pool)
    page_table:   [num_slots, max_pages] int32
    meta:         SgmvMetadata for the T rows
    y:            [T, H_out], b_pages' dtype; rows of tokens without an adapter are untouched
    slice_widths: output width of each slice, H_out = sum; c_i = sum of widths before i
    Returns y. Accumulation is fp32. For the dot, h is kept fp32 with fp32 and fp16 weights
    (fp16 ones go through tf32, so |h| > 65504 cannot overflow) and rounded to bf16 with bf16
    weights (bf16 has fp32's range). Raises ValueError on a shape, dtype, stride or device the
    kernel cannot index safely; page_table's rows and meta's tensors must be contiguous.
    """
    _check(h, b_pages, page_table, meta, y, slice_widths)
    if h.shape[1] == 0 or meta.num_segments == 0:
        return y
    max_width = max(slice_widths)
    cfg = config or default_config(meta, max_width=max_width, on_gpu=y.device.type == "cuda")
    grid = (meta.num_segments, triton.cdiv(max_width, cfg.block_n), len(slice_widths))
    _sgmv_expand_kernel[grid](
        h,
        b_pages,
        y,
        meta.token_ids,
        meta.seg_indptr,
        meta.seg_adapter,
        meta.seg_rank,
        page_table,
        _slice_bounds(slice_widths, y.device),
        *h.stride(),
        *b_pages.stride(),
        *y.stride(),
        page_table.stride(0),
        PAGE_SIZE=b_pages.shape[1],
        MAX_RANK=h.shape[2],
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        IEEE_DOT=y.dtype == torch.float32,
        BF16_DOT=y.dtype == torch.bfloat16,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y


def sgmv_expand_ref(
    h: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    meta: SgmvMetadata,
    y: torch.Tensor,
    slice_widths: Sequence[int],
    *,
    config: ExpandConfig | None = None,
) -> torch.Tensor:
    """Pure-torch `sgmv_expand` (same contract; `config` is ignored). Loops over segments on
    the host, so it syncs: a correctness oracle and CPU fallback, not a captured path."""
    _check(h, b_pages, page_table, meta, y, slice_widths)
    page_size, max_rank = b_pages.shape[1], h.shape[2]
    bounds = [0]
    for w in slice_widths:
        bounds.append(bounds[-1] + int(w))
    indptr = meta.seg_indptr.tolist()
    for s, (adapter, rank) in enumerate(
        zip(meta.seg_adapter.tolist(), meta.seg_rank.tolist(), strict=True)
    ):
        rank = min(rank, max_rank)
        if adapter < 0 or rank <= 0 or indptr[s + 1] <= indptr[s]:
            continue
        rows = torch.arange(rank, device=h.device)
        page = page_table[adapter].long()[rows // page_size]
        # Filled, not multiplied by a 0/1 mask: inf in page 0 (another adapter's) x 0 = NaN.
        b = b_pages[page.clamp(min=0), rows % page_size].float().masked_fill(page[:, None] < 0, 0)
        tok = meta.token_ids[indptr[s] : indptr[s + 1]].long()
        delta = torch.cat(
            [h[i, tok, :rank] @ b[:, bounds[i] : bounds[i + 1]] for i in range(len(slice_widths))],
            dim=1,
        )
        y[tok] = (y[tok].float() + delta).to(y.dtype)
    return y
