"""kernels.engine_core_loads on vLLM's own EngineCore class, its executor and scheduler played
by recorders (the engine core's busy loop runs these calls one at a time, as here). The real
engine refusing a request whose adapter cannot be loaded, and serving on, is
tests/e2e/test_adapter_load_failure.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from kernels import engine_core_loads


class Executor:
    def __init__(self) -> None:
        self.loads: list[int] = []
        self.removed: list[int] = []
        self.broken: set[int] = set()
        self.refuses: set[int] = set()  # answers False instead of raising

    def add_lora(self, lora: Any) -> bool:
        self.loads.append(lora.lora_int_id)
        if lora.lora_int_id in self.broken:
            raise FileNotFoundError(f"adapter {lora.lora_int_id}: no such file")
        return lora.lora_int_id not in self.refuses

    def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True


@pytest.fixture
def core() -> Any:
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.core import EngineCore

    engine_core_loads.install()
    engine_core_loads.install()  # the plugin runs once per process; twice changes nothing
    core = object.__new__(EngineCore)
    core.model_executor = Executor()
    core.scheduler = SimpleNamespace(added=[], add_request=lambda r: core.scheduler.added.append(r))
    core.errors = []
    core._send_error_outputs_to_client = lambda ids, client: core.errors.extend(ids)
    core.lora = lambda i: LoRARequest(f"a{i}", i, f"/adapters/{i}")
    return core


def request(core: Any, request_id: str, lora_id: int | None) -> Any:
    return SimpleNamespace(
        request_id=request_id,
        client_index=0,
        lora_request=None if lora_id is None else core.lora(lora_id),
        pooling_params=None,
        kv_transfer_params=None,
        ec_transfer_params=None,
        abort_immediately=False,
    )


def added(core: Any) -> list[str]:
    return [r.request_id for r in core.scheduler.added]


def test_a_request_whose_adapter_is_not_loaded_loads_it_first_once(core):
    core.add_request(request(core, "r1", 7))
    core.add_request(request(core, "r2", 7))
    core.add_request(request(core, "base", None))
    assert core.model_executor.loads == [7]  # loaded on arrival, then known
    assert added(core) == ["r1", "r2", "base"] and core.errors == []


def test_a_load_that_fails_on_arrival_refuses_that_request_not_the_engine(core):
    core.model_executor.broken.add(7)
    core.add_request(request(core, "bad", 7))
    core.add_request(request(core, "good", 8))
    assert core.errors == ["bad"]  # finish reason "error", to its client only
    assert added(core) == ["good"]  # the scheduler never sees it: no step can fail on it


def test_after_a_failed_add_lora_requests_are_refused_without_another_attempt(core):
    """The gateway sends add_lora and, not waiting, the request: had the request's own
    attempt succeeded after the gateway's failed, the engine would hold an adapter the
    gateway's cache does not count."""
    core.model_executor.broken.add(7)
    with pytest.raises(FileNotFoundError):
        core.add_lora(core.lora(7))
    core.model_executor.broken.clear()  # it would load now
    core.add_request(request(core, "sent-with-it", 7))
    assert core.errors == ["sent-with-it"] and core.model_executor.loads == [7]
    assert core.add_lora(core.lora(7)) is True  # the next load decides again
    core.add_request(request(core, "later", 7))
    assert added(core) == ["later"] and core.model_executor.loads == [7, 7]


def test_an_add_lora_answering_false_refuses_too(core):
    core.model_executor.refuses.add(9)
    assert core.add_lora(core.lora(9)) is False
    core.add_request(request(core, "r", 9))
    assert core.errors == ["r"] and added(core) == []


def test_a_removed_adapter_is_loaded_again_by_its_next_request(core):
    core.add_request(request(core, "r1", 7))
    assert core.remove_lora(7) is True
    core.add_request(request(core, "r2", 7))
    assert core.model_executor.loads == [7, 7] and core.model_executor.removed == [7]
    assert added(core) == ["r1", "r2"]


def test_a_utility_call_still_gets_a_lora_request_not_the_list_it_arrives_as(core):
    """The engine core converts a utility's msgspec arguments by the method's signature: a
    wrapper without vLLM's annotations got the LoRARequest as a list and failed every load."""
    from vllm.v1.engine.core import EngineCoreProc

    wire = list(msgspec.to_builtins(core.lora(7)))
    (converted,) = EngineCoreProc._convert_msgspec_args(core.add_lora, (wire,))
    assert core.add_lora(converted) is True and core.model_executor.loads == [7]


def test_the_gateway_can_ask_whether_it_is_installed(core):
    assert getattr(core, engine_core_loads.STATUS_UTILITY)() is True
