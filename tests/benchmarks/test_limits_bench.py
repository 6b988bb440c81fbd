"""benchmarks/limits.py runs end to end on a real Redis, briefly, and its accuracy part shows what
it is for: per-process limits admit about replicas x the policy, shared ones the policy."""

from __future__ import annotations

import argparse

from benchmarks.limits import markdown, run
from tests.gateway.redis_server import shared_redis_url


async def test_the_limits_benchmark_runs_and_shared_limits_hold_the_policy():
    args = argparse.Namespace(
        redis_url=shared_redis_url(),
        tenants=4,
        concurrency=[2],
        seconds=0.2,
        replicas=3,
        rate=5.0,
        burst=5,
        accuracy_seconds=1.0,
    )
    results = await run(args)
    cost = results["cost"]["concurrency 2"]
    assert cost["local"]["admissions"] > 0 and cost["shared"]["admissions"] > 0
    accuracy = results["accuracy"]
    allows = accuracy["policy_allows"]  # 5 + 5 x 1 s
    assert accuracy["admitted_local"] >= 2 * allows  # each replica its own bucket
    assert allows - 1 <= accuracy["admitted_shared"] <= allows + 1
    text = markdown(results, {"date": "d", "machine": "m", "redis_version": "7", "command": "c"})
    assert "admitted" in text
