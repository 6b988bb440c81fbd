"""Tenant limits shared by replicas through a real Redis (gateway.shared_limits): several
SharedLimiters on one store are several gateway replicas, and what one admits the others see.
Outages, crashes and races: test_shared_limits_failures.py."""

from __future__ import annotations

import asyncio
import math

import pytest
import redis

from gateway.errors import InvalidRequest
from gateway.shared_limits import SharedLease
from registry.tenancy import TenantPolicy
from tests.gateway.limiter_replicas import (
    DAY_RATE,
    admit,
    admits,
    refused,
    replicas,
    settled,
    store,
)
from tests.gateway.redis_server import private_redis

__all__ = ["store"]  # the fixture


async def test_requests_per_second_is_one_bucket_for_every_replica(store):
    policy = TenantPolicy(requests_per_second=DAY_RATE, burst=3)
    async with replicas(*store, count=3) as (a, b, c):
        for replica in (a, b, c):
            assert isinstance(await admit(replica, policy), SharedLease)
        for replica in (a, b, c):  # per replica, each would still have 2 left
            refusal = await refused(replica, policy)
            assert refusal.limit == "requests_per_second"
            assert refusal.error_type == "requests"
            # The store's bucket refills one request a day: the wait says so.
            assert 86000 < refusal.retry_after_s <= 86400
            assert refusal.headers() == {"Retry-After": "86400"}


async def test_a_bucket_refills_at_the_policy_rate_on_the_stores_clock(store):
    policy = TenantPolicy(requests_per_second=10, burst=1)
    async with replicas(*store) as (a, b):
        await admit(a, policy)
        refusal = await refused(b, policy)
        assert 0.05 < refusal.retry_after_s <= 0.1  # one request per 100 ms
        await asyncio.sleep(refusal.retry_after_s + 0.01)
        await admit(b, policy)


async def test_tokens_per_minute_charge_and_refund_are_seen_by_every_replica(store):
    policy = TenantPolicy(tokens_per_minute=1000)
    async with replicas(*store) as (a, b):
        first = await admit(a, policy, prompt=100, out=500)  # 600 charged
        refusal = await refused(b, policy, prompt=100, out=400)  # 500 > the 400 left
        assert refusal.limit == "tokens_per_minute" and refusal.error_type == "tokens"
        assert "requested 500" in str(refusal)
        first.release(100)  # 400 of its 500 unused: refunded to the shared bucket
        await settled(a)
        await admit(b, policy, prompt=100, out=400)  # 400 + 400 refunded (+ refill) >= 500


async def test_a_request_the_client_got_nothing_of_is_refunded_every_token(store):
    policy = TenantPolicy(tokens_per_minute=1000)
    async with replicas(*store) as (a, b):
        lease = await admit(a, policy, prompt=400, out=500)
        lease.release(200, ran=False)  # the engine failed it: all 900 back
        await settled(a)
        await admit(b, policy, prompt=400, out=500)


async def test_max_concurrent_counts_every_replicas_sequences(store):
    policy = TenantPolicy(max_concurrent=4)
    async with replicas(*store) as (a, b):
        running = [await admit(a, policy, sequences=3)]
        refusal = await refused(b, policy, sequences=2)
        assert refusal.limit == "max_concurrent"
        running.append(await admit(b, policy))
        await refused(a, policy)
        running[0].release(5)
        running[0].release(5)  # idempotent: released once
        await settled(a)
        assert a.running("acme") == 0 and b.running("acme") == 1
        running.append(await admit(a, policy, sequences=3))
        await refused(b, policy)


async def test_what_never_fits_is_a_400_without_a_round_trip(store):
    async with replicas(*store, count=1) as (a,):
        with pytest.raises(InvalidRequest) as too_many:
            await admit(a, TenantPolicy(max_concurrent=2), sequences=3)
        assert too_many.value.code == "max_concurrent_exceeded"
        with pytest.raises(InvalidRequest) as too_large:
            await admit(a, TenantPolicy(tokens_per_minute=100), prompt=60, out=50)
        assert too_large.value.code == "tokens_per_minute_exceeded"
        assert "110 tokens (60 prompt + 50 max_tokens)" in str(too_large.value)
    client = redis.Redis.from_url(store[0])
    assert list(client.scan_iter(f"{store[1]}:*")) == []


async def test_a_refusal_charges_nothing(store):
    """Refused on tokens after the requests bucket had room: that request is not taken."""
    policy = TenantPolicy(requests_per_second=DAY_RATE, burst=2, tokens_per_minute=100)
    async with replicas(*store) as (a, b):
        await admit(a, policy, prompt=40, out=40)
        assert (await refused(b, policy, prompt=40, out=40)).limit == "tokens_per_minute"
        await admit(b, policy, prompt=5, out=5)  # the second request of the burst


async def test_tenants_do_not_share_buckets(store):
    policy = TenantPolicy(requests_per_second=DAY_RATE, burst=1)
    async with replicas(*store) as (a, b):
        await admit(a, policy, tenant="acme")
        await admit(b, policy, tenant="globex")
        await refused(b, policy, tenant="acme")


async def test_an_unlimited_tenant_costs_no_round_trip(tmp_path):
    with private_redis(tmp_path) as server:
        async with replicas(server.url, "p") as (a, _):
            leases = [await admit(a, TenantPolicy()) for _ in range(50)]
            for lease in leases:
                lease.release(1)
            await settled(a)
            stats = server.client().info("commandstats")
            assert "cmdstat_evalsha" not in stats and "cmdstat_eval" not in stats
            await admit(a, TenantPolicy(max_concurrent=60))
            assert "cmdstat_evalsha" in server.client().info("commandstats")


async def test_a_lowered_limit_keeps_no_more_than_its_capacity(store):
    async with replicas(*store) as (a, b):
        await admit(a, TenantPolicy(tokens_per_minute=100_000), prompt=10, out=10)
        lowered = TenantPolicy(tokens_per_minute=600)
        await admit(b, lowered, prompt=300, out=290)
        assert (await refused(a, lowered, prompt=10, out=10)).limit == "tokens_per_minute"


async def test_a_slow_bucket_far_from_full_is_stored(store):
    """A burst of 2**53 requests a day, nearly spent: its refill time (7.8e23 ms) is beyond what
    Lua prints as an integer, which PEXPIRE would refuse; the bucket is still written."""
    policy = TenantPolicy(requests_per_second=DAY_RATE, burst=2**53)
    client = redis.Redis.from_url(store[0])
    key = f"{store[1]}:limits:{{acme}}:requests"
    seconds, micros = client.time()
    client.hset(key, mapping={"level": 1.5, "at": seconds * 1000 + micros // 1000})
    async with replicas(*store, count=1) as (a,):
        assert isinstance(await admit(a, policy), SharedLease)
        assert math.isclose(float(client.hget(key, "level")), 0.5, abs_tol=1e-3)
        assert client.pttl(key) > 0
        await refused(a, policy)


async def test_a_burst_of_concurrent_admissions_waits_for_connections(store):
    """150 requests at once, more than the connection pool holds: they queue for a connection
    (each script is ~0.1 ms) instead of failing over to the replica's own, full, buckets."""
    policy = TenantPolicy(requests_per_second=DAY_RATE, burst=10)
    async with replicas(*store, count=1) as (a,):
        outcomes = await asyncio.gather(
            *(admit(a, policy) for _ in range(150)), return_exceptions=True
        )
        kinds = [type(outcome).__name__ for outcome in outcomes]
        assert kinds.count("SharedLease") == 10 and kinds.count("RateLimited") == 140
        assert a._up


async def test_a_refund_under_a_raised_limit_grants_nothing_extra(store):
    """A lease admitted under 1000 tokens a minute gives its unused tokens back after the limit
    was raised to a million: the bucket holds what it held, not a full million."""
    async with replicas(*store) as (a, b):
        lease = await admit(a, TenantPolicy(tokens_per_minute=1000), prompt=100, out=500)
        raised = TenantPolicy(tokens_per_minute=1_000_000)
        assert (await refused(b, raised, prompt=1, out=899_999)).limit == "tokens_per_minute"
        lease.release(0)  # 500 unused
        await settled(a)
        assert (await refused(b, raised, prompt=1, out=899_999)).limit == "tokens_per_minute"


async def test_replicas_caching_different_policies_never_refill_the_bucket(store):
    """a still has 2000 tokens a minute cached, b the new 1000: b's refunds must not make the
    bucket read full to a (tests/gateway/test_limits.py has the same for one process)."""
    old, new = TenantPolicy(tokens_per_minute=2000), TenantPolicy(tokens_per_minute=1000)
    kept = 0
    async with replicas(*store) as (a, b):
        for _ in range(10):
            if await admits(a, old, prompt=1, out=999):
                kept += 1000
            try:
                failed = await admit(b, new, prompt=1, out=499)
            except Exception:
                continue
            failed.release(0, ran=False)  # the engine failed it: all 500 back
            await settled(b)
    assert kept <= 2000


async def test_a_count_the_store_lost_is_whole_again_at_the_next_admission(store):
    """The run hash is gone (evicted, flushed, a failover): the replica's next admission writes
    its whole count, not only the new request's."""
    policy = TenantPolicy(max_concurrent=3)
    async with replicas(*store, renew_s=3600) as (a, b):
        held = [await admit(a, policy), await admit(a, policy)]
        redis.Redis.from_url(store[0]).delete(f"{store[1]}:limits:{{acme}}:run")
        held.append(await admit(a, policy))
        assert (await refused(b, policy)).limit == "max_concurrent"  # 3 run on a


async def test_an_older_count_never_replaces_a_newer_one(store):
    """Writes from one replica travel over several connections and may land out of order (or
    late: a call the store ran after the replica gave up on it): the newest version stays."""
    async with replicas(*store, count=1, renew_s=3600) as (a,):
        keys = a._keys("acme", "run", "alive", "tokens")
        report = a.counts._report
        await report(keys=keys, args=[a.replica, 10_000, 600_000, 0, 12, 0])
        await report(keys=keys, args=[a.replica, 10_000, 600_000, 5, 11, 0])
        stored = redis.Redis.from_url(store[0]).hget(keys[0], a.replica)
        assert stored == b"0:12"
        admission = [a.replica, 10_000, 600_000, 4, 10, 3, 0, "0.0", "0.0", "0.0", 1]
        assert await a._admit(
            keys=a._keys("acme", "run", "alive", "requests", "tokens"), args=admission
        ) == [0, 0]  # judged on the newer count (0)
        assert redis.Redis.from_url(store[0]).hget(keys[0], a.replica) == b"0:12"
