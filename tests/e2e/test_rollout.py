"""Automatic rollback through the real engine: a canary at 50 % made slow by fault injection is
rolled back within one window of its own requests, no client sees an error, and every caller is
back on the stable at once."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.rollout_router import sticky_key
from registry.rollout import assign
from tests.conftest import ADMIN_TOKEN, DEMO_TENANT, cli

pytestmark = pytest.mark.engine
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WINDOW = 20  # the seed's 100 also works; 20 keeps the CPU test short


def admin(gateway, method: str, path: str, **kwargs) -> httpx.Response:
    url = f"{gateway.base_url}/admin/v1{path}"
    return httpx.request(method, url, headers=ADMIN, timeout=60, **kwargs)


def rollbacks(gateway, adapter: str) -> float:
    text = gateway.metrics_text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "loraplex_rollbacks_total" and s.labels.get("adapter") == adapter
    )


def canary_name(users_for_a_window: int) -> str:
    """A fresh adapter name whose 50 % canary takes a window's worth of callers among the
    first `users_for_a_window` users ("user-0", ...): the assignment hashes the name, and an
    unlucky one (CI drew 20 canary callers only among the first 60) would test the dice, not
    the monitor."""
    while True:
        name = f"canary-{uuid.uuid4().hex[:6]}"
        keys = [sticky_key(f"user-{i}", None, "") for i in range(users_for_a_window)]
        if sum(assign(key, name, 50) for key in keys) >= WINDOW:
            return name


async def test_slow_canary_is_rolled_back_within_one_window_without_client_errors(gateway, demo):
    name = canary_name(users_for_a_window=2 * WINDOW + 8)
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
        # The name puts a window of callers on the canary within the first 2 windows + 1 batch;
        # one more batch for the rollback the monitor spawns to show in the registry.
        assert sent <= 2 * WINDOW + 16, sent
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


async def test_breaching_stable_moves_its_traffic_to_the_fallback_adapter(gateway, demo):
    """No canary: the stable itself gets slow. Its rollback path names another adapter of the
    same tenant, so the monitor moves the stable's traffic there within one window; nobody
    sees an error, and `name` then answers exactly as the fallback adapter does."""
    suffix = uuid.uuid4().hex[:6]
    name, guard = f"stable-{suffix}", f"guard-{suffix}"
    for adapter, files in ((name, "demo-qkvo-r8"), (guard, "demo-all-r16")):
        args = ["adapters", "register", str(demo.adapters[files]), "--name", adapter]
        registered = cli(gateway, *args, "--tenant", DEMO_TENANT)
        assert registered.returncode == 0, registered.stderr
    path = cli(gateway, "rollout", "path", name, guard)
    assert path.returncode == 0 and json.loads(path.stdout)["auto_fallback"], path.stderr
    assert cli(gateway, "rollout", "thresholds", name).returncode == 2  # nothing to set
    limits = cli(
        gateway, "rollout", "thresholds", name, "--window", str(WINDOW), "--max-p95-e2e-ms", "1000"
    )
    assert limits.returncode == 0, limits.stderr
    assert json.loads(limits.stdout)["threshold_override"] == {
        "window": WINDOW,
        "max_p95_e2e_ms": 1000,
    }

    client = openai.AsyncOpenAI(
        base_url=gateway.v1, api_key=gateway.api_key, max_retries=0, timeout=120
    )

    async def one(model: str, user: str = "u") -> str:
        response = await client.completions.create(
            model=model, prompt="The gateway serves", max_tokens=8, temperature=0, user=user
        )
        return response.choices[0].text

    own, fallback = await one(name), await one(guard)
    assert own != fallback  # otherwise the test could not tell who answered
    slow = cli(gateway, "faults", "set", f"{name}@1", "--latency-ms", "1500")
    assert slow.returncode == 0, slow.stderr
    sent, status = 0, {}
    try:
        while sent < 3 * WINDOW:
            batch = [f"user-{sent + i}" for i in range(8)]
            answers = await asyncio.gather(*(one(name, u) for u in batch))  # errors fail here
            sent += len(batch)
            status = admin(gateway, "GET", f"/rollouts/{name}").json()
            if status["active_target"] is not None:
                break
            assert set(answers) == {own}  # until the switch, the stable itself answers
        assert status["active_target"] == f"{guard}@1", status
        assert sent <= 2 * WINDOW, sent  # one window of the stable's own requests (+ a batch)
        event = next(e for e in status["events"] if e["action"] == "stable_fallback")
        assert event["actor"] == "rollout-monitor"
        assert event["figures"]["samples"] == WINDOW and event["figures"]["p95_e2e_ms"] > 1000
        assert rollbacks(gateway, name) == 1

        moved = await asyncio.gather(*(one(name, f"user-{i}") for i in range(8)))
        assert set(moved) == {fallback}  # everyone, exactly the fallback adapter's output
    finally:
        await client.close()
        cli(gateway, "faults", "clear")
        admin(gateway, "POST", f"/rollouts/{name}/restore")


def shadow_sample(gateway, sample: str, adapter: str, **labels: str) -> float:
    text = gateway.metrics_text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
        and s.labels.get("adapter") == adapter
        and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_shadow_mirrors_the_stable_and_counts_divergence(gateway, demo):
    """A shadow at 100 %: every caller still gets exactly v1's answer while v2, a different
    adapter, gets a copy of each request afterwards; its answers diverge and are counted,
    timed and recorded in its monitor window; stopping the shadow returns v2 to evaluated."""
    name = f"shadow-{uuid.uuid4().hex[:6]}"
    for files in ("demo-qkvo-r8", "demo-all-r16"):  # v1 (stable), v2 (candidate)
        args = ["adapters", "register", str(demo.adapters[files]), "--name", name]
        registered = cli(gateway, *args, "--tenant", DEMO_TENANT)
        assert registered.returncode == 0, registered.stderr
    assert cli(gateway, "adapters", "evaluate", f"{name}@2").returncode == 0
    client = openai.AsyncOpenAI(
        base_url=gateway.v1, api_key=gateway.api_key, max_retries=0, timeout=120
    )

    async def one(model: str, user: str = "u") -> str:
        response = await client.completions.create(
            model=model, prompt="The gateway serves", max_tokens=8, temperature=0, user=user
        )
        return response.choices[0].text

    try:
        pinned_v1, pinned_v2 = await one(f"{name}@1"), await one(f"{name}@2")
        assert pinned_v1 != pinned_v2  # otherwise divergence could not show
        started = cli(gateway, "rollout", "shadow", name, "--version", "2", "--percent", "100")
        assert started.returncode == 0, started.stderr
        view = json.loads(started.stdout)
        assert (view["stable_version"], view["shadow_version"], view["shadow_percent"]) == (
            1,
            2,
            100,
        )
        # The shadow's window holds mirrored copies only: empty until the first one ends.
        windows = admin(gateway, "GET", f"/rollouts/{name}").json()["windows"]
        before = windows.get(f"{name}@2", {"samples": 0})
        assert before["samples"] == 0

        users = [f"user-{i}" for i in range(6)]
        # One at a time, so at most a couple of mirrors overlap (the cap, 4, drops none).
        answers = [await one(name, u) for u in users]
        assert answers == [pinned_v1] * len(users)  # the candidate's output is never shown

        count = "loraplex_shadow_requests_total"
        deadline = asyncio.get_running_loop().time() + 60
        while shadow_sample(gateway, count, name, version="2") < len(users):
            assert asyncio.get_running_loop().time() < deadline, "mirrors did not finish"
            await asyncio.sleep(0.2)
        assert shadow_sample(gateway, count, name, version="2", outcome="diverged") == len(users)
        ratio = "loraplex_shadow_divergence_ratio"
        assert shadow_sample(gateway, f"{ratio}_count", name, version="2") == len(users)
        assert shadow_sample(gateway, f"{ratio}_sum", name, version="2") > 0
        ttft = "loraplex_shadow_time_to_first_token_seconds_count"
        assert shadow_sample(gateway, ttft, name, version="2") == len(users)
        status = admin(gateway, "GET", f"/rollouts/{name}").json()
        window = status["windows"][f"{name}@2"]
        assert window["samples"] - before["samples"] == len(users)
        assert window["error_rate"] == 0 and window["p95_e2e_ms"] > 0
        assert status["events"][0]["action"] == "shadow_start"

        stopped = cli(gateway, "rollout", "shadow-stop", name, "--reason", "diverges")
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(stopped.stdout)["shadow_version"] is None
        shown = cli(gateway, "adapters", "show", name)
        assert shown.returncode == 0, shown.stderr
        versions = json.loads(shown.stdout)["versions"]
        assert next(v for v in versions if v["version"] == 2)["state"] == "evaluated"
        assert await one(name) == pinned_v1  # v1 stays the pinned stable
    finally:
        await client.close()
