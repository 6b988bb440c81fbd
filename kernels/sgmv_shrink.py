"""SGMV shrink: h[i, t, :r] = scale_s · x[t] · A_{s,i}ᵀ for every token t of segment s.

Rank-aware: a segment of rank r reads only its r rank rows of A (gathered through the page
table) and programs whose rank tile lies past r exit at once, so bytes and FLOPs follow each
adapter's own rank rather than the pool's maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.sgmv_metadata import SgmvMetadata, check_metadata, check_page_table


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    token_ids_ptr,
    seg_indptr_ptr,
    seg_adapter_ptr,
    seg_rank_ptr,
    seg_scale_ptr,
    page_table_ptr,
    hidden_in,
    stride_xm,
    stride_xk,
    stride_ap,
    stride_as,
    stride_ar,
    stride_ak,
    stride_os,
    stride_om,
    stride_on,
    stride_pt,
    PAGE_SIZE: tl.constexpr,
    MAX_RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_n = tl.program_id(1) // SPLIT_K
    pid_k = tl.program_id(1) % SPLIT_K
    slice_id = tl.program_id(2)

    adapter = tl.load(seg_adapter_ptr + seg)
    rank = tl.minimum(tl.load(seg_rank_ptr + seg), MAX_RANK)
    start = tl.load(seg_indptr_ptr + seg)
    end = tl.load(seg_indptr_ptr + seg + 1)
    n0 = pid_n * BLOCK_N
    if (adapter < 0) | (n0 >= rank) | (end <= start):
        return
    scale = tl.load(seg_scale_ptr + seg)

    # Rank rows of this tile, each gathered from its page; unmapped pages read as zero.
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < rank
    page = tl.load(
        page_table_ptr + adapter.to(tl.int64) * stride_pt + offs_n // PAGE_SIZE,
        mask=n_mask,
        other=-1,
    )
    n_mask = n_mask & (page >= 0)
    a_rows = (
        a_ptr
        + page.to(tl.int64) * stride_ap
        + slice_id * stride_as
        + (offs_n % PAGE_SIZE) * stride_ar
    )
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    STEP_K: tl.constexpr = BLOCK_K * SPLIT_K

    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        tok = tl.load(token_ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
        a_ptrs = a_rows[None, :] + offs_k[:, None] * stride_ak
        # tl.full, not tl.zeros, and no tl.cdiv: Triton's own @jit helpers cannot run in the
        # interpreter when Triton was imported before TRITON_INTERPRET was set.
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for k in range(0, (hidden_in + STEP_K - 1) // STEP_K):
            if EVEN_K:
                x_tile = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
                a_tile = tl.load(a_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = offs_k < hidden_in - k * STEP_K
                x_tile = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                a_tile = tl.load(a_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            if IEEE_DOT:
                acc += tl.dot(x_tile, a_tile, input_precision="ieee")
            else:
                acc += tl.dot(x_tile, a_tile)
            x_ptrs += STEP_K * stride_xk
            a_ptrs += STEP_K * stride_ak
        acc = acc * scale
        out_ptrs = (
            out_ptr + slice_id * stride_os + tok[:, None] * stride_om + offs_n[None, :] * stride_on
        )
        out_mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc, mask=out_mask)
        else:
            tl.atomic_add(out_ptrs, acc, mask=out_mask)


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def default_config(
    meta: SgmvMetadata,
    *,
    hidden_in: int,
    max_rank: int,
    num_slices: int,
    dtype: torch.dtype,
    num_sms: int | None,
) -> ShrinkConfig:
    """Heuristic tiles: a K loop over H_in, split along K until a GPU with `num_sms` SMs has
    enough programs (decode batches have few segments). `num_sms` None (CPU) = no split."""
    block_m = _pow2_at_least(meta.max_seg_len, 16, 64)
    block_n = 16 if max_rank <= 16 else 32
    block_k = _pow2_at_least(hidden_in, 16, 128 if dtype == torch.float32 else 256)
    split_k = 1
    if num_sms is not None:
        programs = meta.num_segments * triton.cdiv(max_rank, block_n) * num_slices
        while programs * split_k < 4 * num_sms and block_k * split_k * 2 <= hidden_in:
            split_k *= 2
    return ShrinkConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k)


def _num_sms(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check(
    x: torch.Tensor,
    a_pages: torch.Tensor,
    page_table: torch.Tensor,
    meta: SgmvMetadata,
    out: torch.Tensor | None,
) -> tuple[int, int]:
    # Raised, not asserted: these keep the kernel's loads and stores in bounds, and `python -O`
    # strips asserts. Shapes, dtypes, strides and devices only: no device sync.
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H_in], got {tuple(x.shape)}")
    if a_pages.dim() != 4:
        raise ValueError(f"a_pages must be [pages, slices, P, H_in], got {tuple(a_pages.shape)}")
    if x.dtype != a_pages.dtype:
        raise ValueError(f"x is {x.dtype}, a_pages is {a_pages.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported {x.dtype}")
    if x.shape[1] != a_pages.shape[3]:
        raise ValueError(f"H_in: x has {x.shape[1]}, A has {a_pages.shape[3]}")
    if x.stride(1) != 1 or a_pages.stride(3) != 1:
        raise ValueError("x and a_pages rows must be contiguous")
    check_page_table(page_table, x.device, "x")
    if meta.num_tokens != x.shape[0]:
        raise ValueError(f"metadata for {meta.num_tokens} tokens, x has {x.shape[0]}")
    if a_pages.device != x.device:
        raise ValueError(f"a_pages on {a_pages.device}, x on {x.device}")
    check_metadata(meta, x.device, "x")
    num_slices = a_pages.shape[1]
    max_rank = page_table.shape[1] * a_pages.shape[2]
    if out is not None:
        if out.shape != (num_slices, x.shape[0], max_rank):
            raise ValueError(
                f"out must be [{num_slices}, {x.shape[0]}, {max_rank}], got {tuple(out.shape)}"
            )
        if out.dtype != torch.float32 or out.device != x.device:
            raise ValueError("out must be float32 on x's device")
    return num_slices, max_rank


def sgmv_shrink(
    x: torch.Tensor,
    a_pages: torch.Tensor,
    page_table: torch.Tensor,
    meta: SgmvMetadata,
    *,
    out: torch.Tensor | None = None,
    config: ShrinkConfig | None = None,
) -> torch.Tensor:
    """h[i, t, :r_s] = scale_s · x[t] · A_{a_s, i}[:r_s]ᵀ for t in segment s; 0 elsewhere.

    x:          [T, H_in]  fp16 / bf16 / fp32
    a_pages:    [num_pages, num_slices, P, H_in], same dtype (see kernels.paged_pool)
    page_table: [num_slots, max_pages] int32
    meta:       SgmvMetadata for the T rows of x
    out:        optional [num_slices, T, max_pages·P] float32 buffer; zeroed, then filled
    Returns h (= out): [num_slices, T, max_pages·P] float32. Rows of tokens without an adapter
    and rank columns past a segment's rank are 0. Accumulation is fp32. Raises ValueError on a
    shape, dtype, stride or device the kernel cannot index safely; page_table's rows and
    meta's tensors must be contiguous.
    """
    num_slices, max_rank = _check(x, a_pages, page_table, meta, out)
    if out is None:
        out = torch.zeros(num_slices, x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    else:
        out.zero_()
    if x.shape[0] == 0 or meta.num_segments == 0:
        return out
    hidden_in = x.shape[1]
    cfg = config or default_config(
        meta,
        hidden_in=hidden_in,
        max_rank=max_rank,
        num_slices=num_slices,
        dtype=x.dtype,
        num_sms=_num_sms(x.device),
    )
    grid = (meta.num_segments, triton.cdiv(max_rank, cfg.block_n) * cfg.split_k, num_slices)
    _sgmv_shrink_kernel[grid](
        x,
        a_pages,
        out,
        meta.token_ids,
        meta.seg_indptr,
        meta.seg_adapter,
        meta.seg_rank,
        meta.seg_scale,
        page_table,
        hidden_in,
        x.stride(0),
        x.stride(1),
        *a_pages.stride(),
        *out.stride(),
        page_table.stride(0),
        PAGE_SIZE=a_pages.shape[2],
        MAX_RANK=max_rank,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        EVEN_K=hidden_in % (cfg.block_k * cfg.split_k) == 0,
        IEEE_DOT=x.dtype == torch.float32,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def sgmv_shrink_ref(
    x: torch.Tensor,
    a_pages: torch.Tensor,
    page_table: torch.Tensor,
    meta: SgmvMetadata,
    *,
    out: torch.Tensor | None = None,
    config: ShrinkConfig | None = None,
) -> torch.Tensor:
    """Pure-torch `sgmv_shrink` (same contract; `config` is ignored). Loops over segments on
    the host, so it syncs: a correctness oracle and CPU fallback, not a captured path."""
    num_slices, max_rank = _check(x, a_pages, page_table, meta, out)
    if out is None:
        out = torch.zeros(num_slices, x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    else:
        out.zero_()
    page_size = a_pages.shape[2]
    indptr = meta.seg_indptr.tolist()
    for s, (adapter, rank, scale) in enumerate(
        zip(meta.seg_adapter.tolist(), meta.seg_rank.tolist(), meta.seg_scale.tolist(), strict=True)
    ):
        rank = min(rank, max_rank)
        if adapter < 0 or rank <= 0 or indptr[s + 1] <= indptr[s]:
            continue
        rows = torch.arange(rank, device=x.device)
        page = page_table[adapter].long()[rows // page_size]
        mapped = page >= 0
        a = a_pages[page.clamp(min=0), :, rows % page_size].float()  # [r, slices, H_in]
        # Filled, not multiplied by a 0/1 mask: inf in page 0 (another adapter's) x 0 = NaN.
        a = a.masked_fill(~mapped[:, None, None], 0.0)
        tok = meta.token_ids[indptr[s] : indptr[s + 1]].long()
        h = torch.einsum("th,rsh->str", x[tok].float(), a) * scale
        out[:, tok, :rank] = h
    return out
