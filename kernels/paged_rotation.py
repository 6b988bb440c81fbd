"""Time-shared pages: which running and waiting requests take part in the next step.

`kernels.paged_admission` holds a new adapter back until the pages of a running one free up,
so a request whose adapter does not fit beside the running batch waits about one whole
request lifetime (benchmarks/residency_sim.py shows TTFT p95 pinned there). Here, pages are
shared between steps instead: a running request may sit out a step so that another adapter
can use its pages, which costs a page copy (host DRAM -> pool) rather than a lifetime. Every
step still fits the pool and at most `max_adapters` adapters, as vLLM and the worker require.

The plan (pure: ids, page counts and times in, a selection out; `paged_scheduler` applies it):
1. Running requests that sat out longer than `max_skip_s`, longest first: no request stalls
   mid-stream for long.
2. Waiting requests older than `max_wait_s`, oldest first (bounded waiting, as in admission).
3. New waiting requests in arrival order: a new request starts at once, which is what keeps
   time to first token short.
4. The other running requests, the one that ran most recently first: a request that was in
   the last step still has its pages, so keeping it costs no copy, while one that sat out
   comes back through rule 1. (Least recently run first, a round robin, swapped adapters
   every step: on the CPU that measured 3.9x vLLM's time per output token, most of it copies;
   benchmarks/results/residency/run-2026-12-01-5.)
Oversubscription is bounded: a waiting request whose adapter is not running yet may start
only while the running adapters' pages, with its own, stay within `max_oversubscription` x
the pool, and their number within `max_oversubscription` x `max_adapters` (slots bind before
pages for low-rank adapters); otherwise it waits (as under `hold`) until running requests
finish. An aged request that the bound keeps out blocks everything after it but requests
without an adapter, requests for running adapters included, so the running set drains to it
(as under `hold`, oldest first): younger or steadier traffic cannot keep it out forever.
New requests are offered only while vLLM has room to start them (`room`, its max_num_seqs
less the running requests): a waiting request chosen over running ones that vLLM then cannot
start left the step empty. Without the
bound, an open-loop burst let every new adapter in, each running request got an ever smaller
share of the steps, requests lived longer, more piled up: TTFT p95 3.96x vLLM's where the
closed loop measured 0.21x (benchmarks/results/residency/run-2026-12-01-7). With it, every
running request takes part in at least about 1 / max_oversubscription of the steps.
Admitting an adapter brings every request for it (running and waiting) into the step, since
they cost no further page. Requests without an adapter always take part. What does not fit
sits out this step: running requests keep their KV cache, waiting ones their place.

Pages are per pool group (kernels.page_groups): fitting, and the oversubscription bound, hold
in every group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kernels.page_groups import Pages, as_pages, pages_add, pages_fit
from kernels.paged_admission import Waiting


@dataclass(frozen=True)
class Running:
    key: object  # the caller's handle (vLLM's Request)
    adapter: int  # vLLM lora_int_id; 0 = no adapter
    pages: int | Pages  # per pool group
    last_run: float  # when a step last included it (its admission, at first)


@dataclass(frozen=True)
class RotationPlan:
    run: list[Running]  # running requests in this step, in their original order
    skip: list[Running]  # running requests that sit this step out
    order: list[Waiting]  # waiting requests that may start, in the order to try them
    held: list[Waiting]  # waiting requests that do not fit this step


class RotationPlanner:
    def __init__(
        self,
        *,
        total_pages: int | Sequence[int],
        max_adapters: int,
        max_wait_s: float,
        max_skip_s: float,
        max_oversubscription: float = 2.0,
    ) -> None:
        totals = as_pages(total_pages)
        assert all(t > 0 for t in totals) and max_adapters > 0, (
            "the pool and the slots must be positive"
        )
        assert max_wait_s >= 0 and max_skip_s >= 0, "waits must be >= 0"
        assert max_oversubscription >= 1, (
            f"max_oversubscription must be >= 1, got {max_oversubscription}"
        )
        self.total_pages: Pages = totals
        self._zero: Pages = (0,) * len(totals)
        self.max_adapters = max_adapters
        self.max_wait_s = max_wait_s
        self.max_skip_s = max_skip_s
        self.max_oversubscription = max_oversubscription

    def _startable(
        self, running: Sequence[Running], waiting: list[Waiting], now: float
    ) -> list[Waiting]:
        """The waiting requests, in order, whose start keeps the running adapters' pages within
        max_oversubscription x the pool and their count within max_oversubscription x
        max_adapters. Requests of running adapters and base may start, unless an aged request
        the bound keeps out came before them: then only base requests may."""
        demand = {r.adapter: as_pages(r.pages) for r in running if r.adapter != 0}
        used = self._zero
        for pages in demand.values():
            used = pages_add(used, pages)
        adapter_cap = self.max_oversubscription * self.max_adapters
        startable = []
        blocked = False
        for w in waiting:
            if w.adapter == 0:
                startable.append(w)
                continue
            if blocked:
                continue
            if w.adapter not in demand:
                pages = as_pages(w.pages)
                if len(demand) >= adapter_cap or not pages_fit(
                    used, pages, self.total_pages, self.max_oversubscription
                ):
                    blocked = now - w.arrival > self.max_wait_s  # aged: the set drains to it
                    continue
                demand[w.adapter] = pages
                used = pages_add(used, pages)
            startable.append(w)
        return startable

    def plan(
        self,
        running: Sequence[Running],
        waiting: Sequence[Waiting],
        now: float,
        room: int | None = None,
    ) -> RotationPlan:
        """`room`: how many waiting requests vLLM can start this step (None: no limit)."""
        chosen: dict[int, Pages] = {}  # adapter -> pages, the step's adapters
        used = self._zero

        def fits(adapter: int, pages: int | Pages) -> bool:
            nonlocal used
            if adapter == 0 or adapter in chosen:
                return True
            need = as_pages(pages)
            if len(chosen) >= self.max_adapters or not pages_fit(used, need, self.total_pages):
                return False
            chosen[adapter] = need
            used = pages_add(used, need)
            return True

        stalled = sorted(
            (r for r in running if now - r.last_run > self.max_skip_s), key=lambda r: r.last_run
        )
        aged = sorted(
            (w for w in waiting if now - w.arrival > self.max_wait_s), key=lambda w: w.arrival
        )
        fresh = [w for w in waiting if now - w.arrival <= self.max_wait_s]
        offered = self._startable(running, [*aged, *fresh], now)
        if room is not None:
            offered = offered[: max(0, room)]  # what vLLM could not start must not skip anyone
        startable = {id(w) for w in offered}
        aged = [w for w in aged if id(w) in startable]
        fresh = [w for w in fresh if id(w) in startable]
        by_recency = sorted(running, key=lambda r: -r.last_run)
        candidates: list[Running | Waiting] = [*stalled, *aged, *fresh, *by_recency]
        for item in candidates:
            fits(item.adapter, item.pages)
        # The first candidate always fits an empty pool (the scheduler refuses to start with a
        # pool smaller than one max_lora_rank adapter), so no step is left empty.

        def in_step(adapter: int) -> bool:
            return adapter == 0 or adapter in chosen

        order = [w for w in [*aged, *fresh] if in_step(w.adapter)]
        ordered = {id(w) for w in order}
        return RotationPlan(
            run=[r for r in running if in_step(r.adapter)],
            skip=[r for r in running if not in_step(r.adapter)],
            order=order,
            held=[w for w in waiting if id(w) not in ordered],
        )
