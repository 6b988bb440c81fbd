"""What shared tenant limits cost and what they buy: the gateway's limiters, measured alone.

Two questions, each against a real Redis (default the machine's, 127.0.0.1:6379):

- cost: admissions per second and the latency of one admission (acquire + release) with
  `concurrency` requests in flight over `tenants` tenants, per-process limits (TenantLimiter)
  vs shared through Redis (SharedLimiter), policies that never refuse;
- accuracy: `replicas` gateway replicas, each offered far more than a tenant's policy
  (requests_per_second R with burst B, for `seconds`): how many requests the deployment
  admitted. Per-process limits admit replicas x (B + R x seconds); shared, B + R x seconds.

    python -m benchmarks.limits --out benchmarks/results/limits/run-DATE

It measures the limiters only (no HTTP, no engine), with one replica writing counts in the cost
part: the number to hold a gateway request's latency budget against is the per-admission round
trip. A run in which the store did not answer (a fallback admission) stops with an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import redis

from gateway.limits import AdmissionLimits, RateLimited, TenantLimiter
from gateway.shared_limits import FallbackLease, SharedLimiter
from registry.tenancy import TenantPolicy

NEVER_REFUSES = TenantPolicy(
    requests_per_second=1e9, burst=10**12, tokens_per_minute=10**15, max_concurrent=10**9
)


async def measure_cost(
    limiter: AdmissionLimits, *, tenants: int, concurrency: int, seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(index: int) -> None:
        tenant = f"bench-{index % tenants}"
        while time.perf_counter() < stop:
            started = time.perf_counter()
            lease = await limiter.acquire(tenant, NEVER_REFUSES, prompt_tokens=100, max_tokens=100)
            lease.release(50)
            latencies.append(time.perf_counter() - started)
            if isinstance(lease, FallbackLease):
                raise RuntimeError("the store did not answer: this would measure local limits")
            await asyncio.sleep(0)  # the in-process limiter never yields: let the others run

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {
        "admissions": len(latencies),
        "admissions_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


async def measure_accuracy(
    limiters: list[AdmissionLimits], policy: TenantPolicy, seconds: float
) -> int:
    """Every replica offers one request every 5 ms for `seconds`; the admitted total."""
    admitted = 0
    stop = time.perf_counter() + seconds

    async def replica(limiter: AdmissionLimits) -> None:
        nonlocal admitted
        while time.perf_counter() < stop:
            try:
                lease = await limiter.acquire("tenant", policy, prompt_tokens=1, max_tokens=1)
            except RateLimited:
                pass
            else:
                if isinstance(lease, FallbackLease):
                    raise RuntimeError("the store did not answer: not a shared admission")
                admitted += 1
                lease.release(1)
            await asyncio.sleep(0.005)

    await asyncio.gather(*(replica(limiter) for limiter in limiters))
    return admitted


async def shared_replicas(url: str, prefix: str, count: int) -> list[SharedLimiter]:
    limiters = [SharedLimiter(url, prefix=prefix) for _ in range(count)]
    for limiter in limiters:
        await limiter.start()
    return limiters


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {"cost": {}, "accuracy": {}}
    try:
        for concurrency in args.concurrency:
            shape = {"tenants": args.tenants, "concurrency": concurrency, "seconds": args.seconds}
            local = await measure_cost(TenantLimiter(), **shape)
            (shared,) = await shared_replicas(args.redis_url, prefix, 1)
            try:
                remote = await measure_cost(shared, **shape)
            finally:
                await shared.close()
            results["cost"][f"concurrency {concurrency}"] = {"local": local, "shared": remote}

        policy = TenantPolicy(requests_per_second=args.rate, burst=args.burst)
        expected = args.burst + args.rate * args.accuracy_seconds
        local_total = await measure_accuracy(
            [TenantLimiter() for _ in range(args.replicas)], policy, args.accuracy_seconds
        )
        limiters = await shared_replicas(args.redis_url, f"{prefix}-accuracy", args.replicas)
        try:
            shared_total = await measure_accuracy(limiters, policy, args.accuracy_seconds)
        finally:
            for limiter in limiters:
                await limiter.close()
        results["accuracy"] = {
            "replicas": args.replicas,
            "policy": {"requests_per_second": args.rate, "burst": args.burst},
            "seconds": args.accuracy_seconds,
            "policy_allows": expected,
            "admitted_local": local_total,
            "admitted_shared": shared_total,
        }
    finally:
        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
    return results


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Tenant limiters: per process vs shared through Redis",
        "",
        f"{meta['date']} · commit {meta.get('commit', '?')} · {meta['machine']} · Redis "
        f"{meta['redis_version']} on the same machine · `{meta['command']}`",
        "",
        "| in flight | local admissions/s | local p50 / p99 ms | shared admissions/s | "
        "shared p50 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for shape, pair in results["cost"].items():
        local, shared = pair["local"], pair["shared"]
        lines.append(
            f"| {shape.split()[-1]} | {local['admissions_per_s']:,.0f} | "
            f"{local['p50_ms']} / {local['p99_ms']} | {shared['admissions_per_s']:,.0f} | "
            f"{shared['p50_ms']} / {shared['p99_ms']} |"
        )
    accuracy = results["accuracy"]
    lines += [
        "",
        f"{accuracy['replicas']} replicas, each offered a request every 5 ms for "
        f"{accuracy['seconds']} s, policy {accuracy['policy']['requests_per_second']} req/s "
        f"burst {accuracy['policy']['burst']} (allows {accuracy['policy_allows']:g}): admitted "
        f"{accuracy['admitted_local']} with per-process limits, "
        f"{accuracy['admitted_shared']} shared.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--accuracy-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    client = redis.Redis.from_url(args.redis_url)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "redis_version": client.info("server")["redis_version"],
        "command": " ".join(["python -m benchmarks.limits", *sys.argv[1:]]),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
    }
    client.close()
    report = markdown(results, meta)
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({**meta, **results}, indent=2) + "\n")
        (args.out / "README.md").write_text(report)


if __name__ == "__main__":
    main()
