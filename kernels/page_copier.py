"""Where page-in copies run: inline on CPU; on CUDA on the current stream or a side stream.

On CUDA a step's host thread runs ahead of the GPU: while step N-1's kernels still execute,
the worker already applies step N's adapters. Copying a newly admitted adapter's rank rows on
the compute stream would queue them behind step N-1; on a side stream they overlap it. Three
orderings keep that correct (`PagedLoraPool` drives them):

- write after read: a page freed by an eviction may still be read by kernels already queued on
  the compute stream. `mark_freed` records an event there when pages are freed; a copy into
  them first makes the side stream wait for that event. Pages free for longer do not wait.
- read after write: `wait_ready` makes the compute stream wait for every copy issued so far.
  The worker calls it once per step, after applying the step's adapters and before the
  forward (kernels.paged_lora_manager), so a replayed CUDA graph reads finished pages too.
- the copies' sources: host rows are staged in pinned memory (an asynchronous copy from
  pageable memory is not asynchronous); PyTorch's pinned-memory cache records an event for
  each such copy and reuses the buffer only after it has run.

Contract that makes this hold: between two `wait_ready` calls nothing that reads the pages is
queued on the compute stream (the forward always follows `wait_ready`). It also lets all the
pages freed in that interval share one event, instead of one per layer per eviction.

Page-table rows, ranks and owners are written on the compute stream itself, by kernels that
take their values as arguments or from pinned memory (`device_tensor`), never by a blocking
copy, which would wait for every kernel queued before it: the previous step.

A pool made without a copier gets `PageCopier(device, side_stream=False)`: copies on the
current stream, ordered with its kernels as vLLM's own `set_lora` is, and still without a
host sync.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class PageCopier:
    """Copies staged host rows into pools' page tensors (one copier per worker device)."""

    def __init__(self, device: torch.device | str, *, side_stream: bool = True) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.pinned = cuda
        self.side_stream = torch.cuda.Stream(device=self.device) if cuda and side_stream else None
        self._unwaited: torch.cuda.Event | None = None  # latest copy not yet waited for
        self._last: torch.cuda.Event | None = None  # latest copy
        self._freed: torch.cuda.Event | None = None  # this interval's `mark_freed` event

    @property
    def asynchronous(self) -> bool:
        """Copies run on a side stream: the compute stream must `wait_ready` for them."""
        return self.side_stream is not None

    def host_zeros(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        """A zeroed host staging buffer, pinned when copies go to a CUDA device."""
        return torch.zeros(*shape, dtype=dtype, pin_memory=self.pinned)

    def device_tensor(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        """`values` on the device, copied on the current stream without a host sync."""
        host = torch.tensor(values, dtype=dtype, pin_memory=self.pinned)
        return host.to(self.device, non_blocking=self.pinned)

    def mark_freed(self, *, fresh: bool = False) -> torch.cuda.Event | None:
        """An event after every kernel queued on the current stream before pages were freed
        (None without a side stream: copies on the same stream are ordered anyway).

        fresh: record a new event even within the interval, for pages just written on the
        current stream (a new pool's zero fill) rather than read by earlier steps."""
        if self.side_stream is None:
            return None
        if fresh:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            return event
        if self._freed is None:
            self._freed = torch.cuda.Event()
            self._freed.record(torch.cuda.current_stream(self.device))
        return self._freed

    def copy_pages(
        self,
        dst: Iterable[torch.Tensor],
        index: list[int],
        src: Iterable[torch.Tensor],
        *,
        after: Iterable[torch.cuda.Event | None] = (),
    ) -> None:
        """dst[k][index[i]] = src[k][i] for each pair: src holds one row per page, on the host
        (from `host_zeros`). `after`: `mark_freed` events of the pages being written."""
        pairs = list(zip(dst, src, strict=True))
        if self.side_stream is None:
            pages = self.device_tensor(index, torch.long)
            for d, s in pairs:
                d.index_copy_(0, pages, s.to(d.device, non_blocking=self.pinned))
            return
        with torch.cuda.stream(self.side_stream):
            for event in {id(e): e for e in after if e is not None}.values():
                self.side_stream.wait_event(event)
            # Temporaries are allocated on the side stream, so the caching allocator reuses
            # their memory only in this stream's order.
            pages = self.device_tensor(index, torch.long)
            for d, s in pairs:
                assert s.is_pinned(), "host rows must be staged with host_zeros (pinned)"
                d.index_copy_(0, pages, s.to(self.device, non_blocking=True))
            ready = torch.cuda.Event()
            ready.record(self.side_stream)
        self._unwaited = self._last = ready

    def wait_ready(self) -> None:
        """Make the current stream wait for every copy issued so far; kernels queued after
        this call may read every page loaded before it. A no-op without a side stream."""
        self._freed = None  # kernels reading pages may follow: later frees need a new event
        if self._unwaited is not None:
            torch.cuda.current_stream(self.device).wait_event(self._unwaited)
            self._unwaited = None

    def copies_done(self) -> bool:
        """Whether every copy issued so far has finished on the device (tests)."""
        return self._last is None or self._last.query()
