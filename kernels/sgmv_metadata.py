"""Per-step SGMV metadata: the batch's tokens grouped into single-adapter segments.

A segment is a run of at most `chunk_size` tokens that share one adapter slot (SGLang-style
chunking: it bounds the work of one program, so a long prefill of one adapter still spreads
over many programs). The tokens are not moved; `token_ids` lists the batch rows in segment
order and the kernels gather through it.

The builder writes into buffers allocated once at `max_tokens`: no `.item()`, no `.tolist()`,
no data-dependent shape, so building metadata and running the kernels can be captured in one
CUDA graph. The number of segments a step may need is bounded by its token count alone:
sum_a ceil(n_a / C) <= T // C + min(T, num_slots); unused trailing segments are empty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SgmvMetadata:
    """Segments of one step, as views of fixed-size device buffers.

    token_ids:   [T] int32, batch rows in segment order; segment s covers
                 token_ids[seg_indptr[s] : seg_indptr[s + 1]].
    seg_indptr:  [S + 1] int32, non-decreasing; empty segments have equal bounds.
    seg_adapter: [S] int32, adapter slot (row of the page table); -1 = no adapter, skipped.
    seg_rank:    [S] int32, the slot's rank (rank rows 0..rank-1 are read); 0 = skipped.
    seg_scale:   [S] float32, alpha/r (or alpha/sqrt(r) for rsLoRA), applied in shrink.
    num_tokens:  T, the batch size these segments index (rows of x and y).
    max_seg_len: host-side bound on any segment's length (picks the kernels' M tile).
    """

    token_ids: torch.Tensor
    seg_indptr: torch.Tensor
    seg_adapter: torch.Tensor
    seg_rank: torch.Tensor
    seg_scale: torch.Tensor
    num_tokens: int
    max_seg_len: int

    @property
    def num_segments(self) -> int:
        return self.seg_adapter.shape[0]

    def with_rank(self, rank: int) -> SgmvMetadata:
        """Same segments with every active segment's rank forced to `rank` (pad-to-max baseline)."""
        forced = torch.where(self.seg_rank > 0, rank, 0).to(torch.int32)
        return dataclasses.replace(self, seg_rank=forced)


def check_metadata(meta: SgmvMetadata, device: torch.device, against: str) -> None:
    """Raise ValueError unless the kernels can index `meta` safely: every tensor 1-D of its
    documented dtype and length, unit stride (the kernels add plain offsets to its pointer) and
    on `device`, where the tensor named `against` lives. Shapes, strides and devices only: no
    value is read, so the check costs no device sync and is allowed under CUDA-graph capture.
    """
    s = meta.num_segments
    for name, t, n, dtype in (
        ("token_ids", meta.token_ids, meta.num_tokens, torch.int32),
        ("seg_indptr", meta.seg_indptr, s + 1, torch.int32),
        ("seg_adapter", meta.seg_adapter, s, torch.int32),
        ("seg_rank", meta.seg_rank, s, torch.int32),
        ("seg_scale", meta.seg_scale, s, torch.float32),
    ):
        if t.shape != (n,) or t.dtype != dtype:
            raise ValueError(f"meta.{name} must be {dtype} [{n}], got {t.dtype} {tuple(t.shape)}")
        if n > 1 and t.stride(0) != 1:
            raise ValueError(f"meta.{name} must be contiguous, got stride {t.stride(0)}")
        if t.device != device:
            raise ValueError(f"meta on {t.device}, {against} on {device}")


def check_page_table(page_table: torch.Tensor, device: torch.device, against: str) -> None:
    """Raise ValueError unless the kernels can index `page_table` [slots, max_pages] safely:
    int32, 2-D, rows contiguous (the kernels add page indices to a row's pointer), on `device`."""
    if page_table.dim() != 2 or page_table.dtype != torch.int32:
        raise ValueError(
            f"page_table must be int32 [slots, max_pages], "
            f"got {page_table.dtype} {tuple(page_table.shape)}"
        )
    if page_table.shape[1] > 1 and page_table.stride(1) != 1:
        raise ValueError(f"page_table rows must be contiguous, got strides {page_table.stride()}")
    if page_table.device != device:
        raise ValueError(f"page_table on {page_table.device}, {against} on {device}")


def max_segments(num_tokens: int, num_slots: int, chunk_size: int) -> int:
    """Upper bound on the segments `num_tokens` tokens over `num_slots` adapters can form."""
    return num_tokens // chunk_size + min(num_tokens, num_slots)


class SgmvMetadataBuilder:
    """Builds `SgmvMetadata` on the device into buffers preallocated for `max_tokens`."""

    def __init__(
        self,
        *,
        max_tokens: int,
        num_slots: int,
        chunk_size: int = 16,
        device: torch.device | str,
    ) -> None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.max_tokens = max_tokens
        self.num_slots = num_slots
        self.chunk_size = chunk_size
        self.device = torch.device(device)
        s_max = max_segments(max_tokens, num_slots, chunk_size)
        dev = self.device
        self._token_ids = torch.zeros(max_tokens, dtype=torch.int32, device=dev)
        self._seg_indptr = torch.zeros(s_max + 1, dtype=torch.int32, device=dev)
        self._seg_adapter = torch.full((s_max,), -1, dtype=torch.int32, device=dev)
        self._seg_rank = torch.zeros(s_max, dtype=torch.int32, device=dev)
        self._seg_scale = torch.zeros(s_max, dtype=torch.float32, device=dev)
        self._seg_iota = torch.arange(s_max, dtype=torch.int64, device=dev)
        self.device = self._token_ids.device  # "cuda" -> "cuda:0", to compare with inputs

    def build(
        self, token_adapter: torch.Tensor, slot_rank: torch.Tensor, slot_scale: torch.Tensor
    ) -> SgmvMetadata:
        """Group the batch by adapter.

        token_adapter: [T] integer, each row's adapter slot; -1 (or any id outside
                       [0, num_slots)) means no adapter: the row is in no segment.
        slot_rank:     [num_slots] integer, rank of the adapter in each slot (0 if empty).
        slot_scale:    [num_slots] float, scale of the adapter in each slot.
        Returns views valid until the next `build`.
        """
        # Raised, not asserted: they keep the copies into the fixed buffers in bounds, and
        # `python -O` strips asserts.
        if token_adapter.dim() != 1:
            raise ValueError(f"token_adapter must be [T], got {tuple(token_adapter.shape)}")
        t = token_adapter.shape[0]
        if not 0 < t <= self.max_tokens:
            raise ValueError(f"{t} tokens, builder holds 1..{self.max_tokens}")
        if slot_rank.shape != (self.num_slots,):
            raise ValueError(f"slot_rank must be [{self.num_slots}]")
        if slot_scale.shape != (self.num_slots,):
            raise ValueError(f"slot_scale must be [{self.num_slots}]")
        for name, tensor in (
            ("token_adapter", token_adapter),
            ("slot_rank", slot_rank),
            ("slot_scale", slot_scale),
        ):
            if tensor.device != self.device:
                raise ValueError(f"{name} on {tensor.device}, builder on {self.device}")
        n_slots, chunk = self.num_slots, self.chunk_size
        s = max_segments(t, n_slots, chunk)

        ids = token_adapter.to(torch.int64)
        # Rows without a valid adapter sort after every slot and are left out of all segments.
        key = torch.where((ids < 0) | (ids >= n_slots), n_slots, ids)
        _, order = torch.sort(key, stable=True)
        self._token_ids[:t].copy_(order)

        counts = torch.zeros(n_slots + 1, dtype=torch.int64, device=self.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        counts = counts[:n_slots]
        chunks = (counts + (chunk - 1)) // chunk
        chunk_end = torch.cumsum(chunks, 0)
        token_end = torch.cumsum(counts, 0)

        seg = self._seg_iota[:s]
        slot = torch.searchsorted(chunk_end, seg, right=True)
        valid = slot < n_slots
        slot_c = slot.clamp(max=n_slots - 1)
        first_chunk = chunk_end[slot_c] - chunks[slot_c]
        start = token_end[slot_c] - counts[slot_c] + (seg - first_chunk) * chunk
        adapter_tokens = token_end[-1:]
        start = torch.where(valid, start, adapter_tokens)
        self._seg_indptr[:s].copy_(start)
        self._seg_indptr[s : s + 1].copy_(adapter_tokens)
        self._seg_adapter[:s].copy_(torch.where(valid, slot_c, -1))
        rank = slot_rank.to(torch.int64)[slot_c]
        self._seg_rank[:s].copy_(torch.where(valid, rank, 0))
        scale = slot_scale.to(torch.float32)[slot_c]
        self._seg_scale[:s].copy_(torch.where(valid, scale, 0.0))
        return SgmvMetadata(
            token_ids=self._token_ids[:t],
            seg_indptr=self._seg_indptr[: s + 1],
            seg_adapter=self._seg_adapter[:s],
            seg_rank=self._seg_rank[:s],
            seg_scale=self._seg_scale[:s],
            num_tokens=t,
            max_seg_len=min(t, chunk),
        )


def metadata_from_segments(
    seg_lens: Sequence[int],
    seg_adapter: Sequence[int],
    slot_rank: Sequence[int],
    slot_scale: Sequence[float],
    *,
    device: torch.device | str,
) -> SgmvMetadata:
    """Host-side metadata for a batch already laid out as segments (rows in order).

    Punica's input form: segment s is the next seg_lens[s] rows and uses slot seg_adapter[s]
    (-1 = none). Lengths may be 0 and segments may be arbitrarily long. For tests and
    benchmarks; the serving path uses `SgmvMetadataBuilder`.
    """
    if len(seg_lens) != len(seg_adapter):
        raise ValueError("seg_lens and seg_adapter differ in length")
    if any(n < 0 for n in seg_lens):
        raise ValueError(f"negative segment length in {list(seg_lens)}")
    t = sum(seg_lens)
    indptr = [0]
    for n in seg_lens:
        indptr.append(indptr[-1] + n)
    rank = [slot_rank[a] if a >= 0 else 0 for a in seg_adapter]
    scale = [float(slot_scale[a]) if a >= 0 else 0.0 for a in seg_adapter]
    return SgmvMetadata(
        token_ids=torch.arange(t, dtype=torch.int32, device=device),
        seg_indptr=torch.tensor(indptr, dtype=torch.int32, device=device),
        seg_adapter=torch.tensor(list(seg_adapter), dtype=torch.int32, device=device),
        seg_rank=torch.tensor(rank, dtype=torch.int32, device=device),
        seg_scale=torch.tensor(scale, dtype=torch.float32, device=device),
        num_tokens=t,
        max_seg_len=max(seg_lens, default=0),
    )
