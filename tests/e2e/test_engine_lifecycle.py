"""Client disconnects free engine work; a dead engine answers 503 instead of hanging."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import psutil
import pytest

from gateway.shutdown import ENGINE_DIED_EXIT_CODE
from tests.conftest import (
    BASE_NAME,
    bearer,
    launch_gateway,
    register_demo_adapters,
    start_gateway,
    stop_gateway,
    tenant_with_key,
)

pytestmark = pytest.mark.engine
ADAPTER = "demo-all-r16"
# Seconds of engine work even on an idle machine (n=4 x 2000 tokens of the tiny model), so
# "in flight" is observable long before the generation could finish on its own.
LONG = {
    "model": ADAPTER,
    "prompt": "Tell me a long story",
    "max_tokens": 2000,
    "n": 4,
    "temperature": 0,
    "ignore_eos": True,
}


def unfinished_requests(gateway) -> int:
    ready = httpx.get(f"{gateway.base_url}/readyz", timeout=10).json()
    return int(ready["engine"]["unfinished_requests"])


def wait_for_idle(gateway, timeout_s: float = 10) -> int:
    deadline = time.monotonic() + timeout_s
    while (count := unfinished_requests(gateway)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def generated_tokens(gateway) -> float:
    """vLLM's own count of tokens it generated (its metrics are served on /metrics)."""
    text = gateway.metrics_text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:generation_tokens_total{")
    )


FULL_RUN_TOKENS = LONG["n"] * LONG["max_tokens"]


def test_stream_disconnect_aborts_engine_request(gateway):
    assert wait_for_idle(gateway) == 0
    before = generated_tokens(gateway)
    with httpx.stream(
        "POST",
        f"{gateway.v1}/completions",
        json={**LONG, "stream": True},
        headers=bearer(gateway.api_key),
        timeout=60,
    ) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data:"))
        assert '"choices"' in first, first
    # Closed after the first chunk. Nothing is asked of the gateway in between: on 2 cores a
    # busy CPU engine can starve the API process, and the disconnect must be seen first.
    assert wait_for_idle(gateway, timeout_s=60) == 0
    spent = generated_tokens(gateway) - before
    assert 0 < spent < FULL_RUN_TOKENS / 2, spent  # a full run is exactly 8000


async def test_non_stream_disconnect_aborts_engine_request(gateway):
    assert wait_for_idle(gateway) == 0
    before = generated_tokens(gateway)
    async with httpx.AsyncClient(timeout=60) as client:
        task = asyncio.create_task(
            client.post(f"{gateway.v1}/completions", json=LONG, headers=bearer(gateway.api_key))
        )
        # Hang up once the engine has generated for it: a fixed wait raced the test's own
        # process, which a busy 2-core machine can leave unscheduled for as long as the whole
        # generation takes (CI saw the full 8000 tokens generated, the cancel landing after the
        # answer); and hanging up as soon as the engine held it could land before its first
        # step, leaving nothing spent to show that it ran.
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(generated_tokens, gateway) <= before:
            assert time.monotonic() < deadline, "the engine never generated for the request"
            assert not task.done(), task
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await asyncio.to_thread(wait_for_idle, gateway, 60) == 0
    spent = await asyncio.to_thread(generated_tokens, gateway) - before
    assert 0 < spent < FULL_RUN_TOKENS / 2, spent  # a full run is exactly 8000


def test_engine_death_answers_503_then_the_gateway_exits_for_a_restart(demo, tmp_path):
    """Own gateway: killing the engine core must not take the shared session gateway down.
    While it drains, every request (an adapter never loaded too: vLLM's own dead-engine error
    once made that a 500 counted against the adapter's version) is a 503; then the process
    exits non-zero, so that an orchestrator starts a fresh one (it served 503s forever)."""
    gateway = start_gateway(demo, tmp_path, LORAPLEX_SHUTDOWN_DRAIN_S="20")
    try:
        gateway.api_key = register_demo_adapters(gateway, demo)
        children = psutil.Process(gateway.process.pid).children(recursive=True)
        engine_cores = [p for p in children if "EngineCore" in " ".join([*p.cmdline(), p.name()])]
        assert engine_cores, [(p.name(), p.cmdline()) for p in children]
        for proc in engine_cores:
            proc.send_signal(signal.SIGKILL)

        deadline = time.monotonic() + 30
        ready = httpx.get(f"{gateway.base_url}/readyz", timeout=10)
        while ready.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
            ready = httpx.get(f"{gateway.base_url}/readyz", timeout=10)
        assert ready.status_code == 503

        client = openai.OpenAI(
            base_url=gateway.v1, api_key=gateway.api_key, max_retries=0, timeout=30
        )
        for model in (BASE_NAME, "demo-mlp-r4"):
            with pytest.raises(openai.InternalServerError) as info:
                client.completions.create(model=model, prompt="hi", max_tokens=4)
            assert info.value.status_code == 503, model
            assert info.value.body["code"] == "engine_unavailable", model

        assert gateway.process.wait(timeout=60) == ENGINE_DIED_EXIT_CODE
        assert "the inference engine died" in gateway.log_path.read_text(errors="replace")
    finally:
        stop_gateway(gateway)


def test_sigterm_drains_unready_first_and_lets_a_running_stream_finish(demo, tmp_path):
    gateway = start_gateway(demo, tmp_path, LORAPLEX_SHUTDOWN_DRAIN_S="3")
    try:
        gateway.api_key = tenant_with_key(gateway, "draining")
        body = {**LONG, "model": BASE_NAME, "n": 1, "max_tokens": 300, "stream": True}
        with httpx.stream(
            "POST",
            f"{gateway.v1}/completions",
            json=body,
            headers=bearer(gateway.api_key),
            timeout=120,
        ) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert '"choices"' in first, first
            gateway.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            # Still accepting connections, but unready: load balancers stop sending.
            ready = httpx.get(f"{gateway.base_url}/readyz", timeout=10)
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and all('"error"' not in line for line in rest)
        gateway.process.wait(timeout=60)
    finally:
        stop_gateway(gateway)


def test_sigterm_while_the_engine_starts_stops_it_without_serving(demo, tmp_path):
    gateway = launch_gateway(demo, tmp_path)
    try:
        parent = psutil.Process(gateway.process.pid)
        deadline = time.monotonic() + 120
        engine_processes: list[psutil.Process] = []
        # vLLM's engine core has been spawned and is loading: the start is well under way.
        while not engine_processes and time.monotonic() < deadline:
            assert gateway.process.poll() is None, gateway.log_tail()
            engine_processes = parent.children(recursive=True)
            time.sleep(0.2)
        assert engine_processes, gateway.log_tail()
        time.sleep(0.5)  # early: the engine core may not have loaded loraplex's plugin yet
        assert "loraplex ready" not in gateway.log_path.read_text(errors="replace")
        gateway.process.send_signal(signal.SIGTERM)
        # Stopped before serving: the start-up did not run to its end first.
        assert gateway.process.wait(timeout=30) == -signal.SIGTERM
        log = gateway.log_path.read_text(errors="replace")
        assert "a signal arrived while the engine was starting" in log, log[-3000:]
        assert "loraplex ready" not in log
        _, alive = psutil.wait_procs(engine_processes, timeout=30)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        stop_gateway(gateway)
