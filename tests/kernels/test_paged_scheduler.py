"""The rotate step of ResidencyAwareScheduler around vLLM's own `schedule()`, which is replaced
here by a stand-in that records what it was given and schedules what a test says (the engine
tests run the real one; these cover what an engine run cannot force, such as a step vLLM
cannot fill for lack of KV blocks)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler
from vllm.v1.request import RequestStatus

from kernels.paged_rotation import RotationPlanner
from kernels.paged_scheduler import AdmissionStats, ResidencyAwareScheduler

ADAPTER_PAGES = 4  # every adapter here takes 4 pages of the pool's one group


@dataclass(eq=False)
class FakeRequest:
    request_id: str
    adapter: int
    arrival_time: float = field(default_factory=time.time)
    status: RequestStatus = RequestStatus.WAITING

    @property
    def lora_request(self) -> Any:
        return SimpleNamespace(lora_int_id=self.adapter, lora_path="unused")


@dataclass
class Step:
    running: list[str]
    waiting: list[str]
    max_num_active_reqs: int


class StandIn:
    """vLLM's schedule(): records its inputs; schedules every running request, and starts the
    waiting ones unless `kv_full` (vLLM found no KV blocks for them, so the step runs nothing
    when rotate has made every running request sit out)."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.kv_full = False

    def __call__(self, scheduler: Any, throttle_prefills: bool = False) -> Any:
        self.steps.append(
            Step(
                [r.request_id for r in scheduler.running],
                [r.request_id for r in scheduler.waiting],
                scheduler.max_num_active_reqs,
            )
        )
        scheduled = {r.request_id: 1 for r in scheduler.running}
        if not self.kv_full:
            while scheduler.waiting:
                request = scheduler.waiting.popleft()
                request.status = RequestStatus.RUNNING
                scheduler.running.append(request)
                scheduled[request.request_id] = 1
        return SimpleNamespace(num_scheduled_tokens=scheduled)


@pytest.fixture
def vllm_schedule(monkeypatch: pytest.MonkeyPatch) -> StandIn:
    stand_in = StandIn()

    def schedule(self: Any, throttle_prefills: bool = False) -> Any:
        return stand_in(self, throttle_prefills)

    monkeypatch.setattr(VllmScheduler, "schedule", schedule)
    return stand_in


def rotating_scheduler(running: list[FakeRequest], *, pages: int, max_num_seqs: int) -> Any:
    """The subclass's own state over bare attributes: vLLM's constructor needs a whole model
    and KV cache config, and nothing of it is read by the rotate step besides these."""
    scheduler: Any = object.__new__(ResidencyAwareScheduler)
    scheduler.admission_stats = AdmissionStats()
    scheduler._pages = {a: (ADAPTER_PAGES,) for a in range(1, 10)}
    scheduler._no_pages = (0,)
    scheduler._held_since = {}
    scheduler._last_run = {}
    scheduler._start_none_next = False
    scheduler._waits = deque()
    scheduler._rotation = RotationPlanner(
        total_pages=(pages,),
        max_adapters=4,
        max_wait_s=10.0,
        max_skip_s=60.0,  # nobody is due for a turn within the test
        max_oversubscription=2.0,
    )
    for request in running:
        request.status = RequestStatus.RUNNING
    scheduler.running = list(running)
    scheduler.waiting = FCFSRequestQueue()
    scheduler.requests = {r.request_id: r for r in running}
    scheduler.max_num_active_reqs = max_num_seqs
    return scheduler


def add(scheduler: Any, request: FakeRequest) -> None:
    scheduler.waiting.append(request)
    scheduler.requests[request.request_id] = request


def test_after_a_step_that_skipped_requests_and_ran_nothing_the_next_one_starts_none(
    vllm_schedule: StandIn,
):
    """The KV-cache-full fallback: the pool holds one adapter, rotate made r1 sit out so that
    `new` could start, vLLM could not start it, and the step ran nothing. Offering `new` again
    would repeat that every step and r1 would never run; the next step keeps the running set
    whole, and the one after offers `new` again."""
    scheduler = rotating_scheduler([FakeRequest("r1", 1)], pages=4, max_num_seqs=8)
    scheduler.schedule()  # r1 runs; its last run is now
    add(scheduler, FakeRequest("new", 2))
    vllm_schedule.kv_full = True

    blocked = scheduler.schedule()
    assert vllm_schedule.steps[-1].running == []  # r1 sat out for `new` ...
    assert vllm_schedule.steps[-1].waiting == ["new"]
    assert not dict(blocked.num_scheduled_tokens)  # ... which vLLM could not start

    scheduler.schedule()
    assert vllm_schedule.steps[-1].running == ["r1"]  # nobody sits out ...
    assert vllm_schedule.steps[-1].waiting == []  # ... for a request vLLM cannot start
    assert [r.request_id for r in scheduler.waiting] == ["new"]  # still queued

    vllm_schedule.kv_full = False
    scheduler.schedule()
    assert vllm_schedule.steps[-1].waiting == ["new"]  # offered again: it may fit now
    assert [r.request_id for r in scheduler.running] == ["r1", "new"]
    assert len(scheduler.drain_residency_waits()) == 1  # held one step, measured when started


def test_requests_that_sit_out_are_back_in_running_in_order_and_the_cap_restored(
    vllm_schedule: StandIn,
):
    running = [FakeRequest("r1", 1), FakeRequest("r2", 2)]
    scheduler = rotating_scheduler(running, pages=8, max_num_seqs=8)
    scheduler.schedule()
    add(scheduler, FakeRequest("new", 3))

    scheduler.schedule()
    step = vllm_schedule.steps[-1]
    assert len(step.running) == 1 and step.waiting == ["new"]
    # vLLM saw a cap lowered by the request that sat out, so running + skipped <= max_num_seqs
    assert step.max_num_active_reqs == 7
    assert scheduler.max_num_active_reqs == 8
    assert [r.request_id for r in scheduler.running] == ["r1", "r2", "new"]
    assert scheduler.admission_stats.steps_reordered == 1


def test_at_max_num_seqs_no_waiting_request_is_offered(vllm_schedule: StandIn):
    running = [FakeRequest("r1", 1), FakeRequest("r2", 2)]
    scheduler = rotating_scheduler(running, pages=8, max_num_seqs=2)
    add(scheduler, FakeRequest("new", 3))

    scheduler.schedule()
    assert vllm_schedule.steps[-1].running == ["r1", "r2"]
    assert vllm_schedule.steps[-1].waiting == []
    assert [r.request_id for r in scheduler.waiting] == ["new"]
