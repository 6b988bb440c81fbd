"""Shared tenant limits when things go wrong, against real Redis servers: a replica that crashes,
a store that dies, refuses writes, answers late or loses its data, a client that hangs up while
its admission runs. Each must leave the counts right once the store answers, and no request
may fail because the store did."""

from __future__ import annotations

import asyncio
import time

import redis

from gateway.metrics import LIMIT_STORE_FALLBACKS, LIMIT_STORE_UP
from gateway.shared_limits import FallbackLease, SharedLease, SharedLimiter
from registry.tenancy import TenantPolicy
from tests.gateway.limiter_replicas import (
    DAY_RATE,
    admit,
    admits,
    down,
    errors,
    eventually,
    refused,
    refuses,
    replicas,
    settled,
    store,
    up,
)
from tests.gateway.redis_server import clear_prefix, private_redis

__all__ = ["store"]  # the fixture


def store_up() -> float:
    return LIMIT_STORE_UP.labels("redis")._value.get()


async def test_a_crashed_replicas_sequences_stop_counting_at_its_deadline(store):
    policy = TenantPolicy(max_concurrent=2)
    options = {"alive_s": 0.5, "renew_s": 0.1}
    async with replicas(*store, count=1, **options) as (survivor,):
        crashed = SharedLimiter(store[0], prefix=store[1], **options)
        await crashed.start()
        await admit(crashed, policy, sequences=2)
        crashed._renewing.cancel()  # the process died: no renewal, no release, no close
        await refused(survivor, policy)
        started = time.monotonic()
        assert await eventually(lambda: admits(survivor, policy), timeout_s=3)
        assert time.monotonic() - started >= 0.3  # not before its deadline
        for client, pool in (
            (crashed._client, crashed._pool),
            (crashed._writer, crashed._writer_pool),
        ):
            await client.aclose()
            await pool.aclose()


async def test_a_live_replicas_running_sequences_keep_counting(store):
    """Renewed before its deadline, a replica's sequences count as long as they run."""
    policy = TenantPolicy(max_concurrent=1)
    async with replicas(*store, alive_s=1.0, renew_s=0.05) as (a, b):
        lease = await admit(a, policy)
        await asyncio.sleep(2.5)
        await refused(b, policy)
        lease.release(1)
        await settled(a)
        await admit(b, policy)


async def test_counts_lost_by_the_store_are_written_again(store):
    """The store restarted empty (or counted a paused replica dead): the next renewal writes
    the replica's running sequences back."""
    policy = TenantPolicy(max_concurrent=1)
    async with replicas(*store, renew_s=0.05) as (a, b):
        await admit(a, policy)
        clear_prefix(*store)
        assert await eventually(lambda: refuses(b, policy))


async def test_a_store_outage_falls_back_to_each_replicas_own_limits(tmp_path):
    policy = TenantPolicy(requests_per_second=DAY_RATE, burst=1, max_concurrent=5)
    with private_redis(tmp_path) as server:
        async with replicas(server.url, "p", renew_s=0.05, timeout_s=0.1) as (a, b):
            assert store_up() == 1
            await admit(a, policy)
            await refused(b, policy)
            renew_errors = errors("renew")
            server.stop()
            # A request meanwhile is admitted under the replica's own limits, never refused
            # or failed for the outage.
            assert isinstance(await admit(a, policy, tenant="first"), FallbackLease)
            assert await eventually(lambda: down(a, b))
            assert store_up() == 0 and errors("renew") > renew_errors
            # Down, each replica enforces the policy on its own, with no round trip.
            fallbacks = LIMIT_STORE_FALLBACKS._value.get()
            assert isinstance(await admit(a, policy, tenant="during"), FallbackLease)
            await refused(a, policy, tenant="during")
            assert isinstance(await admit(b, policy, tenant="during"), FallbackLease)
            assert LIMIT_STORE_FALLBACKS._value.get() == fallbacks + 2
            server.start()
            assert await eventually(lambda: up(a, b))
            assert store_up() == 1
            assert isinstance(await admit(a, policy, tenant="after"), SharedLease)
            await refused(b, policy, tenant="after")


async def test_one_late_answer_falls_back_for_that_request_only(tmp_path):
    """A store that answers one admission late (or an event loop stalled while it waited) is
    not an outage: that request goes on under the replica's own limits, the next is shared."""
    policy = TenantPolicy(max_concurrent=9)
    with private_redis(tmp_path) as server:
        async with replicas(server.url, "p", count=1, renew_s=3600, timeout_s=0.1) as (a,):
            assert await admits(a, policy)  # the script is loaded
            spinner = server.start_busy(0.5)
            assert isinstance(await admit(a, policy), FallbackLease)
            await asyncio.to_thread(spinner.join)
            assert a._up
            assert isinstance(await admit(a, policy), SharedLease)


async def test_fallback_concurrency_counts_what_the_store_admitted_and_back(tmp_path):
    """Down, the replica's own max_concurrent counts the sequences the store admitted before;
    back, the store counts those the replica admitted on its own."""
    policy = TenantPolicy(max_concurrent=2)
    with private_redis(tmp_path) as server:
        async with replicas(server.url, "p", count=1, renew_s=0.05, timeout_s=0.1) as (a,):
            shared = [await admit(a, policy), await admit(a, policy)]
            server.stop()
            assert await eventually(lambda: down(a))
            await refused(a, policy)  # 2 run already
            shared.pop().release(1)
            on_its_own = await admit(a, policy)
            assert isinstance(on_its_own, FallbackLease) and a.running("acme") == 2
            server.start()  # empty
            assert await eventually(lambda: up(a))
            async with replicas(server.url, "p", count=1) as (b,):
                assert await eventually(lambda: refuses(b, policy))  # a's 2 count again
                on_its_own.release(1)
                await settled(a)
                assert await admits(b, policy)


async def test_sequences_released_while_the_store_refuses_are_uncounted_after(tmp_path):
    """A release the store never applied would hold the tenant's slots: once the store answers
    again, the replica writes its exact count. The store stays up but refuses writes (out of
    memory), so the stale count is still there to be repaired."""
    policy = TenantPolicy(max_concurrent=2)
    with private_redis(tmp_path) as server:
        control = server.client()
        async with replicas(server.url, "p", renew_s=0.05, timeout_s=0.1) as (a, b):
            refused_release = await admit(a, policy, tenant="acme", sequences=2)
            unsent_release = await admit(a, policy, tenant="globex", sequences=2)
            control.config_set("maxmemory", 1)  # every write refused: OOM
            refused_release.release(1)  # the store refuses it
            await settled(a)
            assert await eventually(lambda: down(a))  # the renewal failed too
            unsent_release.release(1)  # while the store is known down: not even sent
            control.config_set("maxmemory", 0)
            assert await eventually(lambda: up(a))
            for tenant in ("acme", "globex"):
                assert await eventually(lambda t=tenant: admits(b, policy, tenant=t, sequences=2))


async def test_tokens_owed_while_the_store_is_down_are_given_back_after(tmp_path):
    """A request the engine failed is refunded every token, even if its release came while the
    store refused writes: the refund waits and goes with the next write."""
    policy = TenantPolicy(tokens_per_minute=1000)
    with private_redis(tmp_path) as server:
        control = server.client()
        async with replicas(server.url, "p", renew_s=0.05, timeout_s=0.1) as (a, b):
            lease = await admit(a, policy, prompt=400, out=500)
            control.config_set("maxmemory", 1)
            assert await eventually(lambda: down(a))
            lease.release(0, ran=False)  # 900 owed
            failed = errors("renew")

            async def renewal_failed() -> bool:
                return errors("renew") > failed

            assert await eventually(renewal_failed)  # a write carrying them failed: still owed
            control.config_set("maxmemory", 0)
            assert await eventually(lambda: up(a))
            assert await eventually(lambda: admits(b, policy, prompt=400, out=500))


async def test_an_admission_whose_answer_came_too_late_is_uncounted_after(tmp_path):
    """The store ran the admission after the replica gave up waiting for it (and admitted the
    request under its own limits): the replica's next write of its count replaces it."""
    policy = TenantPolicy(max_concurrent=1)
    with private_redis(tmp_path) as server:
        async with replicas(server.url, "p", renew_s=3600, timeout_s=0.1) as (a, b):
            assert await admits(a, policy, tenant="warm")  # the script is loaded
            spinner = server.start_busy(0.5)
            lease = await admit(a, policy)
            assert isinstance(lease, FallbackLease)
            lease.release(1)  # written while the store is busy: may land before the admission
            await settled(a)
            await asyncio.to_thread(spinner.join)
            await a.counts.renew()
            assert await admits(b, policy)


async def test_a_client_that_hangs_up_during_its_admission_gets_its_lease_given_back(tmp_path):
    """The request is cancelled while its admission waits on a busy store. The admission goes
    on (the store runs the script anyway); the lease it yields is given back: no count left
    and every token refunded, as for a request the engine failed."""
    policy = TenantPolicy(max_concurrent=1, tokens_per_minute=1000)
    with private_redis(tmp_path) as server:
        async with replicas(server.url, "p", renew_s=3600, timeout_s=2.0) as (a, b):
            assert await admits(a, policy, tenant="warm")
            spinner = server.start_busy(0.5)
            admission = asyncio.create_task(admit(a, policy, prompt=400, out=500))
            await asyncio.sleep(0.1)
            admission.cancel()
            await asyncio.gather(admission, return_exceptions=True)
            assert admission.cancelled()
            await asyncio.to_thread(spinner.join)

            async def given_back() -> bool:
                return a.running("acme") == 0

            assert await eventually(given_back)
            await settled(a)
            assert await admits(b, policy, prompt=400, out=500)


async def test_closing_never_hangs_on_a_renewal_in_flight(store):
    """close() while renewals run back to back: on Python 3.11 a cancellation can be lost in
    redis-py's wait_for, and a loop that missed it never ended (review)."""
    policy = TenantPolicy(max_concurrent=100, tokens_per_minute=10**6)
    for _ in range(20):
        limiter = SharedLimiter(store[0], prefix=store[1], renew_s=0.001)
        await limiter.start()
        leases = [await admit(limiter, policy, tenant=f"t{i}") for i in range(10)]
        for lease in leases[:5]:
            lease.release(1)
        await asyncio.sleep(0.002)
        await asyncio.wait_for(limiter.close(), timeout=5)


async def test_a_release_after_close_writes_nothing_back(store):
    """A stream that outlived the shutdown grace ends after close(): its count must not come
    back to the store with a fresh deadline, holding the tenant's slot 10 s for a gone process."""
    async with replicas(*store, count=1) as (survivor,):
        leaving = SharedLimiter(store[0], prefix=store[1])
        await leaving.start()
        lease = await admit(leaving, TenantPolicy(max_concurrent=1))
        await leaving.close()
        lease.release(1)
        await asyncio.sleep(0.1)
        assert redis.Redis.from_url(store[0]).hgetall(f"{store[1]}:limits:{{acme}}:run") == {}
        await admit(survivor, TenantPolicy(max_concurrent=1))


async def test_an_idle_replica_sees_the_store_go_down(tmp_path):
    with private_redis(tmp_path) as server:
        async with replicas(server.url, "p", count=1, renew_s=0.05, timeout_s=0.1) as (a,):
            server.stop()
            assert await eventually(lambda: down(a))


async def test_a_write_the_store_refuses_for_one_tenant_spares_the_others(tmp_path):
    """One tenant's key is unusable (here of the wrong type): its write fails alone. The store
    is not taken for down, and the other tenants' refunds are applied once, not again at every
    renewal."""
    policy = TenantPolicy(tokens_per_minute=60_000, max_concurrent=5)
    with private_redis(tmp_path) as server:
        control = server.client()
        async with replicas(server.url, "p", count=1, renew_s=0.05) as (a,):
            await admit(a, policy, tenant="broken")
            broken = await admit(a, policy, tenant="broken")
            await admit(a, policy, tenant="good")  # runs on: "good" is renewed too
            good = await admit(a, policy, tenant="good", prompt=10, out=30_000)
            control.delete("p:limits:{broken}:run")
            control.set("p:limits:{broken}:run", "not a hash")
            broken.release(0)
            good.release(0)  # 30,000 back, in the same write as broken's
            await settled(a)
            level = float(control.hget("p:limits:{good}:tokens", "level"))
            await asyncio.sleep(0.5)  # ~10 renewals, each failing for "broken"
            assert a._up
            assert float(control.hget("p:limits:{good}:tokens", "level")) == level


async def test_leases_admitted_in_the_outage_are_released_locally(tmp_path):
    policy = TenantPolicy(max_concurrent=1)
    with private_redis(tmp_path) as server:
        async with replicas(server.url, "p", count=1, renew_s=10, timeout_s=0.1) as (a,):
            server.stop()
            lease = await admit(a, policy)
            assert isinstance(lease, FallbackLease) and a.running("acme") == 1
            lease.release(1)
            assert a.running("acme") == 0
            await admit(a, policy)


async def test_an_unreachable_store_at_start_is_not_fatal(tmp_path):
    with private_redis(tmp_path) as server:
        server.stop()
        async with replicas(server.url, "p", count=1, renew_s=0.05, timeout_s=0.1) as (a,):
            assert not a._up and store_up() == 0
            assert isinstance(await admit(a, TenantPolicy(max_concurrent=1)), FallbackLease)
            server.start()
            assert await eventually(lambda: up(a))
            assert isinstance(await admit(a, TenantPolicy(max_concurrent=2)), SharedLease)


async def test_a_closed_replica_clears_its_counts(store):
    policy = TenantPolicy(max_concurrent=1)
    async with replicas(*store, count=1) as (survivor,):
        leaving = SharedLimiter(store[0], prefix=store[1])
        await leaving.start()
        await admit(leaving, policy)
        await refused(survivor, policy)
        await leaving.close()
        await admit(survivor, policy)


async def test_a_wrong_password_is_an_unreachable_store_and_never_logged(tmp_path, caplog):
    with private_redis(tmp_path) as server:
        server.client().config_set("requirepass", "right-password")
        url = server.url.replace("redis://", "redis://:wrong-s3cret@")
        async with replicas(url, "p", count=1, renew_s=0.05, timeout_s=0.1) as (a,):
            assert not a._up
            assert isinstance(await admit(a, TenantPolicy(max_concurrent=1)), FallbackLease)
    assert "wrong-s3cret" not in caplog.text
    assert "limits store unreachable (AuthenticationError)" in caplog.text
