"""Bounded waiting for an adapter slot in vLLM's own slot mode (paged mode off, the default).

vLLM 0.32's scheduler starts a waiting request only while the step's distinct adapters stay
within `max_loras`, and requests for adapters already running always fit. So one tenant that
keeps overlapping requests on `max_loras` adapters never lets the running set drain, and every
other adapter waits for as long as that traffic lasts (measured: a 4-token request still waiting
after 45 s, max_loras 2, while 16 of the other tenant's requests ran). There is no aging.

The rule (pure: adapters and times in, the requests to hold back out; `slot_scheduler` applies
it before each step, only while the running adapters fill every slot): once a waiting request
for an adapter that is not running has waited longer than `max_wait_s`, requests for other
adapters are held back, so no new request keeps a
running adapter's slot busy; the running ones finish and the aged adapters take the slots, in
arrival order. Requests without an adapter always pass, as do those for the aged adapters
themselves (one slot serves them all). Below the wait nothing changes: vLLM's order stands.
Paged mode has its own admission (kernels.paged_admission) with the same bounded wait.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotWaiting:
    key: object  # the caller's handle (vLLM's Request)
    adapter: int  # vLLM lora_int_id; 0 = no adapter
    arrival: float  # seconds, same clock as `now`


def held_back(
    running: Collection[int],
    waiting: Sequence[SlotWaiting],
    now: float,
    max_wait_s: float,
) -> list[SlotWaiting]:
    """The waiting requests to keep out of this step. `running`: the adapters of the requests
    already running (0 and negative ids are no adapter)."""
    starved = {
        w.adapter
        for w in waiting
        if w.adapter > 0 and w.adapter not in running and now - w.arrival > max_wait_s
    }
    if not starved:
        return []
    return [w for w in waiting if w.adapter > 0 and w.adapter not in starved]
