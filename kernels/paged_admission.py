"""Admission that knows the adapter pool: which waiting requests may join the next step.

vLLM 0.32's scheduler bounds a batch by `max_loras` distinct adapters and knows nothing of
pages. With the paged pool a slot is cheap and the bound is Σ ⌈rank / P⌉ pages of the
adapters in the batch, so the scheduler must not start a request whose adapter would not fit
beside the adapters already running: the worker would have to refuse the step (PoolExhausted).

The plan (pure: ids, page counts and times in, an order out; `paged_scheduler` applies it):
1. Requests that have waited longer than `max_wait_s` go first, oldest first: bounded waiting,
   so a rare adapter is never starved by popular ones. While the oldest of them does not fit,
   only requests without an adapter are admitted: no new adapter, and no further request for
   a running one either, so the running adapters drain and their pages go to it. (Admitting
   requests for running adapters let steady traffic to them hold the pages forever.)
2. Then requests whose adapter is already in the step (running, or admitted above): they cost
   no page and do not evict anything (LoRAX's adapter exchange keeps the active set busy).
3. Then the rest in arrival order, each newly admitted adapter followed at once by every other
   waiting request for it (grouping: one page-in serves them all).
Requests without an adapter always pass. A request whose adapter does not fit is held back
this step and considered again on the next one, in its arrival position.

Pages are per pool group (kernels.page_groups): an adapter fits when it fits every group.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kernels.page_groups import Pages, as_pages, declared_rank, pages_add, pages_fit


@dataclass(frozen=True)
class Waiting:
    key: object  # the caller's handle (vLLM's Request)
    adapter: int  # vLLM lora_int_id; 0 = no adapter
    pages: int | Pages  # pages the adapter takes, per pool group (0 without an adapter)
    arrival: float  # seconds, same clock as `now`


@dataclass(frozen=True)
class AdmissionPlan:
    order: list[Waiting]  # may join this step, in the order to try them
    held: list[Waiting]  # do not fit beside the step's adapters: wait for pages

    @property
    def held_adapters(self) -> set[int]:
        return {w.adapter for w in self.held}


class AdmissionPlanner:
    def __init__(self, *, total_pages: int | Sequence[int], max_wait_s: float):
        totals = as_pages(total_pages)
        assert all(t > 0 for t in totals), f"total_pages must be positive, got {totals}"
        assert max_wait_s >= 0, f"max_wait_s must be >= 0, got {max_wait_s}"
        self.total_pages: Pages = totals
        self.max_wait_s = max_wait_s

    def plan(
        self, running: Mapping[int, int | Pages], waiting: Sequence[Waiting], now: float
    ) -> AdmissionPlan:
        """`running`: adapter → pages of the adapters of requests already running."""
        in_step = {a: as_pages(p) for a, p in running.items() if a > 0}
        used: Pages = (0,) * len(self.total_pages)
        for pages in in_step.values():
            used = pages_add(used, pages)
        order: list[Waiting] = []
        held: list[Waiting] = []
        placed: set[int] = set()  # ids of requests put in order or held
        by_adapter: dict[int, list[Waiting]] = {}
        for w in waiting:
            by_adapter.setdefault(w.adapter, []).append(w)
        blocked = False  # an aged request is waiting for pages: admit no new adapter

        def admit_adapter(w: Waiting) -> bool:
            nonlocal used
            if w.adapter == 0:
                return True
            if blocked:  # draining for an aged request: nothing that keeps pages in use
                return False
            if w.adapter in in_step:
                return True
            pages = as_pages(w.pages)
            if not pages_fit(used, pages, self.total_pages):
                return False
            in_step[w.adapter] = pages
            used = pages_add(used, pages)
            return True

        def take(group: Iterable[Waiting]) -> None:
            for w in group:
                if id(w) not in placed:
                    placed.add(id(w))
                    order.append(w)

        aged = sorted(
            (w for w in waiting if now - w.arrival > self.max_wait_s), key=lambda w: w.arrival
        )
        for w in aged:
            if admit_adapter(w):
                take([w])
            elif not blocked:
                blocked = True  # the oldest unfit one reserves the pages that free up next
        for w in waiting:
            if id(w) not in placed and (w.adapter == 0 or (w.adapter in in_step and not blocked)):
                take([w])
        for w in waiting:
            if id(w) in placed:
                continue
            if admit_adapter(w):
                take(by_adapter[w.adapter])
        for w in waiting:
            if id(w) not in placed:
                placed.add(id(w))
                held.append(w)
        return AdmissionPlan(order, held)


def pages_for_rank(rank: int, page_size: int) -> int:
    assert rank > 0 and page_size > 0, f"rank and page_size must be positive: {rank}, {page_size}"
    return -(-rank // page_size)


def adapter_config(adapter_dir: str | Path) -> dict[str, object]:
    """A PEFT adapter's adapter_config.json, refused when it declares no positive rank."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if not isinstance(config, dict) or declared_rank(config) <= 0:
        raise ValueError(f"{adapter_dir}: adapter_config.json declares no positive rank")
    return config


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest rank a PEFT adapter declares (`r`, or any `rank_pattern` entry): what the
    worker may need in its widest layer. Read from adapter_config.json; the worker charges the
    rank it really finds (zero slices cost nothing), which is never more than this."""
    return declared_rank(adapter_config(adapter_dir))
