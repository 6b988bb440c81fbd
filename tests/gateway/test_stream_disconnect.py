"""Streaming clients that hang up: the engine request is aborted and the tenant's slot, the
job's lease and its metrics are released at once, not whenever the garbage collector runs.

Driven through the app as uvicorn drives it (ASGI 2.3), with a client that can hang up at a
chosen moment (TestClient cannot); the engine is scripted to be slow."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from tests.gateway.fake_engine import ADMIN_TOKEN, BASE, ScriptedEngine, asgi_post, client_for

WORDS = [f"w{i} " for i in range(200)]
ROUTES = {
    "/v1/completions": {"prompt": "x"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}]},
}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from gateway.demo import build_base

    root = tmp_path_factory.mktemp("disconnect")
    build_base(root / "base")
    return root


def running(client) -> int:
    return client.app.state.generation._limiter.running(client.tenant)


@pytest.mark.parametrize("path", list(ROUTES))
def test_hang_up_before_the_first_token_aborts_and_frees_the_slot(demo_root, path):
    # The engine is busy (queued, long prefill): the first token comes after 3 s. The client
    # gives up after 0.2 s; 0.8 s later its engine request and its slot must be gone.
    engine = ScriptedEngine(WORDS, delay=0.01, first_delay=3.0)
    with client_for(demo_root, engine) as client:
        body = {"model": BASE, **ROUTES[path], "max_tokens": 5, "stream": True}

        async def scenario():
            call = asyncio.ensure_future(
                asgi_post(client.app, path, body, dict(client.headers), hang_up_after_s=0.2)
            )
            await asyncio.sleep(1.0)
            state = list(engine.aborted), running(client)
            return state, await call

        (aborted, still_running), result = client.portal.call(scenario)
    assert aborted == [engine.calls[0][0]], "engine request still running after the hang-up"
    assert still_running == 0, "tenant's concurrency slot still held after the client left"
    assert result.status == 499 and engine.tokens_produced == 0


def test_a_retry_after_giving_up_on_a_queued_stream_is_not_refused(demo_root):
    """max_concurrent 1: the abandoned request must not hold the slot the retry needs."""
    engine = ScriptedEngine(WORDS, delay=0.01, first_delay=3.0)
    with client_for(demo_root, engine) as client:
        limits = client.patch(
            f"/admin/v1/tenants/{client.tenant}/limits",
            json={"max_concurrent": 1},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert limits.is_success, limits.text
        body = {"model": BASE, "prompt": "x", "max_tokens": 2, "stream": True}
        headers = dict(client.headers)

        async def scenario():
            first = asyncio.ensure_future(
                asgi_post(client.app, "/v1/completions", body, headers, hang_up_after_s=0.2)
            )
            await asyncio.sleep(0.5)
            engine.first_delay = 0.0
            retry = await asgi_post(client.app, "/v1/completions", body, headers)
            await first
            return retry

        retry = client.portal.call(scenario)
    assert retry.status == 200, retry.body[:200]
    assert retry.body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize(
    ("chunks", "when"),
    [(3, "while the server is blocked sending a chunk"), (0, "before the first chunk")],
)
def test_hang_up_during_a_blocked_send_closes_the_stream_at_once(demo_root, chunks, when):
    """A slow reader's socket buffer is full, so send() blocks; the client then goes away.
    The cancelled response must itself close its generators (abort, lease, metrics): the
    garbage collector is disabled here, so nothing else would."""
    engine = ScriptedEngine(WORDS, delay=0.01)
    with client_for(demo_root, engine) as client:
        body = {"model": BASE, "prompt": "x", "max_tokens": 200, "stream": True}
        headers = dict(client.headers)

        async def scenario():
            gc.disable()
            try:
                started = time.monotonic()
                await asgi_post(
                    client.app,
                    "/v1/completions",
                    body,
                    headers,
                    hang_up_after_chunks=chunks,
                    stall_send_s=5.0,
                )
                returned = time.monotonic() - started
                return returned, list(engine.aborted), running(client)
            finally:
                gc.enable()

        returned, aborted, still_running = client.portal.call(scenario)
    assert returned < 2.0, f"the app held the request {returned:.1f} s ({when})"
    assert aborted == [engine.calls[0][0]], f"engine request not aborted ({when})"
    assert still_running == 0, f"tenant's slot still held ({when})"
    assert engine.tokens_produced < 50


def test_hang_up_mid_stream_aborts_every_fanned_out_request(demo_root):
    engine = ScriptedEngine(WORDS, delay=0.02)
    with client_for(demo_root, engine) as client:
        body = {
            "model": BASE,
            "prompt": ["x", "y"],
            "n": 2,
            "temperature": 0,
            "max_tokens": 200,
            "stream": True,
        }
        headers = dict(client.headers)

        async def scenario():
            return await asgi_post(
                client.app, "/v1/completions", body, headers, hang_up_after_chunks=3
            )

        assert client.portal.call(scenario).status == 200
        assert sorted(engine.aborted) == sorted(call[0] for call in engine.calls)
        assert len(engine.aborted) == 4 and running(client) == 0


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_client_that_hangs_up_while_waiting_for_an_adapter_slot_takes_none(tmp_path, path):
    """Its wait (every slot in use) was not watched: when a slot freed it evicted another
    adapter, loaded its own and started an engine request for nobody."""
    from tests.gateway.rollout_helpers import build_demo_root, register

    class Counting(ScriptedEngine):
        def __init__(self) -> None:
            super().__init__(["w"] * 40, delay=0.02)  # about 0.8 s a request
            self.added: list[int] = []

        async def add_adapter(self, adapter) -> None:  # type: ignore[no-untyped-def]
            self.added.append(adapter.engine_id)

        async def remove_adapter(self, engine_id: int) -> None:
            pass

    root = build_demo_root(tmp_path)
    engine = Counting()
    with client_for(root, engine, max_cpu_loras=1, max_loras=1) as client:
        register(client, root, "a1", "v1")
        register(client, root, "a2", "v2")
        headers = {"Authorization": client.headers["Authorization"]}
        body = {"max_tokens": 40, "stream": True}
        body |= {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {}
        body |= {} if "chat" in path else {"prompt": "x"}

        async def scenario() -> int:
            holder = asyncio.ensure_future(
                asgi_post(client.app, path, {**body, "model": "a1"}, headers)
            )
            await asyncio.sleep(0.2)  # a1 holds the only slot
            gone = await asgi_post(
                client.app, path, {**body, "model": "a2"}, headers, hang_up_after_s=0.1
            )
            await holder
            await asyncio.sleep(0.1)
            return gone.status

        assert client.portal.call(scenario) == 499
        assert len(engine.added) == 1  # a2 was never loaded
        assert [call[1].engine_id for call in engine.calls] == engine.added  # nor run
