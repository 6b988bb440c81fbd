"""Adapter slots under one tenant's steady traffic, through a real gateway and engine.

vLLM 0.32 starts a request for a new adapter only while the step's adapters stay within
max_loras, and requests for running adapters always fit: a tenant keeping overlapping requests
on max_loras adapters kept every other tenant's adapter waiting for as long as it kept going
(kernels.slot_admission). Its own gateway: max_loras 2 and a 1 s bounded wait.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import bearer, cli, issue_key, start_gateway, stop_gateway

HOG_TOKENS = 400  # a few seconds a request on 2 cores with six running
HOG_OFFSETS_S = (0.0, 0.7, 1.4)  # three overlapping loops per adapter: it never leaves the step


def test_one_tenant_on_every_slot_cannot_keep_another_tenants_adapter_waiting(demo, tmp_path):
    gateway = start_gateway(
        demo, tmp_path, LORAPLEX_MAX_LORAS="2", LORAPLEX_PAGED_MAX_WAIT_MS="1000"
    )
    try:
        for tenant in ("hog", "victim"):
            assert cli(gateway, "tenants", "create", tenant).returncode == 0
        for name, source, tenant in (
            ("hog-a", "demo-qkvo-r8", "hog"),
            ("hog-b", "demo-mlp-r4", "hog"),
            ("victim-x", "demo-all-r16", "victim"),
        ):
            registered = cli(
                gateway, "adapters", "register", str(demo.adapters[source]),
                "--name", name, "--tenant", tenant,
            )  # fmt: skip
            assert registered.returncode == 0, registered.stderr
        hog_key, victim_key = issue_key(gateway, "hog"), issue_key(gateway, "victim")
        waited, hog_done = asyncio.run(_victim_during_hog(gateway.v1, hog_key, victim_key))
        # Without the bounded wait the victim was still waiting when the hog stopped (45 s
        # and 16 hog requests in the review's run); with it, a slot drains within about one
        # hog request after the wait.
        print(f"victim waited {waited} s; {hog_done} hog requests ran")
        assert waited is not None, f"the victim waited until the hog stopped ({hog_done} ran)"
        assert waited < 25, waited
    finally:
        stop_gateway(gateway)


async def _victim_during_hog(v1: str, hog_key: str, victim_key: str) -> tuple[float | None, int]:
    stop = asyncio.Event()
    done = 0
    async with httpx.AsyncClient(base_url=v1, timeout=120) as client:

        async def call(key: str, model: str, max_tokens: int) -> None:
            response = await client.post(
                "/completions",
                headers=bearer(key),
                json={"model": model, "prompt": "hello", "max_tokens": max_tokens,
                      "ignore_eos": True, "temperature": 0},
            )  # fmt: skip
            assert response.status_code == 200, response.text

        async def hog(model: str, delay: float) -> None:
            nonlocal done
            await asyncio.sleep(delay)
            while not stop.is_set():
                await call(hog_key, model, HOG_TOKENS)
                done += 1

        loops = [asyncio.create_task(hog(m, d)) for m in ("hog-a", "hog-b") for d in HOG_OFFSETS_S]
        try:
            await asyncio.sleep(4)  # both adapters running, requests overlapping
            started = time.monotonic()
            victim = asyncio.create_task(call(victim_key, "victim-x", 4))
            try:
                await asyncio.wait_for(asyncio.shield(victim), 40)
                waited: float | None = time.monotonic() - started
            except TimeoutError:
                waited = None
            stop.set()
            await victim
        finally:
            stop.set()
            await asyncio.gather(*loops)
    return waited, done
