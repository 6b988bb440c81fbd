"""Bounded waiting for an adapter slot in slot mode: the pure rule (kernels.slot_admission)
and the scheduler that applies it around vLLM's own `schedule()`, replaced here by a stand-in
that mimics vLLM's max_loras rule (the engine test in tests/e2e/test_adapter_slots.py runs the
real one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler
from vllm.v1.request import RequestStatus

from kernels import slot_scheduler
from kernels.slot_admission import SlotWaiting, held_back
from kernels.slot_scheduler import FairSlotAsyncScheduler, FairSlotScheduler

NOW = 1000.0


def w(name: str, adapter: int, waited: float) -> SlotWaiting:
    return SlotWaiting(name, adapter, NOW - waited)


def test_below_the_bounded_wait_nothing_is_held():
    waiting = [w("hog", 1, 20.0), w("new", 3, 5.0)]
    assert held_back({1, 2}, waiting, NOW, max_wait_s=10.0) == []


def test_a_starved_adapter_holds_back_requests_for_every_other_adapter():
    waiting = [w("hog-a", 1, 0.5), w("victim", 3, 11.0), w("victim-2", 3, 0.1), w("base", 0, 30)]
    waiting += [w("other", 4, 2.0)]
    held = held_back({1, 2}, waiting, NOW, max_wait_s=10.0)
    # the running adapter's new request and a third adapter wait; the starved adapter's own
    # requests and the base model's pass
    assert [x.key for x in held] == ["hog-a", "other"]


def test_an_old_request_for_a_running_adapter_is_not_starved():
    """Its adapter has a slot: it waits for something else (KV blocks, max_num_seqs)."""
    assert held_back({1}, [w("old", 1, 60.0), w("new", 2, 0.1)], NOW, max_wait_s=10.0) == []


@dataclass(eq=False)
class FakeRequest:
    request_id: str
    adapter: int
    arrival_time: float = field(default=0.0)
    status: RequestStatus = RequestStatus.WAITING

    @property
    def lora_request(self) -> Any:
        return None if not self.adapter else SimpleNamespace(lora_int_id=self.adapter)


class SlotStandIn:
    """vLLM's schedule() as far as LoRA goes: start waiting requests in order while the step's
    distinct adapters stay within max_loras (requests for running adapters always fit)."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.offered: list[list[str]] = []

    def __call__(self, scheduler: Any, throttle_prefills: bool = False) -> Any:
        self.offered.append([r.request_id for r in scheduler.waiting])
        loras = {r.adapter for r in scheduler.running if r.adapter}
        skipped = []
        while scheduler.waiting:
            request = scheduler.waiting.popleft()
            if request.adapter and request.adapter not in loras:
                if len(loras) >= self.max_loras:
                    skipped.append(request)
                    continue
                loras.add(request.adapter)
            scheduler.running.append(request)
        scheduler.waiting.extend(skipped)
        return SimpleNamespace()


@pytest.fixture
def vllm_schedule(monkeypatch: pytest.MonkeyPatch) -> SlotStandIn:
    stand_in = SlotStandIn(max_loras=2)
    monkeypatch.setattr(VllmScheduler, "schedule", lambda self, tp=False: stand_in(self, tp))
    monkeypatch.setattr(slot_scheduler, "_max_wait_s", 10.0)
    return stand_in


def scheduler_with(running: list[FakeRequest], waiting: list[FakeRequest]) -> Any:
    """The mixin's state over bare attributes (vLLM's constructor needs a whole model)."""
    scheduler: Any = object.__new__(FairSlotScheduler)
    scheduler.lora_config = SimpleNamespace(max_loras=2)
    scheduler.running = list(running)
    scheduler.waiting = FCFSRequestQueue()
    scheduler.waiting.extend(waiting)
    return scheduler


def test_a_tenant_holding_every_slot_lets_it_go_once_another_adapter_waited_too_long(
    vllm_schedule: SlotStandIn, monkeypatch: pytest.MonkeyPatch
):
    running = [FakeRequest("hog-a1", 1), FakeRequest("hog-b1", 2)]
    victim = FakeRequest("victim", 3, arrival_time=NOW - 5.0)
    hog = FakeRequest("hog-a2", 1, arrival_time=NOW - 1.0)
    scheduler = scheduler_with(running, [victim, hog])
    monkeypatch.setattr(slot_scheduler.time, "time", lambda: NOW)
    scheduler.schedule()  # within the wait: vLLM's rule alone, the hog's request joins
    assert [r.request_id for r in scheduler.running][-1] == "hog-a2"
    assert [r.request_id for r in scheduler.waiting] == ["victim"]

    scheduler.waiting.append(FakeRequest("hog-b2", 2, arrival_time=NOW + 10.0))
    monkeypatch.setattr(slot_scheduler.time, "time", lambda: NOW + 11.0)  # victim waited 16 s
    scheduler.schedule()
    assert vllm_schedule.offered[-1] == ["victim"]  # the hog's new request was held back
    assert [r.request_id for r in scheduler.waiting] == ["victim", "hog-b2"]  # FCFS again
    assert scheduler.requests_held_total == 1

    scheduler.running = [r for r in scheduler.running if r.adapter != 2]  # hog-b1 finished
    scheduler.schedule()
    assert "victim" in [r.request_id for r in scheduler.running]


def test_both_of_vllms_schedulers_are_rebound(monkeypatch: pytest.MonkeyPatch):
    import vllm.v1.core.sched.async_scheduler as async_module
    import vllm.v1.core.sched.scheduler as scheduler_module
    from vllm.config import SchedulerConfig

    monkeypatch.setattr(scheduler_module, "Scheduler", scheduler_module.Scheduler)
    monkeypatch.setattr(async_module, "AsyncScheduler", async_module.AsyncScheduler)
    monkeypatch.setattr(slot_scheduler, "_max_wait_s", slot_scheduler._max_wait_s)
    slot_scheduler.install(3.0)
    assert slot_scheduler._max_wait_s == 3.0
    config: Any = object.__new__(SchedulerConfig)
    config.scheduler_cls = None
    config.async_scheduling = False
    assert config.get_scheduler_cls() is FairSlotScheduler
    config.async_scheduling = True
    assert config.get_scheduler_cls() is FairSlotAsyncScheduler


@pytest.mark.parametrize(
    "case",
    ["a slot is free", "the aged request waits for its grammar, not a slot"],
)
def test_nothing_is_held_when_a_slot_would_not_help(
    vllm_schedule: SlotStandIn, monkeypatch: pytest.MonkeyPatch, case: str
):
    running = [FakeRequest("hog-a1", 1)] + ([] if "free" in case else [FakeRequest("b1", 2)])
    aged = FakeRequest("aged", 3, arrival_time=NOW - 60.0)
    if "grammar" in case:
        aged.status = RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
    scheduler = scheduler_with(running, [aged, FakeRequest("hog-a2", 1, arrival_time=NOW)])
    monkeypatch.setattr(slot_scheduler.time, "time", lambda: NOW)
    scheduler.schedule()
    assert vllm_schedule.offered[-1] == ["aged", "hog-a2"]  # vLLM's order, nothing held
    assert scheduler.requests_held_total == 0
