"""vLLM 0.32's scheduler with residency-aware admission, for paged mode (LORAPLEX_PAGED_LORA).

vLLM bounds a batch by `max_loras` distinct adapters; with the paged pool the real bound is the
pool's pages, so `ResidencyAwareScheduler` reorders and filters the waiting queue before each
step with `kernels.paged_admission.AdmissionPlanner` (page budget, grouping by adapter,
bounded waiting) and then runs vLLM's own `schedule()` unchanged. Requests held back stay
queued in arrival order and are planned again on the next step.

How it gets in (`install`, called by the plugin in every vLLM process):
- `vllm.v1.core.sched.scheduler.Scheduler` is rebound to the subclass: that is what
  `SchedulerConfig.get_scheduler_cls()` returns when no scheduler class is configured and
  async scheduling is off (always on CPU, where paged mode runs today).
- `EngineCore._initialize_kv_caches` is wrapped: it runs after the workers built their pools
  and before the scheduler is made, so it asks them for the pool (the plugin's
  `loraplex_paged_pool_groups` worker method: page size, the layer groups, their pages and
  the PEFT module names whose weights land in each) and leaves it for the scheduler, which
  lives in the engine-core process while the workers may not.
The page counts therefore are the workers' real ones, never a second computation of them.
A request's adapter is charged per group from its weights' safetensors header (module names
and ranks of the tensors vLLM loads: `PoolGroups.adapter_pages`), an upper bound of what the
worker charges; without a readable header, max_lora_rank in every group.
- `EngineCore.loraplex_residency_waits` is added: a utility method (vLLM's
  `engine_core.call_utility_async`) that hands the gateway the residency waits measured since
  its last call, since the scheduler's figures live in this process and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler
from vllm.v1.request import RequestStatus

from kernels.page_groups import Pages, PoolGroups, lora_weight_ranks, pages_for_rank
from kernels.paged_admission import AdmissionPlanner, Waiting
from kernels.paged_rotation import RotationPlanner, Running

logger = logging.getLogger(__name__)


@dataclass
class AdmissionStats:
    steps_planned: int = 0
    requests_held_total: int = 0  # request-steps held back for lack of pages
    steps_reordered: int = 0


# Waits measured but not yet read by the gateway; beyond this many the oldest are dropped (a
# gateway that never scrapes must not grow the engine's memory).
WAIT_BUFFER = 65_536

# Set in the engine-core process by the wrapped _initialize_kv_caches; read by the scheduler.
_pool: PoolGroups | None = None
_max_wait_s: float = 10.0
_policy: str = "rotate"
_max_skip_s: float = 0.2
_max_oversubscription: float = 2.0


class ResidencyAwareScheduler(VllmScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.admission_stats = AdmissionStats()
        self._pages: dict[int, Pages] = {}  # lora_int_id -> pages it may take, per group
        # Residency wait: from the first step admission held a request back for lack of pages
        # to the step that started it. Requests never held back are not measured.
        self._held_since: dict[str, float] = {}  # request_id -> first hold
        self._waits: deque[float] = deque(maxlen=WAIT_BUFFER)
        self._planner: AdmissionPlanner | None = None
        self._rotation: RotationPlanner | None = None
        self._last_run: dict[str, float] = {}  # rotate: request_id -> last step it was in
        # rotate: the last step skipped running requests and scheduled nothing (vLLM could not
        # start the waiting ones it made room for, e.g. no KV blocks): the next one starts none.
        self._start_none_next = False
        self._no_pages: Pages = ()
        if self.lora_config is None:
            return
        if _pool is None:
            raise RuntimeError(
                "loraplex paged LoRA: the workers reported no adapter pool; is the plugin "
                "loaded in every vLLM process (VLLM_PLUGINS)?"
            )
        widest = pages_for_rank(self.lora_config.max_lora_rank, _pool.page_size)
        small = {g.name: g.pages for g in _pool.groups if g.pages < widest}
        if small:
            raise ValueError(
                f"loraplex paged LoRA: the pool has {small} pages of {_pool.page_size} rank "
                f"rows, an adapter of max_lora_rank {self.lora_config.max_lora_rank} needs "
                f"{widest}: raise LORAPLEX_PAGED_POOL_BYTES or lower max_lora_rank"
            )
        self._no_pages = (0,) * len(_pool.groups)
        self._planner = AdmissionPlanner(total_pages=_pool.totals, max_wait_s=_max_wait_s)
        if _policy == "rotate":
            self._rotation = RotationPlanner(
                total_pages=_pool.totals,
                max_adapters=self.lora_config.max_loras,
                max_wait_s=_max_wait_s,
                max_skip_s=_max_skip_s,
                max_oversubscription=_max_oversubscription,
            )
        logger.info(
            "loraplex paged LoRA admission: pages %s of %d rank rows, policy %s, max wait %.1f s",
            dict(zip(_pool.names, _pool.totals, strict=True)),
            _pool.page_size,
            _policy,
            _max_wait_s,
        )

    def _adapter_pages(self, request: Any) -> tuple[int, Pages]:
        lora = request.lora_request
        if lora is None or lora.lora_int_id <= 0:
            return 0, self._no_pages
        pages = self._pages.get(lora.lora_int_id)
        if pages is None:
            assert _pool is not None and self.lora_config is not None
            ranks = lora_weight_ranks(lora.lora_path)
            pages = _pool.adapter_pages(ranks, self.lora_config.max_lora_rank)
            self._pages[lora.lora_int_id] = pages
        return lora.lora_int_id, pages

    def schedule(self, throttle_prefills: bool = False) -> Any:
        try:
            return self._plan_and_schedule(throttle_prefills)
        finally:
            if self._held_since:
                self._settle_waits(time.time())

    def drain_residency_waits(self) -> list[float]:
        """Seconds each request started since the last call waited for its adapter's pages."""
        waits = list(self._waits)
        self._waits.clear()
        return waits

    def _settle_waits(self, now: float) -> None:
        """Held requests that left the waiting queue: started ones have waited; aborted or
        finished ones drop out unmeasured."""
        waiting = {r.request_id for r in self.waiting}
        for request_id in [r for r in self._held_since if r not in waiting]:
            since = self._held_since.pop(request_id)
            request = self.requests.get(request_id)
            if request is not None and request.status == RequestStatus.RUNNING:
                self._waits.append(now - since)

    def _plan_and_schedule(self, throttle_prefills: bool) -> Any:
        if self._rotation is not None:
            return self._rotate_and_schedule(self._rotation, throttle_prefills)
        planner = self._planner
        if planner is None or not self.waiting:
            return super().schedule(throttle_prefills)
        waiting = list(self.waiting)
        items = [Waiting(r, *self._adapter_pages(r), r.arrival_time) for r in waiting]
        running = dict(self._adapter_pages(r) for r in self.running)
        now = time.time()
        plan = planner.plan(running, items, now)
        self.admission_stats.steps_planned += 1
        order = [w.key for w in plan.order]
        if not plan.held and order == waiting:
            return super().schedule(throttle_prefills)
        self.admission_stats.steps_reordered += 1
        self.admission_stats.requests_held_total += len(plan.held)
        for held in plan.held:
            request: Any = held.key  # vLLM's Request
            self._held_since.setdefault(request.request_id, now)
        self._requeue(order)
        try:
            return super().schedule(throttle_prefills)
        finally:
            # Whatever vLLM left waiting plus what was held, back in arrival order (FCFS).
            rest = [*self.waiting, *(w.key for w in plan.held)]
            self._requeue(sorted(rest, key=lambda r: r.arrival_time))

    def _rotate_and_schedule(self, planner: RotationPlanner, throttle_prefills: bool) -> Any:
        """One step of time-shared pages: requests the plan skips sit out this step.

        vLLM supports running requests that a step does not schedule (the token budget does
        the same): they keep their KV cache, and the model runner drops them from its
        persistent batch until they come back. Three things keep vLLM's invariants: the
        skipped requests are back in `running`, in their order, before `schedule()` returns;
        admissions are capped so running plus skipped stays within max_num_seqs; and each
        step's adapters are within max_loras (the plan's `max_adapters`).
        """
        now = time.time()
        running = list(self.running)
        last_run = self._last_run
        room = 0 if self._start_none_next else self.max_num_active_reqs - len(running)
        self._start_none_next = False
        plan = planner.plan(
            [Running(r, *self._adapter_pages(r), last_run.get(r.request_id, now)) for r in running],
            [Waiting(r, *self._adapter_pages(r), r.arrival_time) for r in self.waiting],
            now,
            room=room,
        )
        self.admission_stats.steps_planned += 1
        skipped = {id(s.key) for s in plan.skip}
        if plan.skip or plan.held:
            self.admission_stats.steps_reordered += 1
            self.admission_stats.requests_held_total += len(plan.held)
        for held in plan.held:
            self._held_since.setdefault(held.key.request_id, now)  # type: ignore[attr-defined]
        cap = self.max_num_active_reqs
        self.running = [r for r in running if id(r) not in skipped]
        self.max_num_active_reqs = max(0, cap - len(skipped))
        self._requeue([w.key for w in plan.order])
        try:
            output = super().schedule(throttle_prefills)
        finally:
            self.max_num_active_reqs = cap
            # vLLM may have replaced the list, finished or preempted some: read it again.
            after = {id(r) for r in self.running}
            before = {id(r) for r in running}
            self.running = [
                *(r for r in running if id(r) in skipped or id(r) in after),
                *(r for r in self.running if id(r) not in before),
            ]
            rest = [*self.waiting, *(w.key for w in plan.held)]
            self._requeue(sorted(rest, key=lambda r: r.arrival_time))
        for request_id in output.num_scheduled_tokens:
            last_run[request_id] = now
        self._start_none_next = bool(plan.skip) and not output.num_scheduled_tokens
        if len(last_run) > 2 * len(self.requests) + 64:  # forget finished requests
            self._last_run = {k: v for k, v in last_run.items() if k in self.requests}
        return output

    def _requeue(self, requests: list[Any]) -> None:
        queue = self.waiting
        if isinstance(queue, FCFSRequestQueue):
            queue.clear()
            queue.extend(requests)
            return
        queue.remove_requests(list(queue))  # a priority queue orders itself again
        for request in requests:
            queue.add_request(request)


def install(
    max_wait_s: float,
    *,
    policy: str = "rotate",
    max_skip_s: float = 0.2,
    max_oversubscription: float = 2.0,
) -> list[str]:
    """Rebind the scheduler and wrap the engine core's KV-cache set-up (idempotent)."""
    import vllm.v1.core.sched.scheduler as scheduler_module
    from vllm.v1.engine.core import EngineCore

    global _max_wait_s, _policy, _max_skip_s, _max_oversubscription
    _max_wait_s, _policy, _max_skip_s = max_wait_s, policy, max_skip_s
    _max_oversubscription = max_oversubscription
    rebound = [
        "vllm.v1.core.sched.scheduler.Scheduler",
        "EngineCore._initialize_kv_caches",
        "EngineCore.loraplex_residency_waits",
    ]
    if scheduler_module.Scheduler is ResidencyAwareScheduler:
        return rebound
    original = EngineCore._initialize_kv_caches

    def initialize_kv_caches(self: Any, vllm_config: Any) -> Any:
        result = original(self, vllm_config)
        if vllm_config.lora_config is not None:
            _set_pool(self.model_executor.collective_rpc("loraplex_paged_pool_groups"))
        return result

    scheduler_module.Scheduler = ResidencyAwareScheduler  # type: ignore[misc]
    EngineCore._initialize_kv_caches = initialize_kv_caches  # type: ignore[method-assign]
    EngineCore.loraplex_residency_waits = residency_waits  # type: ignore[attr-defined]
    return rebound


def residency_waits(engine_core: Any) -> list[float]:
    """EngineCore utility method: the scheduler's residency waits since the last call."""
    scheduler = getattr(engine_core, "scheduler", None)
    if isinstance(scheduler, ResidencyAwareScheduler):
        return scheduler.drain_residency_waits()
    return []


def _set_pool(reports: list[dict[str, Any] | None]) -> None:
    global _pool
    pools = [PoolGroups.from_dict(r) for r in reports if r]
    if not pools:
        return
    # One pool per worker (tensor parallel is refused today); the smallest one binds.
    _pool = min(pools, key=lambda p: sum(p.totals))
