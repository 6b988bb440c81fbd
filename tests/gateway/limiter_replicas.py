"""Shared by the shared-limits tests: SharedLimiters on one Redis stand for gateway replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from gateway.limits import Lease, RateLimited
from gateway.metrics import LIMIT_STORE_ERRORS
from gateway.shared_limits import SharedLimiter
from registry.tenancy import TenantPolicy
from tests.gateway.redis_server import clear_prefix, shared_redis_url, unique_prefix

DAY_RATE = 1 / 86400  # the slowest rate a policy may set: nothing refills during a test


@pytest.fixture
def store():
    """(url, prefix) on the machine's Redis; the prefix's keys are deleted afterwards."""
    url = shared_redis_url()
    prefix = unique_prefix()
    yield url, prefix
    clear_prefix(url, prefix)


@asynccontextmanager
async def replicas(url: str, prefix: str, count: int = 2, **options) -> AsyncIterator[list]:
    limiters = [SharedLimiter(url, prefix=prefix, **options) for _ in range(count)]
    for limiter in limiters:
        await limiter.start()
    try:
        yield limiters
    finally:
        for limiter in limiters:
            await limiter.close()


async def admit(limiter, policy: TenantPolicy, tenant="acme", prompt=10, out=10, sequences=1):
    return await limiter.acquire(
        tenant, policy, prompt_tokens=prompt, max_tokens=out, sequences=sequences
    )


async def refused(limiter, policy, **kwargs) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await admit(limiter, policy, **kwargs)
    return caught.value


async def settled(limiter: SharedLimiter) -> None:
    """Releases are written by a task of their own (a request's end never waits on the store)."""
    while limiter.counts.flushing is not None:
        await asyncio.gather(limiter.counts.flushing, return_exceptions=True)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.02)
    return await check()


async def admits(limiter: SharedLimiter, policy: TenantPolicy, **kwargs) -> bool:
    """Whether `limiter` admits the request now (released at once if so)."""
    try:
        lease: Lease = await admit(limiter, policy, **kwargs)
    except RateLimited:
        return False
    lease.release(0)
    await settled(limiter)
    return True


async def refuses(limiter: SharedLimiter, policy: TenantPolicy, **kwargs) -> bool:
    return not await admits(limiter, policy, **kwargs)


async def up(*limiters: SharedLimiter) -> bool:
    return all(limiter._up for limiter in limiters)


async def down(*limiters: SharedLimiter) -> bool:
    return not any(limiter._up for limiter in limiters)


def errors(operation: str) -> float:
    return LIMIT_STORE_ERRORS.labels(operation)._value.get()
