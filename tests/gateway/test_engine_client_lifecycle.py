"""The embedded-vLLM client when the engine dies, hangs or starts wrong, against stand-ins for
AsyncLLM that behave as vLLM 0.32's does (the real engine's death is tests/e2e's)."""

from __future__ import annotations

import asyncio
import time

import pytest
from vllm.v1.engine.exceptions import EngineDeadError

import gateway.engine.vllm_embedded as embedded
from gateway.engine.client import AdapterHandle, EngineDead, EngineError
from gateway.engine.vllm_embedded import EmbeddedVLLM
from gateway.settings import Settings

ADAPTER = AdapterHandle(engine_id=7, path="/x/7", size_bytes=100)


class StandInLLM:
    """`add_lora` waits for `answer`; vLLM never answers a call pending when its core died."""

    def __init__(self, statuses: object = ()):
        self.errored = False
        self.answer = asyncio.Event()
        self.raises: Exception | None = None
        self.statuses = statuses
        self.shut_down = False

    async def add_lora(self, lora) -> bool:
        if self.raises is not None:
            raise self.raises
        await self.answer.wait()
        return True

    async def remove_lora(self, lora_id) -> bool:
        return await self.add_lora(None)

    async def collective_rpc(self, method: str):
        assert method == "loraplex_plugin_status"
        if isinstance(self.statuses, Exception):
            raise self.statuses
        return self.statuses

    def shutdown(self) -> None:
        self.shut_down = True


def client_over(engine: StandInLLM) -> EmbeddedVLLM:
    client = EmbeddedVLLM(Settings(), "unused", "base")
    client._engine = engine  # type: ignore[assignment]
    return client


async def test_an_adapter_load_pending_when_the_engine_dies_fails_at_once(monkeypatch):
    monkeypatch.setattr(embedded, "DEATH_POLL_S", 0.01)
    engine = StandInLLM()
    client = client_over(engine)
    loading = asyncio.create_task(client.add_adapter(ADAPTER))
    await asyncio.sleep(0.05)
    assert not loading.done()
    engine.errored = True  # the core died; the call is never answered
    with pytest.raises(EngineDead):
        await asyncio.wait_for(loading, 1)
    health = await client.health()
    assert health.dead and not health.alive


async def test_vllms_own_engine_dead_error_is_the_gateways_engine_dead():
    engine = StandInLLM()
    engine.raises = EngineDeadError()
    with pytest.raises(EngineDead):  # a 503, not a broken adapter version's 500
        await client_over(engine).add_adapter(ADAPTER)
    engine.errored = True
    engine.raises = None
    with pytest.raises(EngineDead):
        await client_over(engine).remove_adapter(7)


async def test_an_adapter_call_that_never_answers_a_live_engine_times_out(monkeypatch):
    monkeypatch.setattr(embedded, "ADAPTER_CALL_TIMEOUT_S", 0.05)
    monkeypatch.setattr(embedded, "DEATH_POLL_S", 0.01)
    engine = StandInLLM()
    with pytest.raises(EngineError, match="took longer"):
        await client_over(engine).add_adapter(ADAPTER)
    engine.answer.set()
    await client_over(engine).add_adapter(ADAPTER)


@pytest.mark.parametrize(
    "statuses",
    [
        [{"cpu_ops_masked": True}, {"cpu_ops_masked": False}],
        [],
        AttributeError("WorkerWrapperBase has no attribute loraplex_plugin_status"),
    ],
    ids=["one-worker-unpatched", "no-workers", "plugin-not-loaded"],
)
async def test_the_engine_is_refused_on_cpu_without_the_plugins_ops(monkeypatch, statuses):
    monkeypatch.setattr(embedded, "_cuda_available", lambda: False)
    engine = StandInLLM(statuses)
    client = client_over(engine)
    with pytest.raises(RuntimeError, match=r"plugin|ops"):
        await client._check_plugin()
    assert engine.shut_down and client._engine is None


async def test_the_engine_with_the_plugin_in_every_worker_is_kept(monkeypatch):
    monkeypatch.setattr(embedded, "_cuda_available", lambda: False)
    engine = StandInLLM([{"cpu_ops_masked": True}] * 2)
    client = client_over(engine)
    await client._check_plugin()
    assert not engine.shut_down and client._engine is engine


async def test_an_engine_that_starts_after_the_timeout_is_shut_down(monkeypatch):
    built: list[StandInLLM] = []

    def slow_build(args):
        time.sleep(0.3)
        built.append(StandInLLM())
        return built[-1]

    from vllm.v1.engine.async_llm import AsyncLLM

    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(slow_build))
    monkeypatch.setattr(embedded, "paged_environment_for", lambda *args: {})
    client = EmbeddedVLLM(Settings(engine_start_timeout_s=0.05), "unused", "base")
    monkeypatch.setattr(client, "_engine_args", lambda: None)
    with pytest.raises(TimeoutError):
        await client.start()
    await asyncio.sleep(0.5)
    assert built and built[0].shut_down and client._engine is None


class RecordingLLM(StandInLLM):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    async def add_lora(self, lora) -> bool:
        self.calls.append(("add", lora.lora_int_id))
        return await super().add_lora(lora)

    async def remove_lora(self, lora_id) -> bool:
        self.calls.append(("remove", lora_id))
        return True


async def test_a_load_the_gateway_stopped_waiting_for_is_undone_in_the_engine(monkeypatch):
    """The engine finishes a load whose caller hung up: the gateway's cache never counted it,
    and vLLM's own LRU would later evict behind the gateway's back."""
    engine = RecordingLLM()
    client = client_over(engine)
    loading = asyncio.create_task(client.add_adapter(ADAPTER))
    await asyncio.sleep(0.05)
    loading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loading
    await asyncio.sleep(0.01)
    assert engine.calls == [("add", 7), ("remove", 7)]

    monkeypatch.setattr(embedded, "ADAPTER_CALL_TIMEOUT_S", 0.05)
    engine.calls.clear()
    with pytest.raises(EngineError):
        await client.add_adapter(ADAPTER)
    await asyncio.sleep(0.01)
    assert engine.calls == [("add", 7), ("remove", 7)]
