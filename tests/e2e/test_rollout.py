"""Automatic rollback through the real engine: a canary at 50 % made slow by fault injection is
rolled back within one window of its own requests, no client sees an error, and every caller is
back on the stable at once."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_TOKEN, DEMO_TENANT, cli

pytestmark = pytest.mark.engine
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WINDOW = 20  # the seed's 100 also works; 20 keeps the CPU test short


def admin(gateway, method: str, path: str, **kwargs) -> httpx.Response:
    url = f"{gateway.base_url}/admin/v1{path}"
    return httpx.request(method, url, headers=ADMIN, timeout=60, **kwargs)


def rollbacks(gateway, adapter: str) -> float:
    text = httpx.get(f"{gateway.base_url}/metrics", timeout=30).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "loraplex_rollbacks_total" and s.labels.get("adapter") == adapter
    )


async def test_slow_canary_is_rolled_back_within_one_window_without_client_errors(gateway, demo):
    name = f"canary-{uuid.uuid4().hex[:6]}"
    for files in ("demo-qkvo-r8", "demo-all-r16"):  # v1 (stable), v2 (canary)
        args = ["adapters", "register", str(demo.adapters[files]), "--name", name]
        registered = cli(gateway, *args, "--tenant", DEMO_TENANT)
        assert registered.returncode == 0, registered.stderr
    assert cli(gateway, "adapters", "evaluate", f"{name}@2").returncode == 0
    limits = {"window": WINDOW, "max_p95_e2e_ms": 1000}
    assert admin(gateway, "PUT", f"/rollouts/{name}/thresholds", json=limits).status_code == 200
    slow = cli(gateway, "faults", "set", f"{name}@2", "--latency-ms", "1500")
    assert slow.returncode == 0, slow.stderr
    started = cli(gateway, "rollout", "start", name, "--version", "2", "--percent", "50")
    assert started.returncode == 0, started.stderr

    client = openai.AsyncOpenAI(
        base_url=gateway.v1, api_key=gateway.api_key, max_retries=0, timeout=120
    )

    async def one(user: str) -> str:
        response = await client.completions.create(
            model=name, prompt="The gateway serves", max_tokens=8, temperature=0, user=user
        )
        return response.choices[0].text

    sent, status = 0, {}
    try:
        while sent < 4 * WINDOW:
            batch = [f"user-{sent + i}" for i in range(8)]
            await asyncio.gather(*(one(u) for u in batch))  # any error fails the test here
            sent += len(batch)
            status = admin(gateway, "GET", f"/rollouts/{name}").json()
            if status["rolled_back_version"] == 2:
                break
        assert status["rolled_back_version"] == 2, status
        # About half the callers are on the canary: one window of them is ~2 windows in all.
        assert sent <= 3 * WINDOW, sent
        rollback = next(e for e in status["events"] if e["action"] == "rollback")
        assert rollback["actor"] == "rollout-monitor"
        assert rollback["figures"]["samples"] == WINDOW
        assert rollback["figures"]["p95_e2e_ms"] > 1000
        assert rollbacks(gateway, name) == 1

        # Everyone is on the stable now: v1's answer, fast, for callers of either side.
        stable = await asyncio.gather(*(one(f"user-{i}") for i in range(16)))
        assert len(set(stable)) == 1
        direct = await client.completions.create(
            model=f"{name}@1", prompt="The gateway serves", max_tokens=8, temperature=0
        )
        assert stable[0] == direct.choices[0].text
    finally:
        await client.close()
        cli(gateway, "faults", "clear")
