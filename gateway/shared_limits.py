"""Tenant limits shared by every gateway replica through Redis (LORAPLEX_LIMITS_REDIS_URL).

With per-process limits (gateway.limits) a tenant behind N replicas gets N x its policy. Here
each admission is one Redis script (gateway.shared_limit_scripts) that checks and charges the
tenant's requests-per-second and tokens-per-minute buckets and its concurrent sequences over all
replicas at once, with the store's clock: the policy holds for the deployment as a whole.

Concurrency: this process knows exactly which sequences it runs per tenant (counted from the
moment a request asks, so two of its admissions in flight see each other) and writes that whole
count, versioned, with every admission and release and again every `renew_s`
(gateway/shared_limit_counts.py). The store keeps each replica's newest count with a deadline:
a replica that crashed with requests in flight stops counting once it passes (`alive_s`)
instead of holding the tenant's slots for good, and whatever went wrong with a write (lost,
late, cut by a timeout, a store restarted empty) is right again at the next one.

When the store does not answer, that request is admitted under this process's own limits (as
without the setting; its concurrency still counts what this replica runs) rather than refused:
an outage of the limits store must not become an outage of the gateway. After
FAILURES_TO_DOWN failures in a row, or a failed renewal, the store counts as down (no round
trips, `loraplex_limit_store_up` 0, an alert) until the renewal finds it answering again. Tokens
to refund meanwhile wait and go back with the next write.

A tenant without limits costs no round trip and is not counted: a limit added while its
requests run counts those admitted after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.limits import (
    Lease,
    TenantLimiter,
    refuse_concurrent,
    refuse_requests,
    refuse_tokens,
    refuse_what_never_fits,
)
from gateway.metrics import (
    LIMIT_STORE_ADMISSION_DURATION,
    LIMIT_STORE_ERRORS,
    LIMIT_STORE_FALLBACKS,
    LIMIT_STORE_UP,
)
from gateway.shared_limit_counts import STORE_ERRORS, ReplicaCounts
from gateway.shared_limit_scripts import ADMIT
from registry.tenancy import TenantPolicy

logger = logging.getLogger(__name__)

# A store on the same network answers in well under a millisecond; past this the request goes on
# under this replica's own limits rather than wait. Waiting for a free connection counts too.
STORE_TIMEOUT_S = 0.25
MAX_CONNECTIONS = 64  # past this, admissions wait for a connection (a script takes ~0.1 ms)
WRITER_CONNECTIONS = 2  # one flush of released counts and one renewal at a time
FAILURES_TO_DOWN = 3  # one slow answer (a stalled event loop) is not an outage
ALIVE_S = 10.0  # a crashed replica's running sequences stop counting after this
RENEW_S = 1.0
KEEP_S = 600.0  # the count hashes of a tenant no replica writes vanish after this
REFUSALS = {1: "max_concurrent", 2: "requests", 3: "tokens"}


@dataclass
class SharedLease(Lease):
    """A lease the store admitted: its unused tokens go back to the shared bucket."""


@dataclass
class FallbackLease(Lease):
    """A lease this process's own buckets admitted while the store did not answer."""

    local: Lease | None = None


class SharedLimiter:
    """AdmissionLimits over one Redis: `start()` in the app's lifespan, `close()` at its end."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "loraplex",
        alive_s: float = ALIVE_S,
        renew_s: float = RENEW_S,
        timeout_s: float = STORE_TIMEOUT_S,
    ):
        # Admissions, and apart from them the writes of counts (releases, renewals): a burst of
        # admissions must not keep the writes from a connection (fair waiting is not promised).
        self._pool, self._client = _client(url, MAX_CONNECTIONS, timeout_s)
        self._writer_pool, self._writer = _client(url, WRITER_CONNECTIONS, timeout_s)
        self._admit = self._client.register_script(ADMIT)
        self._prefix = prefix
        self._local = TenantLimiter()  # the buckets of fallback admissions
        self._alive_ms = round(alive_s * 1000)
        self._keep_ms = round(max(KEEP_S, 2 * alive_s) * 1000)
        self._renew_s = renew_s
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.counts = ReplicaCounts(
            self._writer,
            self._keys,
            replica=self.replica,
            alive_ms=self._alive_ms,
            keep_ms=self._keep_ms,
            timeout_s=timeout_s,
            may_write=lambda: self._up and not self._closed,
            on_failure=self._failed,
        )
        self._failures = 0  # in a row
        self._up = True
        self._closed = False
        self._stop = asyncio.Event()
        self._timeout_s = timeout_s
        self._renewing: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Probe the store and start renewing. An unreachable store is logged, not fatal: the
        gateway serves under per-replica limits until it answers."""
        try:
            await self._client.ping()
            self._set_up(True)
        except STORE_ERRORS as exc:
            self._set_up(False, exc)
        self._renewing = asyncio.create_task(self._renew_forever(), name="limit-store-renew")

    async def close(self) -> None:
        """Stop writing, and take this replica's counts out of the store. A request that
        outlives it is admitted (and released) under this process's own limits."""
        self._closed = True
        self._stop.set()
        reachable, self._up = self._up, False  # from here on: no round trips
        tasks = {task for task in (self._renewing, self.counts.flushing) if task is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            # redis-py can swallow a cancellation in flight (the loop then goes on): bounded.
            await asyncio.wait(tasks, timeout=2 * self._timeout_s + 1)
        if reachable:
            # Sequences still running stop counting now rather than at their deadline.
            pipe = self._writer.pipeline(transaction=False)
            for tenant in set(self.counts.counts) | self.counts.dirty:
                pipe.hdel(self._key(tenant, "run"), self.replica)
                pipe.hdel(self._key(tenant, "alive"), self.replica)
            try:
                await pipe.execute()
            except STORE_ERRORS:
                logger.warning("could not clear this replica's counts in the limits store")
        for client, pool in ((self._client, self._pool), (self._writer, self._writer_pool)):
            await client.aclose()
            await pool.aclose()

    # ---- AdmissionLimits -----------------------------------------------------------------
    async def acquire(
        self,
        tenant: str,
        policy: TenantPolicy,
        *,
        prompt_tokens: int,
        max_tokens: int,
        sequences: int = 1,
    ) -> Lease:
        refuse_what_never_fits(
            tenant, policy, sequences=sequences, prompt_tokens=prompt_tokens, max_tokens=max_tokens
        )
        unlimited = (
            policy.requests_per_second is None
            and policy.tokens_per_minute is None
            and policy.max_concurrent is None
        )
        if unlimited:
            return Lease(self, tenant, max_tokens, sequences)
        # A client that hangs up cancels its request here. The admission goes on (the store
        # may be running its script): a lease it yields is given back, tokens refunded.
        admission = asyncio.ensure_future(
            self._admit_counted(tenant, policy, prompt_tokens, max_tokens, sequences)
        )
        try:
            return await asyncio.shield(admission)
        except asyncio.CancelledError:
            admission.add_done_callback(_give_back_abandoned)
            raise

    def running(self, tenant: str) -> int:
        """Sequences this replica runs for `tenant` (store-admitted and fallback leases)."""
        return self.counts.counts[tenant]

    # ---- admission -----------------------------------------------------------------------
    async def _admit_counted(
        self, tenant: str, policy: TenantPolicy, prompt_tokens: int, max_tokens: int, sequences: int
    ) -> Lease:
        self.counts.change(tenant, sequences)
        count, version = self.counts.counts[tenant], self.counts.version
        try:
            if not self._up:
                return self._fallback(tenant, policy, prompt_tokens, max_tokens, sequences)
            return await self._admit_shared(
                tenant, policy, prompt_tokens, max_tokens, sequences, count, version
            )
        except BaseException:
            # Refused or failed: this request no longer counts, and a count written meanwhile
            # (a concurrent admission's, a renewal's) may hold it.
            self.counts.change(tenant, -sequences)
            self.counts.dirty.add(tenant)
            self.counts.flush_soon()
            raise

    async def _admit_shared(
        self,
        tenant: str,
        policy: TenantPolicy,
        prompt_tokens: int,
        max_tokens: int,
        sequences: int,
        count: int,
        version: int,
    ) -> Lease:
        cost = prompt_tokens + max_tokens
        rps, tpm = policy.requests_per_second, policy.tokens_per_minute
        started = time.perf_counter()
        try:
            # One bound for the whole call: waiting for a connection, connecting, sending and
            # reading each have their own timeout in redis-py.
            async with asyncio.timeout(self._timeout_s):
                verdict, wait_ms = await self._admit(
                    keys=self._keys(tenant, "run", "alive", "requests", "tokens"),
                    args=[
                        self.replica,
                        self._alive_ms,
                        self._keep_ms,
                        count,
                        version,
                        -1 if policy.max_concurrent is None else policy.max_concurrent,
                        float(policy.bucket_size or 0),
                        repr(0.0 if rps is None else rps / 1000.0),
                        repr(0.0 if tpm is None else float(tpm)),
                        repr(0.0 if tpm is None else tpm / 60000.0),
                        cost,
                    ],
                )
        except STORE_ERRORS as exc:
            self._failed("admit", exc)
            return self._fallback(tenant, policy, prompt_tokens, max_tokens, sequences)
        self._failures = 0
        LIMIT_STORE_ADMISSION_DURATION.observe(time.perf_counter() - started)
        refusal = REFUSALS.get(int(verdict))
        wait = int(wait_ms) / 1000.0
        if refusal == "max_concurrent":
            refuse_concurrent(tenant, policy)
        if refusal == "requests":
            refuse_requests(tenant, policy, wait)
        if refusal == "tokens":
            refuse_tokens(tenant, policy, cost, wait)
        lease = SharedLease(self, tenant, max_tokens, sequences)
        if tpm is not None:
            lease.charged_tokens = cost
        return lease

    def _fallback(
        self, tenant: str, policy: TenantPolicy, prompt_tokens: int, max_tokens: int, sequences: int
    ) -> Lease:
        """This process's own buckets; its concurrency is every sequence this replica runs for
        the tenant, those the store admitted included (counted already, this request too)."""
        limit = policy.max_concurrent
        if limit is not None and self.counts.counts[tenant] > limit:
            refuse_concurrent(tenant, policy)
        local = self._local.admit(
            tenant,
            dataclasses.replace(policy, max_concurrent=None),
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            sequences=sequences,
        )
        LIMIT_STORE_FALLBACKS.inc()
        return FallbackLease(self, tenant, max_tokens, sequences, local=local)

    # ---- release and renewal -------------------------------------------------------------
    def _release(self, lease: Lease, completion_tokens: int, *, ran: bool) -> None:
        if isinstance(lease, FallbackLease):
            if lease.local is not None:
                lease.local.release(completion_tokens, ran=ran)
        elif isinstance(lease, SharedLease):
            refund = lease.charged_tokens
            if ran:
                refund = min(refund, lease.reserved_completion_tokens - completion_tokens)
            if refund > 0:
                self.counts.refunds[lease.tenant] += refund
        else:
            return  # an unlimited tenant's: nothing was counted
        self.counts.change(lease.tenant, -lease.sequences)
        self.counts.dirty.add(lease.tenant)
        self.counts.flush_soon()

    async def _renew_forever(self) -> None:
        # Woken by close() through the event, not by cancelling: on Python 3.11 a cancellation
        # that arrives as redis-py's wait_for completes is dropped (CPython gh-86296), and a
        # loop that missed it would never end.
        while not self._closed:
            try:
                await asyncio.wait_for(self._stop.wait(), self._renew_s)
                return
            except TimeoutError:
                pass
            try:
                await self.counts.renew()
                self._set_up(True)
            except STORE_ERRORS as exc:
                self._failed("renew", exc)
            except Exception:  # never let the loop die: counts would stop being renewed
                logger.exception("renewing this replica's counts in the limits store failed")

    # ---- state ---------------------------------------------------------------------------
    def _failed(self, operation: str, error: BaseException) -> None:
        LIMIT_STORE_ERRORS.labels(operation).inc()
        self._failures += 1
        if operation == "renew" or self._failures >= FAILURES_TO_DOWN:
            self._set_up(False, error)

    def _set_up(self, up: bool, error: BaseException | None = None) -> None:
        if self._closed:
            return  # a renewal that outlived close() must not open the store again
        if up:
            self._failures = 0
            if not self._up:
                logger.warning("limits store answers again: tenant limits are shared again")
        elif self._up:
            logger.error(
                "limits store unreachable (%s): each replica enforces tenant limits on its own "
                "until it answers",
                error.__class__.__name__ if error is not None else "unknown",
            )
        self._up = up
        LIMIT_STORE_UP.labels("redis").set(1 if up else 0)

    def _key(self, tenant: str, part: str) -> str:
        return f"{self._prefix}:limits:{{{tenant}}}:{part}"

    def _keys(self, tenant: str, *parts: str) -> list[str]:
        return [self._key(tenant, part) for part in parts]


def _client(
    url: str, connections: int, timeout_s: float
) -> tuple[redis.BlockingConnectionPool, redis.Redis]:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),  # a retry doubles the wait of every request in an outage
    )
    return pool, redis.Redis(connection_pool=pool)


def _give_back_abandoned(admission: asyncio.Future[Lease]) -> None:
    """The lease of a request whose client left while it was being admitted: it never ran."""
    if admission.cancelled() or admission.exception() is not None:
        return
    admission.result().release(0, ran=False)
