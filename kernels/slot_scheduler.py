"""vLLM 0.32's scheduler with bounded waiting for an adapter slot (slot mode, paged mode off).

`FairSlotMixin.schedule` asks `kernels.slot_admission.held_back` which waiting requests to keep
out of this step, takes them out of the waiting queue, runs vLLM's own `schedule()` unchanged,
and puts them back in arrival order (FCFS). Below the bounded wait, or with a slot free, it
costs one pass over the waiting queue's arrival times.

How it gets in (`install`, called by the plugin in every vLLM process): the module attributes
`Scheduler` and `AsyncScheduler` are rebound to subclasses, which is what
`SchedulerConfig.get_scheduler_cls()` returns when no scheduler class is configured (async
scheduling picks the second, as on CUDA).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler as VllmAsyncScheduler
from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler
from vllm.v1.request import RequestStatus

from kernels.slot_admission import SlotWaiting, held_back

logger = logging.getLogger(__name__)

_max_wait_s: float = 10.0  # set by install() in the engine-core process


def _adapter(request: Any) -> int:
    lora = request.lora_request
    return 0 if lora is None or lora.lora_int_id <= 0 else int(lora.lora_int_id)


# A request in another waiting state (its grammar compiling, remote KV arriving) waits for
# that, not for a slot: it neither starves nor is held back.
_SLOT_STATES = frozenset({RequestStatus.WAITING, RequestStatus.PREEMPTED})


def _slot_adapter(request: Any) -> int:
    return _adapter(request) if request.status in _SLOT_STATES else 0


class FairSlotMixin:
    """schedule() with bounded waiting for an adapter slot; mixed into vLLM's schedulers."""

    lora_config: Any
    waiting: Any
    running: list[Any]
    requests_held_total: int = 0  # request-steps held back (for tests and debugging)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        schedule = super().schedule  # type: ignore[misc]
        if self.lora_config is None or not self.waiting:
            return schedule(*args, **kwargs)
        # Cheap exits first: this runs every step, with up to thousands waiting.
        now = time.time()
        if now - min(r.arrival_time for r in self.waiting) <= _max_wait_s:
            return schedule(*args, **kwargs)
        running = {_adapter(r) for r in self.running} - {0}
        if len(running) < self.lora_config.max_loras:
            return schedule(*args, **kwargs)  # a slot is free: vLLM's own rule admits it
        waiting = list(self.waiting)
        held = held_back(
            running,
            [SlotWaiting(r, _slot_adapter(r), r.arrival_time) for r in waiting],
            now,
            _max_wait_s,
        )
        if not held:
            return schedule(*args, **kwargs)
        self.requests_held_total += len(held)
        keys = {id(w.key) for w in held}
        _requeue(self.waiting, [r for r in waiting if id(r) not in keys])
        try:
            return schedule(*args, **kwargs)
        finally:
            rest = [*self.waiting, *(w.key for w in held)]
            _requeue(self.waiting, sorted(rest, key=lambda r: r.arrival_time))


class FairSlotScheduler(FairSlotMixin, VllmScheduler):
    pass


class FairSlotAsyncScheduler(FairSlotMixin, VllmAsyncScheduler):
    pass


def _requeue(queue: Any, requests: list[Any]) -> None:
    if isinstance(queue, FCFSRequestQueue):
        queue.clear()
        queue.extend(requests)
        return
    queue.remove_requests(list(queue))  # a priority queue orders itself again
    for request in requests:
        queue.add_request(request)


def install(max_wait_s: float) -> list[str]:
    """Rebind vLLM's scheduler classes to the fair ones (idempotent)."""
    import vllm.v1.core.sched.async_scheduler as async_module
    import vllm.v1.core.sched.scheduler as scheduler_module

    global _max_wait_s
    _max_wait_s = max_wait_s
    scheduler_module.Scheduler = FairSlotScheduler  # type: ignore[misc]
    async_module.AsyncScheduler = FairSlotAsyncScheduler  # type: ignore[misc]
    logger.debug("loraplex: slot admission with a bounded wait of %.1f s", max_wait_s)
    return [
        "vllm.v1.core.sched.scheduler.Scheduler",
        "vllm.v1.core.sched.async_scheduler.AsyncScheduler",
    ]
